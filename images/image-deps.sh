#!/bin/sh
# The steps of images/Dockerfile, one mode per RUN (POSIX sh: the base may have no bash).
#
#   image-deps.sh venv                 # compilers and Python headers if missing; /opt/venv
#   image-deps.sh torch-deepspeed REQ  # torch (REQ, else the base's, else pip's); DeepSpeed with its CPU op
#   image-deps.sh requirements FILE    # the project's dependencies (images/build.sh lists them)
#   image-deps.sh runtime UID GID      # final stage: the user, a check that the prebuilt op loads
#   image-deps.sh project              # final stage: install /opt/mbl (launcher/, jobs/) without deps
set -eu

VENV=/opt/venv
BUILD=/run/mbl-build
OP_MODULE=deepspeed.ops.comm.deepspeed_shm_comm_op

say() { printf 'image-deps: %s\n' "$*"; }
die() {
  printf 'image-deps: error: %s\n' "$*" >&2
  exit 1
}

# pip reads the host's configuration and CA bundle that images/build.sh passed as build secrets.
pip_env() {
  if [ -s "$BUILD/pip.conf" ]; then
    export PIP_CONFIG_FILE="$BUILD/pip.conf"
  fi
  if [ -s "$BUILD/ca.crt" ]; then
    export PIP_CERT="$BUILD/ca.crt" SSL_CERT_FILE="$BUILD/ca.crt" REQUESTS_CA_BUNDLE="$BUILD/ca.crt"
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "the base lacks $* and has no apt-get: use a base that has them"
  say "apt-get install $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  rm -rf /var/lib/apt/lists/*
}

base_python() {
  for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1; then
      command -v "$p"
      return 0
    fi
  done
  die "the base image has no python3 or python on PATH"
}

op_check() {
  python - <<EOF
from deepspeed.git_version_info import installed_ops
assert installed_ops.get("deepspeed_shm_comm"), f"DeepSpeed's shm op is not prebuilt: {installed_ops}"
import importlib
importlib.import_module("$OP_MODULE")
print("image-deps: DeepSpeed's CPU shared-memory op is prebuilt ($OP_MODULE)")
EOF
}

mode_venv() {
  py=$(base_python)
  "$py" - <<'EOF' || die "Python >= 3.11 is needed"
import sys
sys.exit(sys.version_info < (3, 11))
EOF
  need=""
  "$py" -c 'import venv, ensurepip' 2>/dev/null || need="$need python3-venv"
  "$py" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
    2>/dev/null || need="$need python3-dev"
  command -v g++ >/dev/null 2>&1 || need="$need g++"
  if [ -n "$need" ]; then
    # shellcheck disable=SC2086  # a list of package names
    apt_install $need
  fi
  # --system-site-packages: a PyTorch base's torch (conda or system) serves the venv as it is.
  "$py" -m venv --system-site-packages "$VENV"
  pip_env
  "$VENV/bin/python" -m pip install -q "setuptools>=68" wheel
  say "venv $VENV on $("$VENV/bin/python" -V)"
}

mode_torch_deepspeed() {
  req="${1:-}"
  pip_env
  if [ -n "$req" ]; then
    pip install -q "$req"
  elif ! python -c 'import torch' 2>/dev/null; then
    pip install -q "torch>=2.4"
  fi
  python -c 'import torch; print("image-deps: torch", torch.__version__, "cuda", torch.version.cuda)'
  # DS_ACCELERATOR=cpu: the op is DeepSpeed's CPU accelerator's. On a GPU node DeepSpeed picks CUDA and
  # needs no such op; its CUDA ops stay just-in-time as before.
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu \
    pip install -q --no-build-isolation --no-binary deepspeed deepspeed
  op_check
}

mode_requirements() {
  pip_env
  pip install -q -r "$1"
  op_check  # the requirements kept the DeepSpeed built above
}

mode_runtime() {
  uid="$1" gid="$2"
  if ! getent group "$gid" >/dev/null 2>&1; then
    groupadd -g "$gid" mbl
  fi
  if ! getent passwd "$uid" >/dev/null 2>&1; then
    useradd -m -d /home/mbl -u "$uid" -g "$gid" -s /bin/sh mbl
  fi
  mkdir -p /home/mbl
  chown "$uid:$gid" /home/mbl
  # The op links the system's OpenMP runtime; a base without a compiler may lack it.
  if ! op_check >/dev/null 2>&1; then
    apt_install libgomp1
  fi
  op_check
}

mode_project() {
  pip install -q --no-deps --no-build-isolation --no-index /opt/mbl
  rm -rf /opt/mbl
  python -m jobs.train --help >/dev/null
  say "mbl $(python -c 'from importlib.metadata import version; print(version("mbl"))') installed"
}

mode="${1:-}"
[ $# -gt 0 ] && shift
case "$mode" in
  venv) mode_venv "$@" ;;
  torch-deepspeed) mode_torch_deepspeed "$@" ;;
  requirements) mode_requirements "$@" ;;
  runtime) mode_runtime "$@" ;;
  project) mode_project "$@" ;;
  *) die "unknown mode '$mode' (venv, torch-deepspeed, requirements, runtime, project)" ;;
esac
