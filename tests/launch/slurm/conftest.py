"""The real Slurm cluster for tests marked ``slurm``: one per test session, started by scripts/slurm_up.sh.

The session's cluster is identified by its own state folder and ports, never by whatever
/etc/slurm names: a fresh ``<tmp>/flashdmd-slurm-pytest-<pid>`` (free ports chosen by
slurm_up.sh), reached by every client through SLURM_CONF. A site's real Slurm on the same
machine is neither used nor touched. The cluster this session started is always stopped: at the
end of the session, at interpreter exit, and on SIGTERM or SIGHUP; one left behind by a session
that was killed outright (SIGKILL) is stopped by the next session's fixture. With SLURM_TEST_DIR
set to a folder whose cluster is already up (``SLURM_TEST_DIR=... scripts/slurm_up.sh`` by hand),
the tests use that one and leave it running.

The tests skip only when Slurm cannot run on this machine at all (the script exits 77: not
installed and not installable, or not root); any other start-up failure is an error.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
CANNOT_RUN = 77
SESSION_PREFIX = "flashdmd-slurm-pytest-"


def daemons_of(state_dir: Path) -> list[str]:
    """'pid: command line' of every slurmctld/slurmd started with ``state_dir``'s slurm.conf."""
    conf = f"-f {state_dir / 'slurm.conf'}"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended while we looked
            continue
        if conf in cmd and cmd.split(" ", 1)[0].rsplit("/", 1)[-1] in ("slurmctld", "slurmd"):
            found.append(f"{proc.name}: {cmd}")
    return found


def _script(name: str, state_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_TEST_DIR": str(state_dir)}
    env.pop("SLURM_CONF", None)
    return subprocess.run([str(ROOT / "scripts" / name)], env=env, capture_output=True, text=True, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stop_cluster(state_dir: Path, remove: bool = True) -> None:
    """Stop ``state_dir``'s daemons (scripts/slurm_down.sh) and, with ``remove``, delete the folder."""
    _script("slurm_down.sh", state_dir, timeout=120)
    if remove:
        shutil.rmtree(state_dir, ignore_errors=True)


def _sweep_leftovers(tmp: Path) -> None:
    """Clusters of earlier sessions whose pytest process is gone (killed before its clean-up ran)."""
    for folder in tmp.glob(SESSION_PREFIX + "*"):
        pid = folder.name.removeprefix(SESSION_PREFIX)
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            stop_cluster(folder)


def _stop_on_exit(stop: Callable[[], None]) -> Callable[[], None]:
    """Run ``stop`` at interpreter exit and on SIGTERM/SIGHUP (then the signal's previous action);
    returns the function that takes these hooks back."""
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame: object) -> None:
        stop()
        signal.signal(signum, previous[signum] or signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    atexit.register(stop)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: atexit and the finalizer still run
            pass

    def undo() -> None:
        atexit.unregister(stop)
        for sig, action in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, action or signal.SIG_DFL)

    return undo


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = []

    def run() -> None:
        if not done:
            done.append(True)
            fn()

    return run


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """Yields the environment (with SLURM_CONF) of a running 2-node cluster; stops it afterwards if it started it."""
    given = os.environ.get("SLURM_TEST_DIR")
    tmp = Path(tempfile.gettempdir())
    state_dir = Path(given) if given else tmp / f"{SESSION_PREFIX}{os.getpid()}"
    owned = not (given and (state_dir / "slurm.conf").exists() and daemons_of(state_dir))
    stop = undo = _once(lambda: None)
    if owned:
        _sweep_leftovers(tmp)
        stop = _once(lambda: stop_cluster(state_dir, remove=not given))
        undo = _stop_on_exit(stop)  # before starting: an interrupt during start-up stops what did start
    previous = os.environ.get("SLURM_CONF")
    try:
        out = _script("slurm_up.sh", state_dir, timeout=600)
        if out.returncode == CANNOT_RUN:
            pytest.skip(out.stderr.strip().splitlines()[-1])
        assert out.returncode == 0, f"scripts/slurm_up.sh failed:\n{out.stderr}"
        os.environ["SLURM_CONF"] = out.stdout.strip().split("=", 1)[1]
        sys.path.insert(0, str(HERE))  # probe_job, for the launcher's entry
        yield dict(os.environ)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stop()
        undo()
