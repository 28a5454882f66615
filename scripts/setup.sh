#!/usr/bin/env bash
# Create .venv/ at the repository root with the launcher, the trainer and the test tools.
# CPU machines get torch==2.13.0 (the `cpu` extra); an unpinned torch would pull a multi-GB CUDA build.
# Idempotent: does nothing when pyproject.toml has not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.mbl-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian's python3 without ensurepip
    if command -v apt-get >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
    fi
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[trainer,cpu,test,plot,tracking]"
# DeepSpeed's CPU collectives op, built into the venv now (as the trainer image does), never just in time: a JIT
# build takes a lock file in ~/.cache/torch_extensions, and a build killed half way leaves that lock behind,
# which makes every later DeepSpeed start wait for it forever. --no-cache-dir: pip would reuse a wheel without it.
op_built() {
  .venv/bin/python -c 'import sys; from deepspeed.git_version_info import installed_ops as o
sys.exit(0 if o.get("deepspeed_shm_comm") else 1)' 2>/dev/null
}
if ! op_built; then
  ds=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("deepspeed"))')
  .venv/bin/python -m pip install -q "setuptools>=68" wheel ninja
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu .venv/bin/python -m pip install -q --no-build-isolation \
    --no-cache-dir --no-binary deepspeed --no-deps --force-reinstall "deepspeed==$ds"
  op_built || { echo "setup: DeepSpeed's shm op did not build (g++ and python3-dev are needed)" >&2; exit 1; }
fi
echo "$want" >"$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
