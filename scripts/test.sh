#!/usr/bin/env bash
# Install (scripts/install.sh: the locked versions; skips pip when nothing changed), then run the tests.
#
#   ./scripts/test.sh               # the full suite: what CI runs (.ci/run)
#   ./scripts/test.sh --fast        # the fast suite: everything not marked slow
#   ./scripts/test.sh --latest ...  # against the newest versions setup.cfg allows, not the lock
#
# Other arguments go to pytest (e.g. ./scripts/test.sh --fast tests/data -x). PYTHON picks the
# interpreter (default python3), e.g. PYTHON=.venv/bin/python ./scripts/test.sh --fast.
set -euo pipefail
cd "$(dirname "$0")/.."
install=()
marks=()
args=()
for arg in "$@"; do
  case $arg in
    --fast) marks=(-m "not slow") ;;
    --latest) install=(--latest) ;;
    *) args+=("$arg") ;;
  esac
done
./scripts/install.sh "${install[@]}"
exec "${PYTHON:-python3}" -m pytest -q "${marks[@]}" "${args[@]}"
