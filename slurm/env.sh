# Shared environment for slurm/*.sbatch (sourced, not run). Defines flashdmd_run JOB [ARGS...].
#
# FLASHDMD_ROOT   the repository (default: the directory sbatch was called from)
# FLASHDMD_VENV   a virtual environment to activate first (optional)
# PYTHON          the interpreter (default: python3)
# The working directory stays the submission directory, so a relative run_root resolves there
# for every requeue of the job.

FLASHDMD_ROOT=${FLASHDMD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$FLASHDMD_ROOT/flashdmd/train/main.py" ]; then
  echo "slurm/env.sh: $FLASHDMD_ROOT is not the flashdmd repository; submit from its root or set FLASHDMD_ROOT" >&2
  exit 2
fi
if [ -n "${FLASHDMD_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$FLASHDMD_VENV/bin/activate"
fi
export PYTHONPATH="$FLASHDMD_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

# Tasks per node: one per allocated GPU when the job has GPUs (sbatch --gpus-per-node=G), else the
# job's --ntasks-per-node (CPU clusters; default 1). Each task gets an equal share of the node's
# CPUs, and launch.executor / nodes / gpus_per_node are set to what was allocated, so the run's
# config and MLflow tags say what ran.
flashdmd_tasks_per_node() {
  local gpus=${SLURM_GPUS_ON_NODE:-0}
  case $gpus in ''|*[!0-9]*) gpus=0 ;; esac
  if [ "$gpus" -gt 0 ]; then
    echo "$gpus"
  else
    echo "${SLURM_NTASKS_PER_NODE:-1}" | cut -d'(' -f1 | cut -d, -f1
  fi
}

# srun one task per GPU (or per task slot on CPU); every task runs the same entry point, which reads
# its rank from SLURM_* (flashdmd/infra/distributed.py). --kill-on-bad-exit: one failing rank ends
# the step instead of leaving the others waiting in a collective until the timeout.
#
# srun runs in the background and the batch shell waits for it, with a trap that forwards USR1,
# USR2 and TERM to it (srun passes them on to every task): `scancel --signal=USR1 --batch`, or a
# site's `--signal=B:USR1@N`, then saves and requeues like `scancel --signal=USR1`, instead of
# killing the batch shell. `wait` returns early on each trapped signal, hence the loop.
flashdmd_run() {
  local job=$1
  shift
  local nodes=${SLURM_JOB_NUM_NODES:-1}
  local tasks
  tasks=$(flashdmd_tasks_per_node)
  local cpus=${SLURM_CPUS_ON_NODE:-$tasks}
  local cpus_per_task=$(( cpus / tasks > 0 ? cpus / tasks : 1 ))
  local overcommit=()
  [ "$cpus" -lt "$tasks" ] && overcommit=(--overcommit)  # fewer CPUs than GPUs asked for: share them
  # one task's CPU threads are its own cores, not the whole node's
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}
  echo "flashdmd: job $SLURM_JOB_ID ($job), restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST," \
       "$((nodes * tasks)) tasks ($tasks per node, $cpus_per_task CPUs each)"
  srun --kill-on-bad-exit=1 --unbuffered --nodes="$nodes" --ntasks-per-node="$tasks" --ntasks="$((nodes * tasks))" \
       --cpus-per-task="$cpus_per_task" "${overcommit[@]}" \
       "$PYTHON" -u -m flashdmd.train --job "$job" "$@" launch.executor=slurm launch.nodes="$nodes" launch.gpus_per_node="$tasks" &
  local step=$!
  local sig
  for sig in USR1 USR2 TERM; do
    # shellcheck disable=SC2064  # the step's pid is fixed now
    trap "echo 'flashdmd: batch shell got $sig; forwarding it to the job step' >&2; kill -$sig $step 2>/dev/null" "$sig"
  done
  local status=0
  while :; do
    wait "$step" && status=0 || status=$?
    kill -0 "$step" 2>/dev/null || break
  done
  trap - USR1 USR2 TERM
  return "$status"
}
