#!/usr/bin/env bash
# Stop the test cluster started by scripts/slurm_up.sh: cancel its jobs, stop slurmd(s) and
# slurmctld by their pid files. munged stays up (other tools may use it) unless --all is given.
# --daemons-only skips cancelling jobs (used by slurm_up.sh before a restart).
set -uo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/flashdmd-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

if [ "${1:-}" != --daemons-only ] && [ -f "$CONF" ]; then
  timeout 10 scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
fi

stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$file"
}

for pidfile in "$DIR"/slurmd-*.pid; do stop_pidfile "$pidfile"; done
stop_pidfile "$DIR/slurmctld.pid"

if [ "${1:-}" = --all ] && [ -f /run/munge/munged.pid ]; then
  stop_pidfile /run/munge/munged.pid
fi
exit 0
