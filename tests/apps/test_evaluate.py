"""flashdmd.apps.evaluate and flashdmd.apps.watch on a real 2-iteration tiny-sdxl run, with tiny
random-weight metric models: the numbers equal a direct computation over the same images, two
gloo ranks (two processes through the CLI) give the numbers of one, results reach MLflow at the
training step, and the watcher evaluates each checkpoint once."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from flashdmd.config import REPO_ROOT, Config, EvalConfig
from flashdmd.diffusion.rollout import randn
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.eval import build_metrics
from flashdmd.apps.watch import main as watch_main
from flashdmd.apps.evaluate import EVAL_OF_TAG, EvalResult, main, prompt_set, shard
from flashdmd.apps.sample import load_student

# Inception FID where torch-fidelity is installed (it has no torchvision-free install from setup.cfg)
FID = ["fid"] if importlib.util.find_spec("torch_fidelity") else []
METRICS = ["clip_score", "pickscore", "hpsv2", "image_reward", *FID, "fd_clip", "mps"]

pytest.register_assert_rewrite("student_world")  # it is also loaded as a plugin below
from student_world import PROMPTS
from tiny_metric_models import fid_inception_weights, hpsv2_release, tiny_clip, tiny_image_reward

from data_tools.convert_hpsv2 import convert as convert_hpsv2

pytest_plugins = ["student_world"]  # the session-wide trained_run fixture, built once for all three files


@pytest.fixture(scope="module")
def eval_cfg(trained_run, tmp_path_factory) -> Config:
    cfg, _ = trained_run
    root = tmp_path_factory.mktemp("eval")
    clip = str(tiny_clip(root / "clip"))
    reference = root / "reference"
    reference.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = copy.deepcopy(cfg)
    cfg.eval.prompts = str(root / "prompts.txt")
    cfg.eval.num_images = 7  # more images than prompts: prompts cycle, every image has its own seed
    cfg.eval.metrics = METRICS
    release = hpsv2_release(root / "hpsv2")  # each metric from its release's layout, through its converter
    hpsv2 = convert_hpsv2(release / "HPS_v2.1_compressed.pt", root / "hpsv2-converted",
                          tokenizer=str(release / "tokenizer"), vision_heads=4, text_heads=4)
    cfg.eval.weights = {"clip_score": clip, "pickscore": clip, "hpsv2": str(hpsv2), "fd_clip": clip,
                        "image_reward": str(tiny_image_reward(root / "image-reward", PROMPTS))}
    if FID:
        cfg.eval.weights["fid"] = str(fid_inception_weights(root / "weights-inception-2015-12-05-6726825d.pth"))
    cfg.eval.reference_images = str(reference)
    cfg.eval.batch_size = 3
    return cfg


def test_prompt_set_and_shards(eval_cfg):
    assert prompt_set(eval_cfg) == PROMPTS + PROMPTS[:2]
    assert shard(7, 0, 2) == [0, 2, 4, 6] and shard(7, 1, 2) == [1, 3, 5]
    assert sorted(shard(7, 0, 3) + shard(7, 1, 3) + shard(7, 2, 3)) == list(range(7))


def mlflow_points(cfg: Config, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(cfg.tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def one_rank(eval_cfg, tmp_path_factory) -> tuple[Config, EvalResult]:
    """The eval job in this process, with the teacher's row: checked against a direct computation
    below, and the reference of the two-rank run (the teacher's row leaves the student's numbers alone)."""
    cfg = copy.deepcopy(eval_cfg)
    cfg.eval.out_dir = str(tmp_path_factory.mktemp("eval-one"))
    cfg.tracking.experiment = "eval-job-test"  # its own eval run: no points from the other tests
    cfg.eval.teacher_steps, cfg.eval.teacher_guidance = 2, 3.0
    return cfg, main(cfg, "eval")


@pytest.mark.slow  # about 35 CPU-seconds: a generation pass and a second computation
def test_eval_job_matches_a_direct_computation_and_logs_to_mlflow(one_rank):
    cfg, result = one_rank
    assert set(result.metrics) == {"clip_score", "pickscore", "hpsv2", "image_reward", *FID, "fd_clip"}
    assert set(result.skipped) == {"mps"} and "MPS" in result.skipped["mps"]

    # direct: the same prompts and seeds through the student, one batch, metrics built afresh
    student = load_student(cfg, cfg.run_dir)
    images = student.generate(prompt_set(cfg), [cfg.eval.seed + i for i in range(7)])
    direct, _ = build_metrics(cfg.eval)
    for name, metric in direct.items():
        metric.update(images, prompt_set(cfg))
        assert result.metrics[name] == pytest.approx(metric.compute(), rel=1e-4, abs=1e-6), name

    # the teacher's row: 2 DDIM steps with CFG 3 from the same per-seed noise (NFE 4)
    (teacher,) = result.baselines
    assert teacher["method"] == "tiny-sdxl teacher (2 steps, CFG 3)" and teacher["nfe"] == 4
    prompts = prompt_set(cfg)
    z = torch.cat([randn((1, *student.latent_shape), torch.Generator().manual_seed(cfg.eval.seed + i)) for i in range(7)])
    x0 = sample_teacher(student.teacher, student.schedule, z, 2, student.text(prompts), student.text.null(7), 3.0)
    clip, _ = build_metrics(EvalConfig(metrics=["clip_score"], weights=cfg.eval.weights))
    clip["clip_score"].update(student.decoder(x0).clamp(-1, 1), prompts)
    assert teacher["metrics"]["clip_score"] == pytest.approx(clip["clip_score"].compute(), rel=1e-4)
    assert teacher["metrics"]["clip_score"] != pytest.approx(result.metrics["clip_score"])

    out = Path(cfg.eval.out_dir) / "step-00000002"
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == result.metrics and saved["num_images"] == 7 and saved["nfe"] == 4
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == f"| Method | NFE | CLIP | ImgRwd | Pick | HPSv2 | MPS |{' FID |' if FID else ''} FD-CLIP |"
    assert table[2].startswith("| tiny-sdxl teacher (2 steps, CFG 3) | 4 | ")
    assert table[3].startswith("| Flash-DMD tiny-sdxl (step 2) | 4 | ") and "| - |" in table[3]
    assert (Path(cfg.eval.out_dir) / "table.md").read_text().splitlines()[:4] == table[:4]

    # MLflow: eval/<metric> at the training step, in an eval run nested under the training run
    client = mlflow.MlflowClient(cfg.tracking_uri)
    run = client.get_run(saved["mlflow_run_id"])
    training_run_id = json.loads((cfg.run_dir / "final" / "handoff.json").read_text())["mlflow_run_id"]
    assert run.data.tags[EVAL_OF_TAG] == training_run_id and run.data.tags["mlflow.parentRunId"] == training_run_id
    assert mlflow_points(cfg, run.info.run_id, "eval/clip_score")[2] == pytest.approx(result.metrics["clip_score"])
    assert mlflow_points(cfg, run.info.run_id, "eval_teacher/clip_score")[2] == pytest.approx(teacher["metrics"]["clip_score"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "step-00000002")]
    assert artifacts == ["step-00000002/results.md"]
    assert "table.md" in [a.path for a in client.list_artifacts(run.info.run_id)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_command(cfg: Config, out_dir: Path) -> list[str]:
    weights = "{" + ", ".join(f"{k}: {v}" for k, v in cfg.eval.weights.items()) + "}"
    return [sys.executable, "-m", "flashdmd.apps.evaluate", "--config", "tiny-sdxl", "--source", str(cfg.run_dir),
            f"run_root={cfg.run_root}", f"name={cfg.name}", f"model.cache_dir={cfg.model.cache_dir}",
            f"eval.prompts={cfg.eval.prompts}", f"eval.num_images={cfg.eval.num_images}",
            f"eval.metrics=[{','.join(cfg.eval.metrics)}]", f"eval.weights={weights}",
            f"eval.reference_images={cfg.eval.reference_images}", f"eval.batch_size={cfg.eval.batch_size}",
            f"eval.out_dir={out_dir}"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_give_the_numbers_of_one(eval_cfg, one_rank, tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(eval_command(eval_cfg, tmp_path / "two"), env=env, cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    two = json.loads((tmp_path / "two" / "step-00000002" / "results.json").read_text())

    _, one = one_rank
    assert two["num_images"] == 7
    for name, value in one.metrics.items():  # float32 model outputs vary slightly with the batch's size
        assert two["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_watcher_evaluates_each_checkpoint_once(eval_cfg, tmp_path):
    cfg = copy.deepcopy(eval_cfg)
    cfg.eval.metrics = ["clip_score"]
    cfg.eval.num_images = 2
    cfg.eval.poll_s = 0.05
    cfg.tracking.experiment = "watch-test"

    # a run still training: checkpoint 1 only, no hand-over -> evaluate it, then stop on the timeout
    live = tmp_path / "live"
    shutil.copytree(cfg.run_dir / "checkpoints" / "step-00000001", live / "checkpoints" / "step-00000001")
    cfg.eval.source = str(live)
    cfg.eval.watch_timeout_s = 0.5
    assert [r.step for r in watch_main(cfg, "watch")] == [1]
    assert (live / "eval" / "step-00000001" / "results.json").is_file()

    # the run finished: step 2 and the hand-over (also step 2) -> only step 2 is new; then it stops by itself
    shutil.copytree(cfg.run_dir / "checkpoints" / "step-00000002", live / "checkpoints" / "step-00000002")
    shutil.copytree(cfg.run_dir / "final", live / "final")
    cfg.eval.watch_timeout_s = 0.0
    results = watch_main(cfg, "watch")
    assert [r.step for r in results] == [2]
    assert watch_main(cfg, "watch") == []  # restarted: nothing left

    table = (live / "eval" / "table.md").read_text().splitlines()  # one row per evaluated step
    assert table[2].startswith("| Flash-DMD tiny-sdxl (step 1) | 4 |") and table[3].startswith("| Flash-DMD tiny-sdxl (step 2)")
    saved = json.loads((live / "eval" / "step-00000002" / "results.json").read_text())
    points = mlflow_points(cfg, saved["mlflow_run_id"], "eval/clip_score")
    assert sorted(points) == [1, 2] and points[2] == pytest.approx(results[0].metrics["clip_score"])
    assert points[1] != points[2]  # different weights, different score


def test_watcher_every_n_skips_other_steps(eval_cfg, tmp_path):
    cfg = copy.deepcopy(eval_cfg)
    cfg.eval.metrics, cfg.eval.num_images, cfg.eval.every = ["clip_score"], 1, 2
    cfg.eval.out_dir = str(tmp_path / "every")
    cfg.tracking.experiment = "watch-every-test"
    assert [r.step for r in watch_main(cfg, "watch")] == [2]
    assert not (tmp_path / "every" / "step-00000001").exists()
