#!/usr/bin/env bash
# Start a real single-host Slurm cluster (munge + slurmctld + slurmd) for tests and demos.
#
# Installs Debian's munge and slurm-wlm packages when missing (needs root and apt), writes a
# slurm.conf for this host with SLURM_TEST_NODES emulated nodes (1 or 2; default 2), and starts
# the daemons directly, without systemd. Idempotent: when the cluster already answers, it only
# prints the environment to use. Recipe: ../shared/research/anchors_jobsystem.md section 5.
#
#   scripts/slurm_up.sh            # start (or confirm) the cluster
#   eval "$(scripts/slurm_up.sh)"  # ... and export SLURM_CONF for this shell
#   scripts/slurm_down.sh          # stop it
#   scripts/slurm_up.sh --install-only   # only install the packages (CI, before the tests)
#
# Settings: SLURM_TEST_DIR (state, logs, conf; default /tmp/flashdmd-slurm), SLURM_TEST_NODES,
# SLURM_TEST_CPUS (per node; default 4), SLURM_TEST_PORT (slurmctld; slurmd ports follow; default:
# the first free ones from 16817 on).
# The cluster is this folder's: its daemons are the ones whose command line names its slurm.conf,
# and clients reach it only through SLURM_CONF. /etc/slurm is never read or written, so a site's
# own Slurm on the same machine is neither used nor touched.
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/flashdmd-slurm}
NODES=${SLURM_TEST_NODES:-2}
CPUS=${SLURM_TEST_CPUS:-4}
PORT=${SLURM_TEST_PORT:-16817}
CONF=$DIR/slurm.conf
MARK="# flashdmd test cluster"

log() { echo "slurm_up: $*" >&2; }
die() { log "$*"; exit 1; }
# exit status 77: Slurm cannot run on this machine at all (not installable); tests skip on it
cannot() { log "cannot run Slurm here: $*"; exit 77; }

case $NODES in 1|2) ;; *) die "SLURM_TEST_NODES must be 1 or 2, got '$NODES'";; esac

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  [ "$(id -u)" = 0 ] || cannot "slurm/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || cannot "slurm/munge are not installed and there is no apt-get to install them"
  log "installing munge and slurm-wlm from Debian"
  export DEBIAN_FRONTEND=noninteractive
  pkgs="munge slurmctld slurmd slurm-client"
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; } \
    || cannot "apt-get install $pkgs failed (no package mirror reachable?)"
fi

[ "${1:-}" = --install-only ] && exit 0

export SLURM_CONF=$CONF
# a pid file counts only while its process is one of this folder's daemons (pids get reused)
alive() { [ -f "$1" ] && tr '\0' ' ' < "/proc/$(cat "$1")/cmdline" 2>/dev/null | grep -qF -- "-f $CONF"; }
daemons_alive() {
  alive "$DIR/slurmctld.pid" || return 1
  local n=0 f
  for f in "$DIR"/slurmd-*.pid; do alive "$f" && n=$((n + 1)); done
  [ "$n" -ge "$NODES" ]
}
if [ -f "$CONF" ] && daemons_alive && timeout 10 sinfo -h >/dev/null 2>&1; then
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
[ "$(id -u)" = 0 ] || cannot "starting the daemons needs root"

# --- munge ----------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 755 /run/munge
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

# --- ports ----------------------------------------------------------------------------------
# slurmctld on PORT, slurmd(s) on the ones after it; another service (or another test cluster)
# holding any of them moves the whole block further up, unless SLURM_TEST_PORT asked for it
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
block_free() { local p; for p in $(seq "$1" $(($1 + 1 + NODES))); do listening "$p" && return 1; done; return 0; }
for _ in $(seq 50); do
  block_free "$PORT" && break
  [ -n "${SLURM_TEST_PORT:-}" ] && die "ports $PORT-$((PORT + 1 + NODES)) (SLURM_TEST_PORT) are in use; pick another SLURM_TEST_PORT"
  PORT=$((PORT + 10))
done
block_free "$PORT" || die "no free block of ports for slurmctld/slurmd found from ${SLURM_TEST_PORT:-16817} on"

# --- slurm.conf -----------------------------------------------------------------------------
HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # half the host's memory per node
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
{
  echo "$MARK (written by scripts/slurm_up.sh)"
  echo "ClusterName=flashdmd"
  echo "SlurmctldHost=$HOST(127.0.0.1)"
  echo "SlurmctldPort=$PORT"
  echo "SlurmdPort=$((PORT + 1))"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "AuthType=auth/munge"
  echo "CredType=cred/munge"
  # a requeued job waits cred_expire before it may start again (default 120 s; 5 is Slurm's minimum,
  # ample for a step launch on one host)
  echo "AuthInfo=cred_expire=5"
  echo "KillWait=5"
  echo "MinJobAge=300"
  echo "StateSaveLocation=$DIR/state"
  echo "SlurmdSpoolDir=$DIR/spool/%n"
  echo "SlurmctldPidFile=$DIR/slurmctld.pid"
  echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
  echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
  echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SwitchType=switch/none"
  echo "MpiDefault=none"
  echo "LaunchParameters=use_interactive_step"
  echo "SchedulerType=sched/backfill"
  # a pending job (a requeued one past its begin time, a dependent one) starts within a second
  echo "SchedulerParameters=sched_interval=1,bf_interval=1"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "JobAcctGatherType=jobacct_gather/none"
  echo "AccountingStorageType=accounting_storage/none"
  echo "JobCompType=jobcomp/none"
  echo "ReturnToService=2"
  echo "JobRequeue=1"
  echo "SlurmdParameters=config_overrides"
  echo "SlurmctldTimeout=30"
  echo "SlurmdTimeout=30"
  if [ "$NODES" = 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    echo "PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  else
    for i in $(seq "$NODES"); do
      echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 1 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  fi
} > "$CONF"

# --- daemons --------------------------------------------------------------------------------
"$(dirname "$0")/slurm_down.sh" --daemons-only >/dev/null 2>&1 || true
slurmctld -f "$CONF" -i || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
if [ "$NODES" = 1 ]; then
  slurmd -f "$CONF" || die "slurmd failed to start (see $DIR/log/slurmd-$HOST.log)"
else
  for i in $(seq "$NODES"); do slurmd -f "$CONF" -N "n$i" || die "slurmd n$i failed to start"; done
fi

for _ in $(seq 150); do
  idle=$(sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s += $1} END {print s + 0}')
  [ "$idle" -ge "$NODES" ] && break
  sleep 0.2
done
[ "${idle:-0}" -ge "$NODES" ] || { sinfo >&2 || true; die "nodes did not become idle (logs in $DIR/log)"; }
log "cluster up: $NODES node(s), partition debug, slurmctld port $PORT, conf $CONF"
echo "export SLURM_CONF=$CONF"
