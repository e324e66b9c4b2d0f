"""The Slurm fixture (tests/launch/slurm/conftest.py) stops what it started, whatever way the session ends.

Each case runs an inner pytest session whose one test uses ``slurm_cluster``, checks that the
cluster answers, writes its SLURM_CONF to a file, and then fails, is terminated (SIGTERM) or is
killed (SIGKILL) mid-test. Afterwards no slurmctld or slurmd started with that session's
slurm.conf may be left (found with pgrep, independently of the fixture's own bookkeeping), and
the site path /etc/slurm/slurm.conf must not point at it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# the inner session gets the very fixture under test, loaded from its file
INNER_CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("slurm_fixture", {str(Path(__file__).with_name("conftest.py"))!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
slurm_cluster = module.slurm_cluster
"""
INNER_TEST = '''
import os, subprocess, time
from pathlib import Path

def test_uses_the_cluster_then_ends_badly(slurm_cluster):
    out = subprocess.run(["sinfo", "-h", "-o", "%D %t"], env=slurm_cluster, capture_output=True, text=True, timeout=60)
    assert "2 idle" in out.stdout, out
    Path(os.environ["CONF_FILE"]).write_text(slurm_cluster["SLURM_CONF"])
    if os.environ.get("HANG"):
        time.sleep(600)
    assert os.environ.get("PASS"), "the failure this test is about"
'''


def _inner(tmp_path: Path, name: str, **env: str) -> tuple[subprocess.Popen, Path]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "conftest.py").write_text(INNER_CONFTEST)
    (folder / "test_inner.py").write_text(INNER_TEST)
    conf_file = folder / "conf.txt"
    clean = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "SLURM_TEST_DIR", "PYTEST_ADDOPTS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder), str(folder)],
        cwd=folder, env={**clean, "PYTHONPATH": str(ROOT), "CONF_FILE": str(conf_file), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc, conf_file


def _left_behind(conf: str) -> str:
    out = subprocess.run(["pgrep", "-a", "-f", f"slurm(ctld|d) -f {conf}"], capture_output=True, text=True)
    return out.stdout.strip()


def _skip_if_slurm_cannot_run(output: str) -> None:
    if " skipped" in output and " failed" not in output and " passed" not in output:
        pytest.skip("Slurm cannot run here: " + output.strip().splitlines()[-1])


def _assert_cleaned(conf: str) -> None:
    assert _left_behind(conf) == "", "daemons of the inner session's cluster are still running"
    assert not Path(conf).exists(), "the inner session's state folder was not removed"
    etc = Path("/etc/slurm/slurm.conf")
    assert not (etc.is_symlink() and os.readlink(etc) == conf)


def test_a_failing_test_leaves_no_daemon_behind(tmp_path):
    proc, conf_file = _inner(tmp_path, "fails")
    output = proc.communicate(timeout=600)[0]
    _skip_if_slurm_cannot_run(output)
    assert proc.returncode == 1 and "1 failed" in output, output
    assert "the failure this test is about" in output
    _assert_cleaned(conf_file.read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_session_stops_its_cluster(tmp_path, sig):
    proc, conf_file = _inner(tmp_path, "interrupted", HANG="1")
    try:
        wait_for(lambda: conf_file.exists() or proc.poll() is not None, 300, "the inner test to reach its cluster")
        if proc.poll() is not None:
            output = proc.communicate()[0]
            _skip_if_slurm_cannot_run(output)
            pytest.fail(f"the inner session ended before its test ran:\n{output}")
        conf = conf_file.read_text()
        assert _left_behind(conf), "the inner session's cluster should be up while its test runs"
        proc.send_signal(sig)
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output
    _assert_cleaned(conf)


def test_the_next_session_stops_the_cluster_of_a_killed_one(tmp_path):
    killed, conf_file = _inner(tmp_path, "killed", HANG="1")
    try:
        wait_for(lambda: conf_file.exists() or killed.poll() is not None, 300, "the inner test to reach its cluster")
        if killed.poll() is not None:
            output = killed.communicate()[0]
            _skip_if_slurm_cannot_run(output)
            pytest.fail(f"the inner session ended before its test ran:\n{output}")
        killed.kill()  # SIGKILL: no clean-up of its own can run
        killed.wait(timeout=60)
        conf = conf_file.read_text()
        time.sleep(0.5)
        assert _left_behind(conf), "SIGKILL leaves the daemons: this is what the next session must sweep"
    finally:
        if killed.poll() is None:
            killed.kill()
    nxt, _ = _inner(tmp_path, "next", PASS="1")
    output = nxt.communicate(timeout=600)[0]
    assert nxt.returncode == 0 and "1 passed" in output, output
    _assert_cleaned(conf)
