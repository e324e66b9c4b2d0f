"""The step directories real training writes, under every engine, serve every tool.

One tiny-sdxl stage-1 run per engine (local on 1 rank; DDP, FSDP2 and ZeRO-3 ending on 2 gloo
ranks), a checkpoint at every step, through ``python -m flashdmd.train``. Its last step directory
is taken at the same step as the ``final/`` hand-over, so sampling, export, evaluation, the
consolidation CLI (and on ZeRO-3 DeepSpeed's own zero_to_fp32) must give exactly what ``final/``
gives; the step before must load too, and differ. The sharded runs are launched several times,
each launch but the last killed while saving, the next resuming at another world size: FSDP2
2 -> 1 -> 2 ranks (killed twice: both directions) and ZeRO-3 1 -> 2. They finish their planned
steps, their MLflow run holds each step once, and the log says what was re-split; their last
step directory is then a 2-rank one written after a resume, which the tools read like any other.
(ZeRO-3's 2 -> 1 re-partition, by the engine: tests/engine/test_checkpoint_reshard.py.)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
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
# name -> (engine.kind, ranks of each launch; every launch but the last is killed while saving)
RUNS = {"local": ("local", [1]), "ddp": ("local", [2]), "fsdp": ("fsdp", [2, 1, 2]), "deepspeed": ("deepspeed", [1, 2])}
PROMPTS = ["a red car", "a cat on a mat"]
LOSS = "loss/fake"  # one metric logged at every step


@dataclass
class Run:
    cfg: Config
    sizes: list[int]
    logs: list[str]  # rank 0's log of each launch


class Runs:
    """Each engine's run, launched the first time a test asks for it; a failed one fails every asker."""

    def __init__(self, root: Path, shards: str, cache: Path) -> None:
        self.root, self.shards, self.cache = root, shards, cache
        self.done: dict[str, Run | BaseException] = {}

    def __call__(self, name: str) -> Run:
        if name not in self.done:
            try:
                self.done[name] = self._launch(name)
            except BaseException as err:  # noqa: BLE001 -- kept, and raised again for the next test
                self.done[name] = err
        run = self.done[name]
        if isinstance(run, BaseException):
            raise run
        return run

    def _launch(self, name: str) -> Run:
        kind, sizes = RUNS[name]
        iterations = max(2, len(sizes))
        overrides = train_overrides(self.root, f"{name}-{'-'.join(map(str, sizes))}", kind, self.shards, iterations,
                                    self.cache)
        logs = []
        for k, ranks in enumerate(sizes):
            last = k == len(sizes) - 1
            codes, log = launch_train(overrides, ranks, faults="" if last else f"kill_save@{k + 2}")
            assert codes == ([0] if last else [-9]) * ranks, log[-3000:]
            logs.append(log)
        return Run(load_config("tiny-sdxl", overrides), sizes, logs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    return Runs(root, make_shards(root), tmp_path_factory.getbasetemp() / "nets-cache")  # shared with tests/nets


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_step_dir_serves_sample_export_eval_like_final(runs: Runs, name: str, tmp_path: Path) -> None:
    run = runs(name)
    cfg, last = run.cfg, run.cfg.stage1.iterations
    step, before, final = step_dir(cfg.checkpoint_dir, last), step_dir(cfg.checkpoint_dir, last - 1), cfg.run_dir / "final"
    handed = load_file(str(final / "generator.safetensors"))
    reader = CheckpointReader(step)
    assert reader.map("generator")["engine"] == {"local": "local", "ddp": "ddp"}.get(name, name)
    assert json.loads((step / "trainer.json").read_text())["world_size"] == run.sizes[-1]
    assert _equal({k: reader.tensor("generator", k) for k in handed}, handed)

    assert consolidate_cli([str(step), str(tmp_path / "plain"), "--network", "generator"]) == 0
    assert _equal({k: v for k, v in load_file(str(tmp_path / "plain" / "generator.safetensors")).items() if k in handed},
                  handed)
    if name == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        theirs = get_fp32_state_dict_from_zero_checkpoint(str(step / "generator"))
        assert _equal({k: theirs[k] for k in handed}, handed)

    seeds = [3, 4]
    students = {src: load_student(cfg, src) for src in (step, final, before)}
    images = {src: s.generate(PROMPTS, seeds) for src, s in students.items()}
    assert torch.equal(images[step], images[final])
    assert not torch.equal(images[before], images[final])

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


@pytest.mark.parametrize("name", ["fsdp", "deepspeed"])
def test_a_run_resumes_at_another_world_size(runs: Runs, name: str) -> None:
    """Launch k (from 0) is killed while saving step k + 2; launch k + 1, at another world size,
    resumes from step k + 1, the newest valid one, and re-splits what the launch before wrote."""
    run = runs(name)
    for k in range(1, len(run.sizes)):
        log = run.logs[k]
        assert re.search(rf"resuming .*step-{k:08d}", log), log[-3000:]  # the newest valid step, before the kill
        assert f"written by {run.sizes[k - 1]} ranks, this run has {run.sizes[k]}" in log and "re-split" in log, \
            log[-3000:]
    cfg = run.cfg
    meta = json.loads((cfg.run_dir / "final" / "handoff.json").read_text())
    assert meta["step"] == cfg.stage1.iterations == len(run.sizes)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    steps = sorted(m.step for m in client.get_metric_history(meta["mlflow_run_id"], LOSS))
    assert steps == list(range(1, len(run.sizes) + 1))  # one MLflow run over all launches, each step once
