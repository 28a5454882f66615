#!/usr/bin/env bash
# Turn the trainer image into an OCI bundle for Slurm's own container support (`srun --container=BUNDLE`,
# container_runtime: oci; see docs/slurm.md): BUNDLE/rootfs (the image's files) and BUNDLE/config.json.
#
#   images/bundle.sh [IMAGE] BUNDLE     # IMAGE default localhost/mbl-trainer:<version>
#
# BUNDLE must be on every node at the same path (shared storage, or made on each node); jobs name it in
# `image:`. Made again only when the image changed (BUNDLE/.image-id). Needs podman or docker, and runc
# (for `runc spec`). config.json: host network, PID and UTS namespaces (the rendezvous needs the node's
# name and distinct pids), the host's /etc/hosts and resolv.conf, a read-only root with tmpfs /tmp and
# HOME, nofile 20000, uid 1000; images/oci-run (oci.conf's RunTimeRun) sets the job's user, mounts and
# working directory per step.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case $# in
  1) IMAGE="localhost/mbl-trainer:$(project_version)" BUNDLE="$1" ;;
  2) IMAGE="$1" BUNDLE="$2" ;;
  *)
    sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
    ;;
esac
[[ "$BUNDLE" == /* ]] || BUNDLE="$PWD/$BUNDLE"
command -v runc >/dev/null 2>&1 || die "runc is missing (apt-get install runc)"
pick_engine
image_exists "$IMAGE" || die "no image $IMAGE here (build it: images/build.sh --cpu)"

# One maker at a time per bundle (concurrent test runs share it).
mkdir -p "$(dirname "$BUNDLE")"
exec 9>"$BUNDLE.lock"
flock -w 900 9 || die "another images/bundle.sh still holds $BUNDLE.lock"

id="$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE")"
if [[ -f "$BUNDLE/.image-id" && "$(cat "$BUNDLE/.image-id")" == "$id" && -f "$BUNDLE/config.json" ]]; then
  log "bundle $BUNDLE is up to date with $IMAGE"
  echo "$BUNDLE"
  exit 0
fi

t0=$SECONDS
tmp="$BUNDLE.new.$$"
rm -rf "$tmp"
mkdir -p "$tmp/rootfs"
trap 'rm -rf "$tmp"; [[ -n "${cid:-}" ]] && "$ENGINE" rm -f "$cid" >/dev/null 2>&1 || true' EXIT
cid="$("$ENGINE" create "$IMAGE" /bin/true)"
"$ENGINE" export "$cid" | tar -C "$tmp/rootfs" -x
"$ENGINE" image inspect --format '{{json .Config}}' "$IMAGE" >"$tmp/image-config.json"
(cd "$tmp" && runc spec)
python3 "$IMAGES_DIR/oci_config.py" "$tmp/config.json" "$tmp/image-config.json"
echo "$id" >"$tmp/.image-id"
echo "$IMAGE" >"$tmp/.image"
# Swap in the new bundle whole (a job running from the old one would lose its files: use a new path for
# a new image while jobs run).
if [[ -e "$BUNDLE" ]]; then
  mv "$BUNDLE" "$BUNDLE.old.$$"
  mv "$tmp" "$BUNDLE"
  rm -rf "$BUNDLE.old.$$"
else
  mv "$tmp" "$BUNDLE"
fi
log "bundle $BUNDLE made from $IMAGE in $((SECONDS - t0))s"
echo "$BUNDLE"
