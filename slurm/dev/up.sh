#!/usr/bin/env bash
# Start (idempotently) a local two-node Slurm cluster "mbl-dev" with
# accounting, GPU quotas and 4 fake GPUs per node, all state under
# ${MBL_SLURM_DIR:-/tmp/mbl-slurm}. Debian 12, root. See README.md.
#
#   slurm/dev/up.sh            # install if needed, start, wait, smoke test
#   source /tmp/mbl-slurm/env.sh && sinfo
#
# Environment: MBL_SLURM_DIR, MBL_SLURM_TIMEOUT (seconds, default 90),
# MBL_SLURM_SMOKE=0 (skip the srun smoke test), MBL_SLURM_CLEAR=1 (cancel every job
# left in the queue, for example by an earlier test run, and wait until it is empty), MBL_SLURM_CTLD_PORT,
# MBL_SLURM_DBD_PORT, MBL_SLURM_DB_PORT, MBL_SLURM_NODE_PORT, MBL_SLURM_CLUSTER.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

T0=$SECONDS
STARTED=()

# --------------------------------------------------------------------------
# helpers

tail_logs() {
  local f
  for f in "$@"; do
    [[ -f "$f" ]] || continue
    printf -- '----- last lines of %s -----\n' "$f" >&2
    tail -n 25 "$f" >&2 || true
  done
}

# wait_for LABEL TIMEOUT LOGFILE... -- COMMAND...: poll COMMAND until it
# succeeds; on timeout print the logs and die.
wait_for() {
  local label="$1" timeout="$2" start=$SECONDS
  shift 2
  local logs=()
  while [[ $# -gt 0 && "$1" != -- ]]; do
    logs+=("$1")
    shift
  done
  shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - start >= timeout)); then
      tail_logs "${logs[@]}"
      die "timed out after ${timeout}s waiting for $label"
    fi
    sleep 0.3
  done
}

# write_if_changed PATH MODE < content: atomically replace PATH when the
# content differs; succeed only when the file changed.
write_if_changed() {
  local path="$1" mode="$2" tmp
  tmp="$(mktemp "$path.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path"
    return 1
  fi
  mv -f "$tmp" "$path"
  return 0
}

# Daemons get a small, predictable environment (not the caller's). Every
# daemon start also closes fd 9 (9>&-): a daemon inheriting the lock fd of
# take_lock would hold the lock for as long as it runs.
daemon_env() {
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root \
    SLURM_CONF="$CONF" "$@"
}

# --------------------------------------------------------------------------
# 1. packages

install_packages() {
  local pkgs=(slurm-wlm slurmdbd munge mariadb-server shellcheck runc) missing=() p
  for p in "${pkgs[@]}"; do
    # shellcheck disable=SC2016  # ${Status} is a dpkg-query format, not bash
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then
    log "packages: all present"
    return 0
  fi
  log "packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep package maintainer scripts from starting system-wide services
  # (munge, mariadb, slurmctld, slurmd) with their /etc configuration.
  local guard=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    guard=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq || warn "apt-get update failed (some sources unreachable?); trying the install anyway"
  apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" >/dev/null 9>&-
  if ((guard)); then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
}

# --------------------------------------------------------------------------
# 2. host prerequisites: /etc/hosts, directories, fake GPUs

ensure_hosts() {
  local want=() n host
  host="$(hostname -s)"
  for n in "${NODES[@]}"; do
    if ! awk -v n="$n" '$1 == "127.0.0.1" { for (i = 2; i <= NF; i++) if ($i == n) f = 1 } END { exit !f }' /etc/hosts; then
      want+=("$n")
    fi
  done
  if ! getent hosts "$host" >/dev/null 2>&1; then
    want+=("$host")
  fi
  if ((${#want[@]})); then
    # Append (never rewrite: /etc/hosts is often a bind mount).
    printf '127.0.0.1 %s  # mbl-slurm dev cluster\n' "${want[*]}" >>/etc/hosts
    log "/etc/hosts: added 127.0.0.1 ${want[*]}"
  fi
}

ensure_dirs() {
  local n i dev
  mkdir -p "$DIR" "$LOGDIR" "$RUNDIR" "$STATEDIR" "$DEVDIR"
  chmod 755 "$DIR" "$LOGDIR" "$RUNDIR"
  chmod 700 "$STATEDIR"
  touch "$MARKER"
  for n in "${NODES[@]}"; do
    mkdir -p "$SPOOLDIR/$n" "$DEVDIR/$n"
    for ((i = 0; i < GPUS_PER_NODE; i++)); do
      dev="$DEVDIR/$n/nvidia$i"
      if [[ ! -c "$dev" ]]; then
        rm -f "$dev"
        mknod -m 666 "$dev" c 195 "$i"
      fi
    done
  done
}

# --------------------------------------------------------------------------
# 3. configuration

DB_PASS=""
CONF_CHANGED=0
DBD_CONF_CHANGED=0

write_configs() {
  local host
  host="$(hostname -s)"
  if [[ ! -s "$DIR/.dbpass" ]]; then
    (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.dbpass")
  fi
  DB_PASS="$(<"$DIR/.dbpass")"

  if write_if_changed "$CONF" 644 <<EOF; then CONF_CHANGED=1; fi
# Generated by slurm/dev/up.sh -- edits are overwritten on the next run.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$NODE_PORT1
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=30
InactiveLimit=0
Waittime=0
MailProg=/bin/true
StateSaveLocation=$STATEDIR
SlurmdSpoolDir=$SPOOLDIR/%n
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations,limits,qos
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$NODE_PORT1-$NODE_PORT2] CPUs=2 RealMemory=4000 Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=node[1-2] Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF

  local gres n
  gres="# Generated by slurm/dev/up.sh: fake GPUs are character devices (major 195)."
  gres+=$'\nAutoDetect=off'
  for n in "${NODES[@]}"; do
    gres+=$'\n'"NodeName=$n Name=gpu File=$DEVDIR/$n/nvidia[0-$((GPUS_PER_NODE - 1))]"
  done
  if write_if_changed "$DIR/gres.conf" 644 <<<"$gres"; then CONF_CHANGED=1; fi

  if write_if_changed "$DIR/slurmdbd.conf" 600 <<EOF; then DBD_CONF_CHANGED=1; fi
# Generated by slurm/dev/up.sh -- edits are overwritten on the next run.
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOGDIR/slurmdbd.log
PidFile=$RUNDIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

  write_oci_conf
  write_profile

  write_if_changed "$DIR/env.sh" 644 <<EOF || true
# Generated by slurm/dev/up.sh. Point Slurm client tools and mbl at the dev cluster:
#   source $DIR/env.sh
export MBL_SLURM_DIR=$DIR
export SLURM_CONF=$CONF
$PROFILE_EXPORT
EOF
  export SLURM_CONF="$CONF"
}

# mbl's cluster profile of this cluster (env.sh points MBL_PROFILE at it), so that
# `mbl submit --slurm examples/pretrain-tiny.yaml` works as is: jobs run from this
# checkout's .venv (scripts/setup.sh makes it), the team `default` is charged to nlp.
PROFILE_EXPORT="# no MBL_PROFILE: run scripts/setup.sh, then slurm/dev/up.sh again"
write_profile() {
  local repo out
  repo="$(cd "$HERE/../.." && pwd)"
  if [[ ! -x "$repo/.venv/bin/python" ]]; then
    warn "no $repo/.venv yet, so no mbl profile: run scripts/setup.sh, then slurm/dev/up.sh again"
    return 0
  fi
  if ! out="$("$repo/.venv/bin/python" "$repo/slurm/make_dev_profile.py" 9>&-)"; then
    warn "slurm/make_dev_profile.py failed: no mbl profile"
    return 0
  fi
  printf '%s\n' "$out" | write_if_changed "$DIR/profile.yaml" 644 || true
  PROFILE_EXPORT="export MBL_PROFILE=$DIR/profile.yaml"
  log "mbl profile: $DIR/profile.yaml (env.sh sets MBL_PROFILE)"
}

# Slurm's own OCI containers (`srun --container=BUNDLE`, container_runtime: oci): runc, through
# images/oci-run (copied to bin/mbl-oci-run), which gives each step the job's user, its mounts and working
# directory. `exec` keeps runc the step's task, so that signals reach the trainer. slurmstepd reads
# oci.conf at every step: no restart needed. State of runc: oci-state/<user>/.
write_oci_conf() {
  local src="$HERE/../../images/oci-run" run="$DIR/bin/mbl-oci-run" state="$DIR/oci-state"
  mkdir -p "$DIR/bin" "$state" "$SHARED"
  chmod 1777 "$state" "$SHARED"
  if [[ -f "$src" ]] && ! cmp -s "$src" "$run"; then
    install -m 755 "$src" "$run"
  fi
  write_if_changed "$DIR/oci.conf" 644 <<EOF || true
# Generated by slurm/dev/up.sh -- edits are overwritten on the next run.
RunTimeQuery="runc --root $state/%u state %n.%u.%j.%s.%t"
RunTimeKill="runc --root $state/%u kill -a %n.%u.%j.%s.%t"
RunTimeDelete="runc --root $state/%u delete --force %n.%u.%j.%s.%t"
RunTimeRun="exec $run --root $state/%u %n.%u.%j.%s.%t %b"
EOF
}

# A second submitter for tests of what non-root users get (rootless containers, file ownership).
ensure_dev_user() {
  if ! id -u "$DEV_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$DEV_USER"
    log "user $DEV_USER: created"
  fi
}

# --------------------------------------------------------------------------
# 4. daemons

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then
    log "munged: running"
    return 0
  fi
  if pid_alive "$MUNGE_PIDFILE" munged >/dev/null; then
    die "munged is running but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "munge: creating /etc/munge/munge.key"
    mungekey -c -f
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge
  install -d -o munge -g munge -m 700 /var/log/munge
  rm -f "$MUNGE_PIDFILE"
  log "munged: starting"
  runuser -u munge -- /usr/sbin/munged </dev/null >>"$LOGDIR/munged.out" 2>&1 9>&- ||
    { tail_logs /var/log/munge/munged.log "$LOGDIR/munged.out"; die "munged failed to start"; }
  STARTED+=("munged")
  wait_for munged 20 /var/log/munge/munged.log -- munge_ok
}

db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot; }
db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping >/dev/null 2>&1; }

start_mariadb() {
  install -d -o mysql -g mysql -m 750 "$DB_RUN"
  if pid_alive "$DB_PIDFILE" mariadbd >/dev/null; then
    wait_for mariadb 60 "$LOGDIR/mariadb.log" -- db_ok
    log "mariadb: running (port $DB_PORT)"
  else
    if [[ ! -f "$DB_DIR/.mbl-initialized" ]]; then
      log "mariadb: initialising $DB_DIR"
      rm -rf "$DB_DIR"
      install -d -o mysql -g mysql -m 750 "$DB_DIR"
      mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$LOGDIR/mariadb-install.log" 2>&1 9>&- ||
        { tail_logs "$LOGDIR/mariadb-install.log"; die "mariadb-install-db failed"; }
      touch "$DB_DIR/.mbl-initialized"
    fi
    touch "$LOGDIR/mariadb.log"
    chown mysql:mysql "$LOGDIR/mariadb.log"
    rm -f "$DB_PIDFILE" "$DB_SOCK"
    log "mariadb: starting (port $DB_PORT)"
    start-stop-daemon --start --quiet --background --pidfile "$DB_PIDFILE" \
      --exec /usr/sbin/mariadbd -- --no-defaults --user=mysql \
      --datadir="$DB_DIR" --socket="$DB_SOCK" --pid-file="$DB_PIDFILE" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$LOGDIR/mariadb.log" --innodb-use-native-aio=0 \
      --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
      --innodb-log-file-size=64M --innodb-flush-log-at-trx-commit=2 \
      </dev/null 9>&-
    STARTED+=("mariadb")
    wait_for mariadb 60 "$LOGDIR/mariadb.log" -- db_ok
  fi
  db <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }

start_slurmdbd() {
  local pidfile="$RUNDIR/slurmdbd.pid"
  if pid_alive "$pidfile" slurmdbd >/dev/null; then
    if ((DBD_CONF_CHANGED)); then
      log "slurmdbd: configuration changed, restarting"
      stop_pidfile "$pidfile" slurmdbd slurmdbd 30
    else
      log "slurmdbd: running (port $DBD_PORT)"
      wait_for slurmdbd 30 "$LOGDIR/slurmdbd.log" -- dbd_ok
      return 0
    fi
  fi
  rm -f "$pidfile"
  log "slurmdbd: starting (port $DBD_PORT)"
  daemon_env slurmdbd </dev/null >>"$LOGDIR/slurmdbd.out" 2>&1 9>&- ||
    { tail_logs "$LOGDIR/slurmdbd.log" "$LOGDIR/slurmdbd.out"; die "slurmdbd failed to start"; }
  STARTED+=("slurmdbd")
  wait_for slurmdbd 90 "$LOGDIR/slurmdbd.log" "$LOGDIR/slurmdbd.out" -- dbd_ok
}

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
  local pidfile="$RUNDIR/slurmctld.pid"
  if pid_alive "$pidfile" slurmctld >/dev/null; then
    log "slurmctld: running (port $CTLD_PORT)"
    wait_for slurmctld 30 "$LOGDIR/slurmctld.log" -- ctld_ok
    return 0
  fi
  rm -f "$pidfile"
  log "slurmctld: starting (port $CTLD_PORT)"
  daemon_env slurmctld </dev/null >>"$LOGDIR/slurmctld.out" 2>&1 9>&- ||
    { tail_logs "$LOGDIR/slurmctld.log" "$LOGDIR/slurmctld.out"; die "slurmctld failed to start"; }
  STARTED+=("slurmctld")
  wait_for slurmctld 60 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmctld.out" -- ctld_ok
}

start_slurmd() {
  local n="$1" pidfile
  pidfile="$(slurmd_pidfile "$n")"
  if pid_alive "$pidfile" slurmd >/dev/null; then
    log "slurmd $n: running"
    return 0
  fi
  rm -f "$pidfile"
  log "slurmd $n: starting"
  daemon_env slurmd -N "$n" </dev/null >>"$LOGDIR/slurmd-$n.out" 2>&1 9>&- ||
    { tail_logs "$LOGDIR/slurmd-$n.log" "$LOGDIR/slurmd-$n.out"; die "slurmd $n failed to start"; }
  STARTED+=("slurmd-$n")
}

restart_slurm_if_config_changed() {
  ((CONF_CHANGED)) || return 0
  local running=0 n
  pid_alive "$RUNDIR/slurmctld.pid" slurmctld >/dev/null && running=1
  for n in "${NODES[@]}"; do
    pid_alive "$(slurmd_pidfile "$n")" slurmd >/dev/null && running=1
  done
  ((running)) || return 0
  log "slurm.conf/gres.conf changed: restarting slurmctld and slurmd"
  for n in "${NODES[@]}"; do
    stop_pidfile "$(slurmd_pidfile "$n")" slurmd "slurmd $n" 30
  done
  stop_pidfile "$RUNDIR/slurmctld.pid" slurmctld slurmctld 30
}

# --------------------------------------------------------------------------
# 5. accounting: cluster, accounts with GPU quotas, root user

sacct_has() { # sacct_has LINE < list
  grep -qxF -- "$1"
}

ensure_cluster() {
  if sacctmgr -n -P list cluster format=cluster | sacct_has "$CLUSTER"; then
    log "accounting: cluster $CLUSTER registered"
  else
    log "accounting: adding cluster $CLUSTER"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

# ensure_account NAME GRPTRES ("" = no limit)
ensure_account() {
  local name="$1" limit="$2" have
  if [[ -z "$(sacctmgr -n -P list assoc where cluster="$CLUSTER" account="$name" format=account)" ]]; then
    sacctmgr -i add account "$name" cluster="$CLUSTER" \
      description="mbl dev $name" organization=mbl >/dev/null
  fi
  # The account-level association is the row with an empty user.
  have="$(sacctmgr -n -P list assoc where cluster="$CLUSTER" account="$name" \
    format=user,grptres | awk -F'|' '$1 == "" { print $2; exit }')"
  if [[ "$have" != "$limit" ]]; then
    sacctmgr -i modify account where name="$name" cluster="$CLUSTER" \
      set GrpTRES="${limit:-gres/gpu=-1}" >/dev/null
  fi
}

ensure_accounting() {
  ensure_account nlp gres/gpu=4
  ensure_account vision gres/gpu=8
  ensure_account ops ""
  local have a
  have="$(sacctmgr -n -P list assoc where cluster="$CLUSTER" user=root format=account)"
  for a in nlp vision ops; do
    if ! sacct_has "$a" <<<"$have"; then
      sacctmgr -i add user root account="$a" cluster="$CLUSTER" >/dev/null
    fi
  done
  if [[ "$(sacctmgr -n -P list user root format=defaultaccount)" != nlp ]]; then
    sacctmgr -i modify user where name=root set defaultaccount=nlp >/dev/null
  fi
  if ! sacct_has ops <<<"$(sacctmgr -n -P list assoc where cluster="$CLUSTER" user="$DEV_USER" format=account)"; then
    sacctmgr -i add user "$DEV_USER" account=ops defaultaccount=ops cluster="$CLUSTER" >/dev/null
  fi
  log "accounting: accounts nlp (gres/gpu=4), vision (gres/gpu=8), ops (no limit); root default nlp, $DEV_USER ops"
}

# --------------------------------------------------------------------------
# 6. wait for the nodes, smoke test

# Print "node state" lines, e.g. "node1 idle", "node2 down*".
node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

wait_nodes() {
  local start=$SECONDS n state ok resumed=" " states
  while :; do
    ok=0
    states="$(node_states)"
    for n in "${NODES[@]}"; do
      state="$(awk -v n="$n" '$1 == n { print $2 }' <<<"$states")"
      case "$state" in
        idle | mixed | allocated | completing | planned) ok=$((ok + 1)) ;;
      esac
      # A responding node left down/drained by an earlier run: resume it once.
      if [[ "$state" =~ ^(down|drained|draining)$ && "$resumed" != *" $n "* ]]; then
        warn "$n is $state ($(sinfo -h -n "$n" -o '%E' 2>/dev/null)); resuming it"
        scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
        resumed+="$n "
      fi
    done
    ((ok == ${#NODES[@]})) && break
    if ((SECONDS - start >= WAIT_TIMEOUT)); then
      printf '%s\n' "$states" >&2
      sinfo -R >&2 || true
      tail_logs "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd-node1.log" "$LOGDIR/slurmd-node2.log"
      die "timed out after ${WAIT_TIMEOUT}s waiting for node1 and node2 to be idle"
    fi
    sleep 0.5
  done
  log "nodes: $(tr '\n' ' ' <<<"$states")"
}

# Jobs survive a restart of slurmctld (its state directory): a test run that starts on a machine where an
# earlier run left jobs would wait behind them. MBL_SLURM_CLEAR=1 cancels them all (every user: this is the
# dev cluster) and waits until none is left.
clear_queue() {
  [[ "${MBL_SLURM_CLEAR:-0}" == 1 ]] || return 0
  local ids start=$SECONDS
  ids="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
  if [[ -z "${ids// /}" ]]; then
    log "queue: empty"
    return 0
  fi
  # shellcheck disable=SC2086  # one id per word
  scancel $ids >/dev/null 2>&1 || true
  while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; do
    if ((SECONDS - start >= WAIT_TIMEOUT)); then
      squeue >&2 || true
      die "timed out after ${WAIT_TIMEOUT}s waiting for the cancelled jobs to leave the queue"
    fi
    sleep 1
  done
  log "queue: cancelled $(wc -w <<<"$ids") jobs left from before ($ids) in $((SECONDS - start))s"
  wait_nodes
}

smoke_test() {
  if [[ "${MBL_SLURM_SMOKE:-1}" == 0 ]]; then
    log "smoke test: skipped (MBL_SLURM_SMOKE=0)"
    return 0
  fi
  # Jobs of other users could keep the smoke job waiting: skip it then.
  if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
    log "smoke test: skipped (jobs are queued or running)"
    return 0
  fi
  local out
  # shellcheck disable=SC2016  # expanded by the job, not here
  if ! out="$(timeout -k 5 60 srun -N2 --ntasks-per-node=1 --cpus-per-task=1 -t 1 \
    -J mbl-smoke bash -c 'echo "$SLURMD_NODENAME $(hostname)"' 2>&1)"; then
    printf '%s\n' "$out" >&2
    tail_logs "$LOGDIR/slurmctld.log"
    die "smoke test 'srun -N2 --ntasks-per-node=1' failed"
  fi
  if [[ "$(awk '{ print $1 }' <<<"$out" | sort | tr '\n' ' ')" != "node1 node2 " ]]; then
    printf '%s\n' "$out" >&2
    die "smoke test: expected one task on node1 and one on node2"
  fi
  log "smoke test: srun -N2 ran on $(awk '{ print $1 }' <<<"$out" | sort | tr '\n' ' ')"
}

# --------------------------------------------------------------------------

main() {
  require_root
  check_dir
  take_lock
  install_packages
  ensure_hosts
  ensure_dev_user
  ensure_dirs
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  ensure_cluster
  restart_slurm_if_config_changed
  start_slurmctld
  ensure_accounting
  local n
  for n in "${NODES[@]}"; do
    start_slurmd "$n"
  done
  wait_nodes
  clear_queue
  smoke_test
  if ((${#STARTED[@]})); then
    log "started: ${STARTED[*]}"
  else
    log "everything was already running"
  fi
  log "cluster $CLUSTER is up in $((SECONDS - T0))s: partition '$PARTITION' (default), node[1-2] x 2 CPUs x $GPUS_PER_NODE fake GPUs"
  log "state, config and logs: $DIR (stop with slurm/dev/down.sh)"
  log "point Slurm tools at it with:"
  echo
  echo "    source $DIR/env.sh"
  echo
}

main "$@"
