#!/usr/bin/env bash
# Stops what .ci/slurm/up.sh started: slurmd, slurmctld, and munged when up.sh started it.
# Only processes named in up.sh's pid files are stopped. Safe to run when nothing is up.
set -euo pipefail

DIR="${DEGSR_SLURM_DIR:-/var/tmp/degsr-slurm}"

stop() {  # stop PIDFILE NAME: TERM the process the pid file names (if it is NAME), wait <= 10 s
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 0
  if [ -n "$pid" ] && [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$2" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    echo "down.sh: stopped $2 ($pid)"
  fi
  rm -f "$1"
}

# cancel this cluster's jobs first, so no job step outlives the daemons (bounded wait)
if [ -f "$DIR/slurm.conf" ] && [ -s "$DIR/slurmctld.pid" ]; then
  export SLURM_CONF="$DIR/slurm.conf"
  jobs="$(timeout 10 squeue -h -o %i 2>/dev/null || true)"
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 20); do
      [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && break
      sleep 0.5
    done
  fi
fi
stop "$DIR/slurmd.pid" slurmd
stop "$DIR/slurmctld.pid" slurmctld
if [ -z "${DEGSR_SLURM_KEEP_MUNGE:-}" ]; then
  stop "$DIR/munged.pid" munged
fi
