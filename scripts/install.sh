#!/usr/bin/env bash
# Install flashdmd and everything its tests need. Keeps an already installed torch (a cluster's
# CUDA build); otherwise installs torch 2.13.0 first so nothing pulls a CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
$PYTHON -c "import torch" 2>/dev/null || $PYTHON -m pip install --quiet torch==2.13.0
$PYTHON -m pip install --quiet -e ".[test,lora]"
