"""Bad jobs are refused before submission (100 mutated presets, and the preflight's file-system and
stage-2 checks), with a clear error naming the thing to fix and never a traceback; good jobs pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import scenarios

from flashdmd.apps.preflight import preflight_all, preflight_problems
from flashdmd.config import ConfigError, load_config
from flashdmd.config.sources import is_local_path
from flashdmd.nets.families import get_family
from flashdmd.nets.load import LayoutError, resolve_source

ROOT = Path(__file__).resolve().parents[2]


def test_hundred_mutated_configs_fail_clearly_before_submission(tmp_path):
    row, results = scenarios.bad_configs(tmp_path)
    assert len(results) == 100
    assert len({(r["config"], tuple(r["overrides"])) for r in results}) == 100  # all distinct
    categories = Counter(r["category"] for r in results)
    assert set(categories) == {"wrong type", "unknown key", "out of range", "inconsistent timesteps", "missing path", "bad file"}
    assert all(n >= 6 for n in categories.values()), categories
    assert {r["config"] for r in results} >= set(scenarios.PRESETS[1:])  # every preset is mutated
    tracebacks = [r for r in results if r["caught_by"] in ("TRACEBACK", "nothing")]
    assert not tracebacks, tracebacks[:3]
    unclear = [r for r in results if not r["clear"]]
    assert not unclear, unclear[:3]
    assert not row.data_lost


def pipeline_folder(root: Path, family: str = "sdxl", drop: str = "") -> Path:
    """A folder with the layout (model_index.json + subfolders) a family's loader checks, weights left out."""
    fam = get_family(family)
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": fam.pipeline_class}))
    for sub in [fam.denoiser_folder, "vae", *fam.text_folders, *(f.replace("text_encoder", "tokenizer") for f in fam.text_folders)]:
        if sub != drop:
            (root / sub).mkdir()
    return root


@pytest.fixture
def shard(tmp_path: Path) -> str:
    (tmp_path / "a-000000.tar").write_bytes(b"")
    return f"data.shards={tmp_path}/a-{{000000..000000}}.tar"


def test_preflight_passes_existing_inputs_and_names_missing_ones(tmp_path, shard):
    teacher = pipeline_folder(tmp_path / "teacher")
    cfg = load_config("sdxl-4step", [shard, f"model.teacher={teacher}"])
    assert preflight_problems(cfg, "stage1") == []
    assert preflight_problems(cfg, "export") == []
    hub = load_config("sdxl-4step", [f"data.shards={tmp_path}"])
    assert preflight_problems(hub, "stage1") == []  # a hub id is not probed; a shard directory is expanded
    missing = load_config("tiny-sdxl", [f"data.shards={tmp_path}/none-{{0..1}}.tar", "stage2.init_from=/nope"])
    problems = preflight_problems(missing, "stage2")
    assert len(problems) == 2 and "none of its 2 shard files exist" in problems[0] and "stage2.init_from='/nope'" in problems[1]


def test_preflight_of_a_pipeline_waits_for_stage1_output(tmp_path):
    shards = tmp_path / "s-000000.tar"
    shards.write_bytes(b"")
    stage1 = load_config("tiny-sdxl", [f"data.shards={shards}"])
    stage2 = load_config("tiny-sdxl", [f"data.shards={shards}", f"stage2.init_from={tmp_path}/not-yet"])
    preflight_all([("stage1", stage1), ("stage2", stage2)])  # stage 1 writes init_from
    with pytest.raises(ConfigError, match="stage2.init_from="):
        preflight_all([("stage2", stage2)])


def test_teacher_folder_must_hold_the_family_layout(tmp_path, shard):
    no_unet = pipeline_folder(tmp_path / "a", drop="unet")
    problems = preflight_problems(load_config("sdxl-4step", [shard, f"model.teacher={no_unet}"]), "stage1")
    assert len(problems) == 1 and "lacks unet/" in problems[0] and "model.teacher" in problems[0]
    sd3 = pipeline_folder(tmp_path / "b", family="sd3")
    problems = preflight_problems(load_config("sdxl-4step", [shard, f"model.teacher={sd3}"]), "stage1")
    assert len(problems) == 1 and "family 'sd3'" in problems[0]


def test_a_file_where_a_folder_is_expected_says_so(tmp_path, shard):
    weights = tmp_path / "sam.safetensors"
    weights.write_bytes(b"")
    problems = preflight_problems(load_config("sdxl-4step", [shard, f"model.sam={weights}"]), "stage1")
    assert problems == [f"model.sam={str(weights)!r}: is a file, but this local model folder must be a folder"]
    with pytest.raises(LayoutError, match="is a file, not a folder"):
        resolve_source(str(weights), "model.sam", "a SAM folder")


@pytest.mark.parametrize("value,local", [("lrm_sdxl", True), ("a/b/c", True), ("./x", True), ("~/x", True),
                                         ("/abs/x", True), ("file:x", True), ("org/x.safetensors", True),
                                         ("org/name", False), ("Kwai-Kolors/LPO_v1.0", False), ("a/..b", True)])
def test_one_rule_for_hub_ids_and_local_paths(tmp_path, shard, value, local):
    """The preflight probes exactly what the loader reads from disk; a hub id is neither probed nor read from disk."""
    assert is_local_path(value) is local
    problems = preflight_problems(load_config("sdxl-4step", [shard, f"model.reward_model={value}"]), "stage1")
    assert bool(problems) is local
    if local:
        with pytest.raises(LayoutError, match="does not exist"):
            resolve_source(value, "model.reward_model", "an LRM folder")


def handoff(run_dir: Path, **meta: object) -> Path:
    (run_dir / "final").mkdir(parents=True)
    full = {"family": "tiny-sdxl", "step": 20, "student_timesteps": [999, 749, 499, 249], "lora": False,
            "networks": ["generator"], **meta}
    (run_dir / "final" / "handoff.json").write_text(json.dumps(full))
    return run_dir


def test_stage2_needs_a_fitting_stage1_handoff(tmp_path, shard):
    empty = preflight_problems(load_config("tiny-sdxl", [shard]), "stage2")
    assert len(empty) == 1 and empty[0].startswith("stage2.init_from is empty")
    good = handoff(tmp_path / "good")
    assert preflight_problems(load_config("tiny-sdxl", [shard, f"stage2.init_from={good}"]), "stage2") == []
    other = handoff(tmp_path / "other", family="tiny-sd15", student_timesteps=[999, 499])
    problems = preflight_problems(load_config("tiny-sdxl", [shard, f"stage2.init_from={other}"]), "stage2")
    assert len(problems) == 1 and "does not fit this config" in problems[0]
    assert "model.family='tiny-sdxl' but stage 1 ran with 'tiny-sd15'" in problems[0]
    assert "stage1.student_timesteps=[999, 749, 499, 249] but stage 1 ran with [999, 499]" in problems[0]


def test_stage2_needs_a_reward_model_and_a_transition(tmp_path, shard):
    run = handoff(tmp_path / "run", family="sdxl")
    problems = preflight_problems(load_config("sdxl-4step", [shard, f"stage2.init_from={run}"]), "stage2")
    assert len(problems) == 1 and problems[0].startswith("model.reward_model is empty")
    one_step = ["stage1.student_timesteps=[999]", "stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage2.rl_transitions=[]"]
    cfg = load_config("tiny-sdxl", [shard, *one_step, f"stage2.init_from={handoff(tmp_path / 'one')}"])
    assert preflight_problems(cfg, "stage1") == []  # a 1-step student trains in stage 1
    problems = preflight_problems(cfg, "stage2")
    assert any("stage 2 needs a student of 2 or more steps" in p for p in problems)


def test_snr_rule_without_a_dm_step_is_refused_before_the_run(shard):
    cfg = load_config("tiny-sdxl", [shard, "stage1.student_timesteps=[249]", "stage1.dm_steps=[]",
                                    "stage1.gan_steps=[]", "stage2.rl_transitions=[]"])
    problems = preflight_problems(cfg, "stage1")
    assert len(problems) == 1 and "no student step gets the DM loss" in problems[0]


def submit(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "submit.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_stage2_dry_run_without_stage1_names_init_from(tmp_path):
    out = submit("stage2", "--config", "tiny-sdxl", "--dry-run", f"run_root={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "stage2.init_from is empty" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was submitted or written


def test_local_executor_refuses_slurm_settings(tmp_path):
    out = submit("stage1", "--config", "gmm2d", "--executor", "local", "--nodes", "4", "--dry-run", f"run_root={tmp_path}")
    assert out.returncode == 2 and "launch.nodes > 1 needs launch.executor=slurm" in out.stderr
    out = submit("stage1", "--config", "gmm2d", "--executor", "auto", "--nodes", "4", "--dry-run", f"run_root={tmp_path}",
                 path=str(tmp_path))  # auto without sbatch on PATH resolves to local
    assert out.returncode == 2 and "launch.nodes=4: needs the Slurm executor" in out.stderr
    assert "Traceback" not in out.stderr
