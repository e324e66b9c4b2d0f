#!/usr/bin/env bash
# Install flashdmd (editable) and everything its tests need, at the versions the suite was tested
# with: constraints/tested.txt (written by scripts/lock_versions.py). One line per step, then pip's
# own output. When nothing changed since the last install (setup.cfg, pyproject.toml, the lock, the
# mode, this checkout and the environment's installed packages), pip is not run at all.
#
#   scripts/install.sh            # the locked versions: what CI tests
#   scripts/install.sh --latest   # the newest versions setup.cfg allows (same as FLASHDMD_UNLOCKED=1)
#   scripts/install.sh --force    # run pip even when nothing changed
#
# PYTHON picks the interpreter (default python3). An installed torch is kept as it is (a cluster's
# CUDA build); the lock's torch pin is for machines that have none yet (CPU test machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=constraints/tested.txt
mode=locked
force=0
[ "${FLASHDMD_UNLOCKED:-0}" = 1 ] && mode=latest
for arg in "$@"; do
  case $arg in
    --latest) mode=latest ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,13p' "$0" | cut -c3-; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (options: --latest, --force, --help)" >&2; exit 2 ;;
  esac
done
step() { echo "install.sh: $*"; }

# The state that decides whether pip must run. site-packages' own mtime changes whenever pip adds,
# removes or upgrades a distribution there, so a package changed by hand also triggers a reinstall.
state() {
  "$PYTHON" - "$mode" <<'EOF'
import hashlib, os, sys, sysconfig
from pathlib import Path
h = hashlib.sha256()
for name in ("setup.cfg", "pyproject.toml", "constraints/tested.txt"):
    h.update(Path(name).read_bytes())
site = sysconfig.get_paths()["purelib"]
where = f"{os.getcwd()} {sys.prefix}"
h.update(f"{sys.argv[1]} {where} {os.stat(site).st_mtime_ns}".encode())
print(hashlib.sha256(where.encode()).hexdigest()[:16], h.hexdigest())
EOF
}

read -r env_id key < <(state)
stamp_dir=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/flashdmd
stamp=$stamp_dir/install-$env_id.stamp
if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  step "nothing changed since the last install ($mode versions, $("$PYTHON" -c 'import sys; print(sys.prefix)')); pip skipped (--force runs it)"
  exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
torch_version=$("$PYTHON" -c 'import importlib.metadata as m
try: print(m.version("torch"))
except m.PackageNotFoundError: pass')
if [ "$mode" = locked ]; then
  grep -v '^torch==' "$LOCK" > "$constraints"
  pin_note="versions from $LOCK"
else
  : > "$constraints"
  pin_note="the newest versions setup.cfg allows (unlocked)"
fi
if [ -n "$torch_version" ]; then
  step "keeping the installed torch $torch_version"
  echo "torch==$torch_version" >> "$constraints"
else
  [ "$mode" = locked ] && grep '^torch==' "$LOCK" >> "$constraints"
  step "installing torch first ($pin_note; a GPU cluster installs its own CUDA build before this script)"
  "$PYTHON" -m pip install -c "$constraints" torch
fi

step "installing flashdmd (editable) with its test and lora extras: $pin_note"
upgrade=()
[ "$mode" = latest ] && upgrade=(--upgrade --upgrade-strategy eager)
"$PYTHON" -m pip install "${upgrade[@]}" -c "$constraints" -e ".[test,lora]"

# Inception FID's reference implementation: torch-fidelity declares torchvision, which has no build
# for the CPU torch wheel (pip would swap torch for a CUDA build), and never imports it for FID.
if "$PYTHON" -c 'import torchvision' 2>/dev/null; then
  step "installing torch-fidelity (Inception FID) with its dependencies"
  "$PYTHON" -m pip install -c "$constraints" "torch-fidelity==0.4.0"
else
  step "installing torch-fidelity (Inception FID) without torchvision, which this torch has no build of"
  "$PYTHON" -m pip install --no-deps "torch-fidelity==0.4.0"
fi

step "comparing the installed versions with $LOCK"
if "$PYTHON" scripts/lock_versions.py --check; then
  step "installed versions match the lock"
else
  step "the versions above differ from the lock (expected with --latest or a site's own torch)"
fi
mkdir -p "$stamp_dir"
read -r _ key < <(state)
echo "$key" > "$stamp"
step "done; the next run skips pip until something changes"
