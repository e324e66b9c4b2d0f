"""Checkpoints are never unpickled (checked on the source tree, by the AST, not
by a grep that a line break defeats); a checkpoint of another family or config is refused with a
message that says what differs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import scenarios

from flashdmd.config import REPO_ROOT, load_config
from flashdmd.train.compat import IncompatibleCheckpoint, check_resume, checkpoint_identity

SOURCES = [REPO_ROOT / "flashdmd", REPO_ROOT / "jobs", REPO_ROOT / "data_tools"]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
              ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("torch", "load")}


def _unsafe_calls(path: Path, root: Path = REPO_ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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
    return found


def test_no_source_file_unpickles():
    files = [p for root in SOURCES for p in root.rglob("*.py")]
    assert len(files) > 30
    unsafe = [hit for path in files for hit in _unsafe_calls(path)]
    assert not unsafe, unsafe
    assert not any("import pickle" in p.read_text() or "from pickle" in p.read_text() for p in files)


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle\ntorch.load(\n  'x')\ntorch.load('y', weights_only=False)\npickle.loads(b'')\n"
                   "torch.load('z', weights_only=True)\n")
    assert _unsafe_calls(bad, tmp_path) == ["bad.py:2 torch.load", "bad.py:4 torch.load", "bad.py:5 pickle.loads"]


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
