#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the Slurm tests (tests/test_slurm.py) and
# for trying the templates in slurm/ by hand. Needs root (apt-get, munged, slurmd).
#
#   bash .ci/slurm/up.sh               # install if missing, start munged/slurmctld/slurmd, wait idle
#   export SLURM_CONF=/var/tmp/degsr-slurm/slurm.conf
#   sbatch --gres=none --cpus-per-task=1 --ntasks-per-node=2 slurm/train.sh ...
#   bash .ci/slurm/down.sh             # stop what up.sh started
#
# Idempotent: when the cluster is already up with the same slurm.conf it only prints the usage.
# The node has the machine's cores (as `slurmd -C` sees them); the partition oversubscribes each core
# twice (OverSubscribe=FORCE:2), so two 2-task jobs on a 2-core machine run side by side instead of
# queueing. No accounting (no sacct): read job states with `scontrol show job -o ID`.
# State, spool, logs and pid files live in $DEGSR_SLURM_DIR (default /var/tmp/degsr-slurm).
set -euo pipefail

DIR="${DEGSR_SLURM_DIR:-/var/tmp/degsr-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
WAIT_S="${DEGSR_SLURM_WAIT_S:-60}"

die() { echo "up.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (apt-get, munged, slurmd); run it with sudo"

# --- packages ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  # without package lists (or with stale ones: the install fails) update them first
  if ! apt-cache show slurmctld >/dev/null 2>&1 || ! apt-get install -y -q "${pkgs[@]}" >/dev/null; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q "${pkgs[@]}" >/dev/null || die "apt-get install ${pkgs[*]} failed"
  fi
fi
getent hosts "$HOST" >/dev/null || die "this machine's name '$HOST' does not resolve (add it to /etc/hosts)"
mkdir -p "$DIR"/{state,spool,log}

# --- munge ------------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged started but munge -n | unmunge fails"
  cat /run/munge/munged.pid > "$DIR/munged.pid" 2>/dev/null || pgrep -u munge -x munged > "$DIR/munged.pid"
fi

# --- slurm.conf -------------------------------------------------------------------------------
# The node line as slurmd detects it (sockets/cores/threads), with 1 GiB of memory held back.
node="$(slurmd -C)" || die "slurmd -C failed"
node="${node%%$'\n'*}"
mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")"
[ -n "$mem" ] || die "slurmd -C printed no RealMemory: $node"
node="${node/RealMemory=$mem/RealMemory=$(( mem > 2048 ? mem - 1024 : mem ))}"
new="$(cat <<EOF
# Written by .ci/slurm/up.sh: a single-node cluster on $HOST for degsr's Slurm tests.
ClusterName=degsr-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=3
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$node
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF
)"

usage() {
  cat <<EOF
Slurm is up: one node '$HOST' ($(nproc) CPUs), partition 'ci'. Use it with
  export SLURM_CONF=$CONF
  sinfo; sbatch --gres=none --cpus-per-task=1 ...; squeue; scontrol show job -o JOBID
Logs: $DIR/log/   Stop it: bash .ci/slurm/down.sh
EOF
}

running() {  # true when the pid file names a live process called $2
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$2" ]
}

export SLURM_CONF="$CONF"
if running "$DIR/slurmctld.pid" slurmctld && running "$DIR/slurmd.pid" slurmd \
   && [ "$(cat "$CONF" 2>/dev/null)" = "$new" ] \
   && sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "up.sh: already running"
  usage
  exit 0
fi

# Something is off (not running, or a different conf): restart from a clean state.
DEGSR_SLURM_DIR="$DIR" DEGSR_SLURM_KEEP_MUNGE=1 bash "$(dirname "$0")/down.sh" >/dev/null
printf '%s\n' "$new" > "$CONF"
rm -rf "${DIR:?}/state" "${DIR:?}/spool" && mkdir -p "$DIR/state" "$DIR/spool"
slurmctld -c -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
slurmd -c -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"

state=""
for _ in $(seq "$(( WAIT_S * 2 ))"); do
  state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
  case "$state" in idle) break ;; esac
  case "$state" in down*|drain*|*invalid*)
    scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;; esac
  sleep 0.5
done
if [ "$state" != idle ]; then
  echo "up.sh: error: node $HOST is '${state:-unknown}', not idle, after ${WAIT_S}s" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
  exit 1
fi
echo "up.sh: started slurmctld and slurmd"
usage
