"""The training entry point end to end on CPU: runs, resume, MLflow record, stage-1 -> stage-2 hand-over."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from flashdmd.config import REPO_ROOT, Config, load_config
from flashdmd.train.main import main


def gmm_cfg(root: Path, cache: Path, name: str, *overrides: str) -> Config:
    cfg = load_config("gmm2d", [
        f"run_root={root}", f"name={name}", f"model.cache_dir={cache}", "model.gmm.teacher_steps=300",
        "data.batch_size=64", "stage1.iterations=6", "stage2.iterations=6", "checkpoint.every=3",
        "tracking.log_every=1", "tracking.sample_every=3", *overrides,
    ])
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def generator_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "generator.safetensors"))


def test_gmm_stage1_records_run_and_hands_over(root: Path, cache: Path):
    cfg = gmm_cfg(root, cache, "s1")
    folder = main(cfg, "stage1")
    meta = json.loads((folder / "handoff.json").read_text())
    assert meta["step"] == 6 and meta["family"] == "gmm2d"
    steps = sorted(int(p.name.split("-")[1]) for p in cfg.checkpoint_dir.iterdir())
    assert steps == [3, 6]  # keep_last prunes nothing here; markers make both valid
    run = client(root).get_run(meta["mlflow_run_id"])
    assert run.data.params["stage1.ttur"] == str(cfg.stage1.ttur)
    assert run.data.tags["family"] == "gmm2d"
    history = client(root).get_metric_history(run.info.run_id, "loss/fake")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client(root).get_metric_history(run.info.run_id, "eval/sw2")] == [3, 6]
    # TTUR: the generator steps on every ttur-th iteration, the fake score and D on every one
    assert run.data.metrics["updates/generator"] == 6 // cfg.stage1.ttur
    assert run.data.metrics["updates/fake_score"] == run.data.metrics["updates/discriminator"] == 6
    artifacts = {a.path for a in client(root).list_artifacts(run.info.run_id)}
    assert any("config" in a for a in artifacts)


def test_resume_equals_uninterrupted(root: Path, cache: Path):
    cfg = gmm_cfg(root, cache, "run")
    main(cfg, "stage1")
    uninterrupted = generator_weights(cfg.run_dir)
    first_run = json.loads((cfg.run_dir / "final" / "handoff.json").read_text())["mlflow_run_id"]
    # as if the run had died after the checkpoint of step 3: newer state gone, then the same command again
    shutil.rmtree(cfg.checkpoint_dir / "step-00000006")
    shutil.rmtree(cfg.run_dir / "final")
    main(gmm_cfg(root, cache, "run"), "stage1")
    resumed = generator_weights(cfg.run_dir)
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key  # bitwise: the local engine restores everything
    meta = json.loads((cfg.run_dir / "final" / "handoff.json").read_text())
    assert meta["mlflow_run_id"] == first_run  # the same MLflow run continues
    history = client(root).get_metric_history(first_run, "loss/fake")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # no duplicated steps
    assert json.loads((cfg.checkpoint_dir / "step-00000006" / "trainer.json").read_text())["updates"]["fake_score"] == 6


def test_stage2_starts_from_stage1_and_links_runs(root: Path, cache: Path):
    s1 = gmm_cfg(root, cache, "pipe-s1")
    main(s1, "stage1")
    s2 = gmm_cfg(root, cache, "pipe-s2", f"stage2.init_from={s1.run_dir}", "stage2.rl_per_dm=2")
    folder = main(s2, "stage2")
    parent = json.loads((s1.run_dir / "final" / "handoff.json").read_text())["mlflow_run_id"]
    child = json.loads((folder / "handoff.json").read_text())["mlflow_run_id"]
    tags = client(root).get_run(child).data.tags
    assert tags.get("mlflow.parentRunId") == parent
    keys = client(root).get_run(child).data.metrics.keys()
    assert any("rl" in k or "lpo" in k for k in keys), sorted(keys)


def test_stage2_refuses_another_family(root: Path, cache: Path):
    s1 = gmm_cfg(root, cache, "fam-s1", "stage1.iterations=3")
    main(s1, "stage1")
    meta_path = s1.run_dir / "final" / "handoff.json"
    meta = json.loads(meta_path.read_text())
    meta["family"] = "tiny-sdxl"
    meta_path.write_text(json.dumps(meta))
    s2 = gmm_cfg(root, cache, "fam-s2", f"stage2.init_from={s1.run_dir}")
    with pytest.raises(ValueError, match="family 'tiny-sdxl' != model.family 'gmm2d'"):
        main(s2, "stage2")


@pytest.mark.slow
def test_tiny_sdxl_stage1_cli(tmp_path: Path):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, str(REPO_ROOT / "data_tools" / "make_toy_shards.py"), str(shards), "--count", "16",
                    "--per-shard", "8", "--size", "64"], check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "flashdmd.train", "--job", "stage1", "--config", "tiny-sdxl", f"run_root={tmp_path}",
         f"data.shards={shards}/toy-{{000000..000001}}.tar", "stage1.iterations=1", "tracking.sample_every=1",
         "checkpoint.every=1"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "tiny-sdxl-stage1"
    assert (run_dir / "checkpoints" / "step-00000001" / "COMPLETE").exists()
    assert list((run_dir / "samples" / "generator").glob("step_*.png"))
    assert (run_dir / "final" / "generator.safetensors").exists()
