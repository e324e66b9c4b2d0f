# Shared environment for slurm/*.sbatch (sourced, not run). Defines flashdmd_run JOB [ARGS...].
#
# FLASHDMD_ROOT   the repository (default: the directory sbatch was called from)
# FLASHDMD_VENV   a virtual environment to activate first (optional)
# PYTHON          the interpreter (default: python3)
# The working directory stays the submission directory, so a relative run_root resolves there
# for every requeue of the job.

FLASHDMD_ROOT=${FLASHDMD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$FLASHDMD_ROOT/flashdmd/config.py" ]; then
  echo "slurm/env.sh: $FLASHDMD_ROOT is not the flashdmd repository; submit from its root or set FLASHDMD_ROOT" >&2
  exit 2
fi
if [ -n "${FLASHDMD_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$FLASHDMD_VENV/bin/activate"
fi
export PYTHONPATH="$FLASHDMD_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# one task per GPU: its CPU threads are the task's own cores, not the whole node's
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
PYTHON=${PYTHON:-python3}

# srun one task per allocated task slot (= per GPU); every task runs the same entry point, which
# reads its rank from SLURM_* (flashdmd/infra/distributed.py). --kill-on-bad-exit: one failing rank
# ends the step instead of leaving the others waiting in a collective until the timeout.
flashdmd_run() {
  local job=$1
  shift
  echo "flashdmd: job $SLURM_JOB_ID ($job), restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks"
  srun --kill-on-bad-exit=1 --unbuffered "$PYTHON" -u -m flashdmd.train --job "$job" "$@"
}
