#!/usr/bin/env bash
# Stop the test cluster started by scripts/slurm_up.sh in SLURM_TEST_DIR (default
# /tmp/flashdmd-slurm): cancel its jobs and wait for them to end, then stop its slurmd(s) and
# slurmctld. A daemon is stopped only when its pid file names a process whose command line
# names this folder's slurm.conf, so a site's own Slurm (or a reused pid) is never signalled.
# munged stays up (other tools may use it) unless --all is given.
# --daemons-only skips cancelling jobs (used by slurm_up.sh before a restart).
set -uo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/flashdmd-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

ours() { tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "-f $CONF"; }

if [ "${1:-}" != --daemons-only ] && [ -f "$CONF" ] && [ -f "$DIR/slurmctld.pid" ] && ours "$(cat "$DIR/slurmctld.pid")"; then
  timeout 10 scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
  # slurmd must still be up to end the job steps it runs, or their processes outlive it
  for _ in $(seq 60); do
    [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

# TERM to every daemon named by the pid files at once, then wait (a daemon takes a second or two
# to shut down; one after the other that adds up), KILL what is left after 5 s
stop_pidfiles() {
  local check=$1 file pid pids=() left _
  shift
  for file in "$@"; do
    [ -f "$file" ] || continue
    pid=$(cat "$file" 2>/dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { [ "$check" = any ] || ours "$pid"; }; then
      kill "$pid" && pids+=("$pid")
    fi
  done
  for _ in $(seq 50); do
    left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; done
  rm -f "$@"
}

stop_pidfiles ours "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"

# earlier versions of slurm_up.sh linked /etc/slurm/slurm.conf to this folder's conf: remove only that link
[ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf

if [ "${1:-}" = --all ] && [ -f /run/munge/munged.pid ]; then
  stop_pidfiles any /run/munge/munged.pid
fi
exit 0
