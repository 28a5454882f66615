# shellcheck shell=bash
# Shared by images/build.sh, images/base.sh and images/bundle.sh. Sourced, never run.

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$IMAGES_DIR/.." && pwd)"

log() { printf '[mbl-image] %s\n' "$*" >&2; }
die() {
  printf '[mbl-image] error: %s\n' "$*" >&2
  exit 1
}

# podman needs runc and explicit ulimits on these machines (crun fails on hybrid cgroups; runc cannot raise
# podman's default rlimits): images/containers.conf, unless the caller named a configuration already.
use_containers_conf() {
  if [[ -z "${CONTAINERS_CONF:-}" ]]; then
    export CONTAINERS_CONF="$IMAGES_DIR/containers.conf"
  fi
}

# The engine: $MBL_ENGINE, else podman, else docker when its daemon answers.
pick_engine() {
  if [[ -n "${MBL_ENGINE:-}" ]]; then
    command -v "$MBL_ENGINE" >/dev/null 2>&1 || die "MBL_ENGINE=$MBL_ENGINE is not on PATH"
    ENGINE="$MBL_ENGINE"
  elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  else
    die "neither podman nor a running docker was found (Debian: apt-get install podman runc buildah; see images/README.md)"
  fi
  if [[ "$ENGINE" == podman ]]; then
    use_containers_conf
  fi
}

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

project_version() {
  sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_DIR/pyproject.toml" | head -n 1
}

# The commit of the checkout (short), "-dirty" when tracked files differ from it; "nogit" outside git.
git_revision() {
  local rev
  if ! rev="$(git -C "$REPO_DIR" rev-parse --short=12 HEAD 2>/dev/null)"; then
    echo nogit
    return 0
  fi
  if ! git -C "$REPO_DIR" diff --quiet HEAD -- 2>/dev/null; then
    rev="$rev-dirty"
  fi
  echo "$rev"
}
