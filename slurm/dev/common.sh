# shellcheck shell=bash disable=SC2034  # the variables are used by up.sh/down.sh
# Settings and helpers shared by slurm/dev/up.sh and slurm/dev/down.sh.
# Sourced, never run on its own. Every knob can be overridden from the
# environment; the defaults are what the README documents.

MBL_SLURM_DIR="${MBL_SLURM_DIR:-/tmp/mbl-slurm}"
case "$MBL_SLURM_DIR" in
  /*) ;;
  *) MBL_SLURM_DIR="$PWD/$MBL_SLURM_DIR" ;;
esac
# Strip trailing slashes ("/tmp/x/" -> "/tmp/x").
while [[ "$MBL_SLURM_DIR" == */ && "$MBL_SLURM_DIR" != / ]]; do
  MBL_SLURM_DIR="${MBL_SLURM_DIR%/}"
done

CLUSTER="${MBL_SLURM_CLUSTER:-mbl-dev}"
PARTITION="gpu"
CTLD_PORT="${MBL_SLURM_CTLD_PORT:-16817}"
DBD_PORT="${MBL_SLURM_DBD_PORT:-16819}"
DB_PORT="${MBL_SLURM_DB_PORT:-16306}"
NODE_PORT1="${MBL_SLURM_NODE_PORT:-17001}"
NODE_PORT2="$((NODE_PORT1 + 1))"
NODES=(node1 node2)
GPUS_PER_NODE=4
WAIT_TIMEOUT="${MBL_SLURM_TIMEOUT:-90}"

DIR="$MBL_SLURM_DIR"
CONF="$DIR/slurm.conf"
LOGDIR="$DIR/log"
RUNDIR="$DIR/run"
STATEDIR="$DIR/state"
SPOOLDIR="$DIR/spool"
DEVDIR="$DIR/dev"
DB_DIR="$DIR/mysql"
DB_RUN="$RUNDIR/mysqld"
DB_SOCK="$DB_RUN/mysqld.sock"
DB_PIDFILE="$DB_RUN/mysqld.pid"
MARKER="$DIR/.mbl-slurm-dir"
SHARED="$DIR/shared"  # the "shared storage" of container jobs (make_dev_profile.py --runtime oci)
DEV_USER="${MBL_SLURM_DEV_USER:-mbluser}"
MUNGE_PIDFILE="/run/munge/munged.pid"

log() { printf '[mbl-slurm] %s\n' "$*"; }
warn() { printf '[mbl-slurm] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[mbl-slurm] ERROR: %s\n' "$*" >&2
  exit 1
}

check_dir() {
  [[ "$DIR" != / && -n "$DIR" ]] || die "MBL_SLURM_DIR must not be '/'"
  # The path ends up in slurm.conf / gres.conf, which do not quote values.
  [[ "$DIR" =~ ^/[A-Za-z0-9._/-]+$ ]] ||
    die "MBL_SLURM_DIR='$DIR' must be an absolute path of [A-Za-z0-9._/-] only"
}

require_root() {
  [[ "$(id -u)" -eq 0 ]] || die "run me as root (the dev cluster runs its daemons as root)"
}

# Serialise concurrent up.sh / down.sh runs on the same state directory.
take_lock() {
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  if ! flock -n 9; then
    log "waiting for another up.sh/down.sh to release $DIR/.lock"
    flock -w 600 9 || die "another up.sh/down.sh still holds $DIR/.lock after 600s"
  fi
}

# pid_alive PIDFILE COMM: print the pid and succeed when PIDFILE names a
# live process whose /proc/PID/comm is COMM (so stale pid files are ignored).
pid_alive() {
  local pidfile="$1" comm="$2" pid
  [[ -r "$pidfile" ]] || return 1
  pid="$(tr -cd '0-9' 2>/dev/null <"$pidfile")" || return 1
  [[ -n "$pid" ]] || return 1
  proc_is "$pid" "$comm" || return 1
  printf '%s\n' "$pid"
}

# proc_is PID COMM: PID is a live (non-zombie) process named COMM.
proc_is() {
  local pid="$1" comm="$2" name
  read -r name 2>/dev/null <"/proc/$pid/comm" || return 1
  [[ "$name" == "$comm" ]] || return 1
  [[ "$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ]]
}

# stop_pidfile PIDFILE COMM LABEL [TIMEOUT]: SIGTERM, wait, then SIGKILL.
stop_pidfile() {
  local pidfile="$1" comm="$2" label="$3" timeout="${4:-30}" pid waited=0
  if ! pid="$(pid_alive "$pidfile" "$comm")"; then
    log "$label: not running"
    rm -f "$pidfile"
    return 0
  fi
  log "$label: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  # Wait for the process itself, not its pid file (removed before it exits).
  while proc_is "$pid" "$comm"; do
    if ((waited >= timeout * 10)); then
      warn "$label: still alive after ${timeout}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$pidfile"
}

slurmd_pidfile() { printf '%s/slurmd-%s.pid\n' "$RUNDIR" "$1"; }
