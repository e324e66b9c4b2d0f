#!/usr/bin/env bash
# The main job on the tiny default preset, on this machine's CPU: install (pip runs only when
# something changed), make the toy shards (once), then run stage 1 of tiny-sdxl and print where
# its results are.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
PYTHON=${PYTHON:-python3}
if [ ! -f runs/data/toy-000007.tar ]; then
  $PYTHON data_tools/make_toy_shards.py runs/data --count 256 --per-shard 32 --size 64
fi
$PYTHON jobs/submit.py stage1 --config tiny-sdxl --executor local "$@"
