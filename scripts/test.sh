#!/usr/bin/env bash
# Install everything (services included), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
${PYTHON:-python3} -m pytest -q "$@"
