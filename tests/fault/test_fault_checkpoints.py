"""Checkpoints are never unpickled (checked on the source tree, by the AST, not
by a grep that a line break defeats); a checkpoint of another family or config is refused with a
message that says what differs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import scenarios

from flashdmd.config import REPO_ROOT, load_config
from flashdmd.train.compat import IncompatibleCheckpoint, check_resume, checkpoint_identity

SOURCES = [REPO_ROOT / "flashdmd", REPO_ROOT / "jobs", REPO_ROOT / "data_tools"]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
              ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("torch", "load")}


def _unsafe_calls(path: Path, root: Path = REPO_ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            # ``from pickle import loads`` hides the owner from the call check below
            found += [f"{path.relative_to(root)}:{node.lineno} from {node.module} import {alias.name}"
                      for alias in node.names if (node.module, alias.name) in UNPICKLERS]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if (owner, node.func.attr) in UNPICKLERS:
            safe = owner == "torch" and isinstance(keywords.get("weights_only"), ast.Constant) \
                and keywords["weights_only"].value is True
            if not safe:
                found.append(f"{path.relative_to(root)}:{node.lineno} {owner}.{node.func.attr}")
        if node.func.attr == "load" and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{path.relative_to(root)}:{node.lineno} np.load(allow_pickle=True)")
    return sorted(found, key=lambda hit: int(hit.split(":")[1].split()[0]))


def test_no_source_file_unpickles():
    files = [p for root in SOURCES for p in root.rglob("*.py")]
    assert len(files) > 30
    unsafe = [hit for path in files for hit in _unsafe_calls(path)]
    assert not unsafe, unsafe


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle\ntorch.load(\n  'x')\ntorch.load('y', weights_only=False)\npickle.loads(b'')\n"
                   "torch.load('z', weights_only=True)\nfrom pickle import UnpicklingError, loads\n")
    assert _unsafe_calls(bad, tmp_path) == ["bad.py:2 torch.load", "bad.py:4 torch.load", "bad.py:5 pickle.loads",
                                            "bad.py:7 from pickle import loads"]


def test_check_resume_names_every_difference():
    cfg = load_config("tiny-sd3")
    trainer = checkpoint_identity(cfg, "stage1")
    check_resume(trainer, cfg, "stage1", "ckpt")  # its own identity passes
    check_resume({"family": cfg.model.family, "job": "stage1"}, cfg, "stage1", "ckpt")  # older checkpoints: keys absent
    other = load_config("tiny-sd3", ["model.lora.enabled=true", f"model.lora.rank={cfg.model.lora.rank + 1}"])
    with pytest.raises(IncompatibleCheckpoint) as err:
        check_resume({**trainer, "job": "stage2"}, other, "stage1", "ckpt")
    message = str(err.value)
    assert "job: checkpoint 'stage2' != this run 'stage1'" in message
    assert "lora: checkpoint {'enabled'" in message and f"'rank': {cfg.model.lora.rank + 1}" in message
    assert "family" not in message and "student_timesteps" not in message


def test_foreign_checkpoints_are_refused_in_the_trainer(tmp_path, gmm_cache):
    row = scenarios.foreign_checkpoint(tmp_path, gmm_cache)
    assert not row.data_lost and "FAILED" not in row.outcome, row


def test_a_file_write_killed_midway_keeps_the_previous_file(tmp_path):
    """SIGKILL inside an atomic write (the path every map, rank file, buffer file and hand-over
    weight file takes): the file keeps its previous content and stays readable."""
    import subprocess
    import sys
    import textwrap

    from flashdmd.engine.state_io import load_json

    target = tmp_path / "generator.map.json"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from flashdmd.engine.state_io import atomic_write, save_json
        path = Path({str(target)!r})
        save_json(path, {{"version": 1}})
        with atomic_write(path) as tmp:
            tmp.write_text('{{"version": 2, "tensors": {{"half a')
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert load_json(target) == {"version": 1}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_zero3_save_killed_after_its_new_files_leaves_the_previous_step_readable(tmp_path):
    """Every rank killed after ZeRO-3's files of step 2 (rank partitions, buffers, maps, DeepSpeed's
    own layout) and before the marker: step 1 is what every reader and a resume take, the
    consolidation refuses the partial step with one line."""
    from engine_world import killed_save_run, load_latest_run, run_ranks
    from safetensors.torch import load_file
    from torch.multiprocessing import ProcessExitedException

    from flashdmd.apps.consolidate import cli as consolidate_cli
    from flashdmd.engine.checkpoint_reader import CheckpointReader
    from flashdmd.train.checkpoint import is_valid, latest_valid, step_dir

    ckpt = tmp_path / "ckpt"
    with pytest.raises(ProcessExitedException, match="terminated with signal"):
        run_ranks(2, killed_save_run, "deepspeed", str(ckpt), tmp=tmp_path)
    partial = step_dir(ckpt, 2)
    assert (partial / "generator.map.json").is_file() and (partial / "generator" / "latest").is_file()
    assert not is_valid(partial) and latest_valid(ckpt) == step_dir(ckpt, 1)
    expected = load_file(str(ckpt / "step1-weights.safetensors"))
    read = CheckpointReader(step_dir(ckpt, 1)).state_dict("generator")
    assert all(torch.equal(v, expected[f"w.generator.{k}"]) for k, v in read.items())
    assert consolidate_cli([str(partial), str(tmp_path / "out")]) == 2
    assert consolidate_cli([str(step_dir(ckpt, 1)), str(tmp_path / "out")]) == 0
    loaded = run_ranks(2, load_latest_run, "deepspeed", str(ckpt), tmp=tmp_path)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
