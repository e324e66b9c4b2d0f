"""The step directories real training writes, under every engine, serve every tool.

One tiny-sdxl stage-1 run per engine (local on 1 rank; DDP, FSDP2 and ZeRO-3 on 2 gloo ranks),
2 steps with a checkpoint at each, through ``python -m flashdmd.train``. Its step-2 directory is
taken at the same step as the ``final/`` hand-over, so sampling, export, evaluation, the
consolidation CLI (and on ZeRO-3 DeepSpeed's own zero_to_fp32) must give exactly what ``final/``
gives; step 1 must load too, and differ. Then runs killed while saving resume at another world
size: FSDP2 1 -> 2 -> 1 ranks (killed twice) and ZeRO-3 2 -> 1: they finish their planned steps,
their MLflow run holds each step once, and the log says what was re-split.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from checkpoint_world import launch_train, make_shards, train_overrides
from safetensors.torch import load_file
from tiny_metric_models import tiny_clip

from flashdmd.apps.consolidate import cli as consolidate_cli
from flashdmd.apps.evaluate import run_eval
from flashdmd.apps.export import export_pipeline
from flashdmd.apps.sample import load_student
from flashdmd.config import Config, load_config
from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.train.checkpoint import step_dir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENGINES = {"local": ("local", 1), "ddp": ("local", 2), "fsdp": ("fsdp", 2), "deepspeed": ("deepspeed", 2)}
PROMPTS = ["a red car", "a cat on a mat"]
LOSS = "loss/fake"  # one metric logged at every step


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("runs")
    return root, make_shards(root)


def _cfg(root: Path, overrides: list[str]) -> Config:
    return load_config("tiny-sdxl", overrides)


@pytest.fixture(scope="module", params=sorted(ENGINES))
def trained(request, world) -> tuple[str, Config]:
    root, shards = world
    kind, ranks = ENGINES[request.param]
    overrides = train_overrides(root, request.param, kind, shards, 2)
    codes, log = launch_train(overrides, ranks)
    assert codes == [0] * ranks, log[-3000:]
    return request.param, _cfg(root, overrides)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_dir_serves_sample_export_eval_like_final(trained, tmp_path: Path) -> None:
    name, cfg = trained
    step, final = step_dir(cfg.checkpoint_dir, 2), cfg.run_dir / "final"
    handed = load_file(str(final / "generator.safetensors"))
    reader = CheckpointReader(step)
    assert reader.map("generator")["engine"] == {"local": "local", "ddp": "ddp"}.get(name, name)
    assert _equal({k: reader.tensor("generator", k) for k in handed}, handed)

    assert consolidate_cli([str(step), str(tmp_path / "plain"), "--network", "generator"]) == 0
    assert _equal({k: v for k, v in load_file(str(tmp_path / "plain" / "generator.safetensors")).items() if k in handed},
                  handed)
    if name == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        theirs = get_fp32_state_dict_from_zero_checkpoint(str(step / "generator"))
        assert _equal({k: theirs[k] for k in handed}, handed)

    seeds = [3, 4]
    students = {src: load_student(cfg, src) for src in (step, final, step_dir(cfg.checkpoint_dir, 1))}
    images = {src: s.generate(PROMPTS, seeds) for src, s in students.items()}
    assert torch.equal(images[step], images[final])
    assert not torch.equal(images[step_dir(cfg.checkpoint_dir, 1)], images[final])

    unets = []
    for src in (step, final):
        out = export_pipeline(cfg, src, tmp_path / f"export-{src.name}")
        unets.append(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")))
    assert _equal(*unets)

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg.eval.prompts, cfg.eval.num_images, cfg.eval.metrics = str(tmp_path / "prompts.txt"), 2, ["clip_score"]
    cfg.eval.weights = {"clip_score": str(tiny_clip(tmp_path / "clip"))}
    scores = [run_eval(cfg, students[src]).metrics for src in (step, final)]
    assert scores[0] == scores[1] and "clip_score" in scores[0]


@pytest.mark.parametrize("kind,sizes", [("fsdp", [1, 2, 1]), ("deepspeed", [2, 1])], ids=["fsdp-1-2-1", "deepspeed-2-1"])
def test_a_run_resumes_at_another_world_size(world, kind: str, sizes: list[int]) -> None:
    """Each launch but the last is killed while saving its last step (step k+1 of launch k); the next
    launch, at another world size, resumes from the step before and re-splits what the last one wrote.
    One chain 1 -> 2 -> 1 covers both directions on FSDP2 with a launch less than two separate runs."""
    root, shards = world
    iterations = len(sizes)
    overrides = train_overrides(root, f"resume-{kind}-{'-'.join(map(str, sizes))}", kind, shards, iterations)
    for k, ranks in enumerate(sizes):
        last = k == len(sizes) - 1
        codes, log = launch_train(overrides, ranks, faults="" if last else f"kill_save@{k + 2}")
        assert codes == ([0] if last else [-9]) * ranks, log[-3000:]
        if k:
            assert re.search(rf"resuming .*step-{k:08d}", log), log[-3000:]  # the newest valid step, before the kill
            assert f"written by {sizes[k - 1]} ranks, this run has {ranks}" in log and "re-split" in log, log[-3000:]
    cfg = _cfg(root, overrides)
    meta = json.loads((cfg.run_dir / "final" / "handoff.json").read_text())
    assert meta["step"] == iterations
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    steps = sorted(m.step for m in client.get_metric_history(meta["mlflow_run_id"], LOSS))
    assert steps == list(range(1, iterations + 1))  # one MLflow run over all launches, each step once
    shutil.rmtree(cfg.run_dir)
