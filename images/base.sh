#!/usr/bin/env bash
# Make a CPU base image with Python and nothing else, without any registry: debootstrap a minimal Debian
# into a folder and import it. Needs root and debootstrap (apt-get install debootstrap).
#
#   images/base.sh                         # localhost/mbl-base:bookworm, unless it exists
#   images/base.sh --force                 # make it again
#
# Environment: MBL_BASE_IMAGE (the tag), MBL_DEBIAN_SUITE (bookworm: Python 3.11), MBL_DEBIAN_MIRROR
# (default: the first Debian mirror in apt's sources), MBL_ENGINE (podman or docker).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TAG="${MBL_BASE_IMAGE:-localhost/mbl-base:bookworm}"
SUITE="${MBL_DEBIAN_SUITE:-bookworm}"
# Python, its venv module and CA certificates; libgomp1 for DeepSpeed's OpenMP op. Compilers and Python
# headers are the image build's business (its first stage installs them, the final image lacks them).
PACKAGES="python3,python3-venv,ca-certificates,libgomp1"
FORCE=0

for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h | --help)
      sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) die "unknown argument: $arg" ;;
  esac
done

# The Debian mirror apt uses here (deb822 or one-line sources), so that a mirror-only machine works.
apt_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    uri="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")"
    if [[ -n "$uri" ]]; then
      echo "$uri"
      return 0
    fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")"
    if [[ -n "$uri" ]]; then
      echo "$uri"
      return 0
    fi
  done
  echo http://deb.debian.org/debian
}

pick_engine
if image_exists "$TAG" && ((FORCE == 0)); then
  log "base image $TAG exists (images/base.sh --force makes it again)"
  echo "$TAG"
  exit 0
fi
[[ "$(id -u)" -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (apt-get install debootstrap)"

MIRROR="${MBL_DEBIAN_MIRROR:-$(apt_mirror)}"
ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/mbl-base.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
t0=$SECONDS
log "debootstrap $SUITE from $MIRROR ($PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 ||
  { tail -n 30 "$ROOTFS.log" >&2; die "debootstrap failed (log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*
log "importing as $TAG"
tar -C "$ROOTFS" -c . | "$ENGINE" import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
log "base image $TAG made in $((SECONDS - t0))s"
echo "$TAG"
