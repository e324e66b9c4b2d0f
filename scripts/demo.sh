#!/usr/bin/env bash
# The main job on the tiny default preset, on this machine's CPU: install, then run stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
${PYTHON:-python3} jobs/submit.py stage1 --config tiny-sdxl "$@"
