#!/usr/bin/env bash
# Stop the local dev Slurm cluster started by slurm/dev/up.sh.
#
#   slurm/dev/down.sh           # stop slurmd x2, slurmctld, slurmdbd (state kept)
#   slurm/dev/down.sh --all     # ... and MariaDB and the (system-wide) munged
#   slurm/dev/down.sh --purge   # cancel jobs, stop everything under the state
#                               # dir (MariaDB too) and delete ${MBL_SLURM_DIR}
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

usage() {
  sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

ALL=0
PURGE=0
for arg in "$@"; do
  case "$arg" in
    --all) ALL=1 ;;
    --purge) PURGE=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      die "unknown argument: $arg"
      ;;
  esac
done

require_root
check_dir

if [[ ! -d "$DIR" ]]; then
  log "$DIR does not exist: nothing to stop"
  if ((ALL)); then
    stop_pidfile "$MUNGE_PIDFILE" munged munged 10
  fi
  exit 0
fi
if [[ ! -e "$MARKER" ]] && ((PURGE)); then
  die "$DIR has no $(basename "$MARKER") marker: refusing to delete a directory up.sh did not create"
fi

take_lock
export SLURM_CONF="$CONF"

# With --purge, end the jobs first so that no slurmstepd outlives its cluster.
if ((PURGE)) && pid_alive "$RUNDIR/slurmctld.pid" slurmctld >/dev/null; then
  mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
  if ((${#jobs[@]})); then
    log "cancelling ${#jobs[@]} job(s)"
    scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 1 80); do
      [[ -z "$(squeue -h -o %i 2>/dev/null || true)" ]] && break
      sleep 0.5
    done
  fi
fi

for n in "${NODES[@]}"; do
  stop_pidfile "$(slurmd_pidfile "$n")" slurmd "slurmd $n" 30
done
stop_pidfile "$RUNDIR/slurmctld.pid" slurmctld slurmctld 60
stop_pidfile "$RUNDIR/slurmdbd.pid" slurmdbd slurmdbd 30

if ((PURGE)); then
  # Job step daemons inherit SLURM_CONF from the slurmd that started them.
  for p in /proc/[0-9]*; do
    read -r comm 2>/dev/null <"$p/comm" || continue
    [[ "$comm" == slurmstepd ]] || continue
    if tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
      warn "killing leftover slurmstepd ${p#/proc/}"
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
fi

if ((ALL || PURGE)); then
  stop_pidfile "$DB_PIDFILE" mariadbd mariadb 60
fi
if ((ALL)); then
  stop_pidfile "$MUNGE_PIDFILE" munged munged 10
fi

if ((PURGE)); then
  log "removing $DIR"
  rm -rf "$DIR"
fi
log "done"
