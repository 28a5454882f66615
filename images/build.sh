#!/usr/bin/env bash
# Build the trainer image from images/Dockerfile with podman (or docker where that is what runs).
#
#   images/build.sh                          # from the Dockerfile's CUDA PyTorch base (needs its registry)
#   images/build.sh --cpu                    # from a CPU base made here without a registry (images/base.sh)
#   images/build.sh --base python:3.11-slim --build-arg TORCH=torch==2.13.0
#
# Options: --cpu, --base IMAGE, --name NAME (default localhost/mbl-trainer), --build-arg K=V (repeatable),
# --no-cache. Tags NAME:<version> and NAME:<version>-<commit>[-dirty]; prints NAME:<version> last.
# The host's pip configuration (pip config list, PIP_* variables), the local wheel folders and file://
# indexes it names and its CA bundle reach pip in the build (images/host_pip.py); none end up in a layer.
# Two builds: the dependencies (venv, torch, DeepSpeed with its op) as NAME-deps:<hash of their inputs>,
# built only when missing; then the project on top. A second run with nothing changed takes seconds, and so
# does a source change. Environment: MBL_ENGINE, CONTAINERS_CONF (default images/containers.conf for podman).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME="localhost/mbl-trainer"
BASE=""
CPU=0
EXTRA=()
NO_CACHE=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --base) BASE="$2"; shift ;;
    --name) NAME="$2"; shift ;;
    --build-arg) EXTRA+=(--build-arg "$2"); shift ;;
    --no-cache) NO_CACHE=(--no-cache) ;;
    -h | --help)
      sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

pick_engine
t0=$SECONDS
VERSION="$(project_version)"
REVISION="$(git_revision)"
ARGS=(--build-arg "MBL_VERSION=$VERSION" --build-arg "MBL_REVISION=$REVISION")
if ((CPU)); then
  BASE="${BASE:-$("$IMAGES_DIR/base.sh")}"
  # The CPU torch that the project's `cpu` extra pins (an unpinned torch is a multi-GB CUDA build).
  torch="$(sed -n 's/^cpu *= *\["\(torch[^"]*\)"\]/\1/p' "$REPO_DIR/pyproject.toml")"
  [[ -n "$torch" ]] || die "pyproject.toml has no cpu = [\"torch==...\"] extra"
  ARGS+=(--build-arg "TORCH=$torch")
fi
if [[ -n "$BASE" ]]; then
  ARGS+=(--build-arg "BASE=$BASE")
fi

# The context: only what the Dockerfile copies (no .venv, no runs, no __pycache__), so that the layer cache
# sees the same files as long as the sources are the same.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mbl-image.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/context/images"
(cd "$REPO_DIR" && tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md launcher jobs) |
  tar -C "$WORK/context" -x
cp -p "$IMAGES_DIR/Dockerfile" "$IMAGES_DIR/image-deps.sh" "$WORK/context/images/"
python3 "$IMAGES_DIR/requirements.py" "$REPO_DIR/pyproject.toml" >"$WORK/context/images/requirements.txt"

# The host's pip configuration and CA bundle: build secrets; its local paths: read-only mounts (podman).
no_local=()
[[ "$ENGINE" == docker ]] && no_local=(--no-local)
python3 "$IMAGES_DIR/host_pip.py" "$WORK/pip" "${no_local[@]}"
PIP=(--secret "id=pip.conf,src=$WORK/pip/pip.conf" --secret "id=ca.crt,src=$WORK/pip/ca.crt")
while IFS= read -r path; do
  [[ -n "$path" ]] && PIP+=(--volume "$path:$path:ro")
done <"$WORK/pip/mounts"
if [[ "$ENGINE" == podman ]]; then
  ARGS+=(--layers --runtime runc)
fi

# 1. The dependencies (the Dockerfile up to its `# ---- trainer` line): an image of their own, named by a hash
#    of all that goes into them, built only when that image is missing.
DOCKERFILE="$WORK/context/images/Dockerfile"
base_ref="${BASE:-$(sed -n 's/^ARG BASE=//p' "$DOCKERFILE" | head -n 1)}"
base_id="$("$ENGINE" image inspect --format '{{.Id}}' "$base_ref" 2>/dev/null || echo "$base_ref")"
key="$({
  sed '/^# ---- trainer /,$d' "$DOCKERFILE"
  cat "$WORK/context/images/image-deps.sh" "$WORK/context/images/requirements.txt"
  printf '%s\n' "$ENGINE" "$base_id" "${ARGS[@]}" "${EXTRA[@]}"
} | grep -v -e '^MBL_VERSION=' -e '^MBL_REVISION=' | sha256sum | cut -c1-16)"
DEPS="$NAME-deps:$key"
if image_exists "$DEPS" && ((${#NO_CACHE[@]} == 0)); then
  log "dependencies: $DEPS exists"
else
  log "dependencies: building $DEPS with $ENGINE (base $base_ref)"
  "$ENGINE" build --network host --file "$DOCKERFILE" --target deps "${ARGS[@]}" "${PIP[@]}" "${EXTRA[@]}" \
    "${NO_CACHE[@]}" --tag "$DEPS" "$WORK/context" >&2
fi

# 2. The project on top (the Dockerfile from its `# ---- trainer` line, FROM the image above): seconds.
sed -n '/^# ---- trainer /,$p' "$DOCKERFILE" | sed "s|^FROM deps\$|FROM $DEPS|" >"$WORK/context/images/Dockerfile.trainer"
grep -q "^FROM $DEPS\$" "$WORK/context/images/Dockerfile.trainer" || die "images/Dockerfile lost its 'FROM deps' line"
"$ENGINE" build --network host --file "$WORK/context/images/Dockerfile.trainer" "${ARGS[@]}" "${EXTRA[@]}" \
  "${NO_CACHE[@]}" --tag "$NAME:$VERSION" --tag "$NAME:$VERSION-$REVISION" "$WORK/context" >&2
log "built $NAME:$VERSION and $NAME:$VERSION-$REVISION in $((SECONDS - t0))s"
echo "$NAME:$VERSION"
