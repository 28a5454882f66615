#!/usr/bin/env bash
# Container set-up for the tests (scripts/test.sh) on a Debian machine, as root: install what is missing of
# podman, runc, buildah, debootstrap and catatonit (kube play's pause image), then build the CPU trainer
# image (images/build.sh --cpu: cached, seconds when nothing changed). Prints the image's name last.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PACKAGES=(podman runc buildah debootstrap catatonit)
missing=()
for p in "${PACKAGES[@]}"; do
  # shellcheck disable=SC2016  # ${Status} is a dpkg-query format, not bash
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  [[ "$(id -u)" -eq 0 ]] || die "installing ${missing[*]} needs root"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  }
fi
exec "$IMAGES_DIR/build.sh" --cpu
