"""flashdmd.infra.tracking against MLflow's SQLite store and a real ``mlflow server`` on 127.0.0.1.

What is checked is read back with ``MlflowClient``: params, per-step metric history, tags (the
description, user, source and what the run is), the experiment's model-training kind, sample
grids as MLflow images at their step with their prompts, artifacts, the JSONL copy, continuation
of a run id without duplicated steps, the stage-2 parent link, and no lost step across store
outages at the start and in the middle of a run.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow_server import MlflowServer, free_port
from PIL import Image

from flashdmd.config import flatten, from_yaml, load_config, to_dict
from flashdmd.infra.tracking import (
    PARENT_TAG,
    NullTracker,
    Tracker,
    grid_shape,
    image_grid,
    open_tracker,
    read_jsonl,
    sync_from_jsonl,
)
from flashdmd.infra.tracking_writer import CLOSING_RETRY_S, MAX_BACKOFF_S, retry_wait


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """One SQLite store for the module: creating its schema takes seconds."""
    return tmp_path_factory.mktemp("runs")


def make_cfg(run_root, name, *extra):
    return load_config("tiny-sdxl", [f"run_root={run_root}", f"name={name}", *extra])


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def same_points(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps, values equal to float32 precision (the SQLite store keeps doubles; be exact about steps)."""
    return len(actual) == len(expected) and all(
        sa == se and math.isclose(va, ve, rel_tol=1e-6, abs_tol=0.0) for (sa, va), (se, ve) in zip(actual, expected))


def logged_images(client, run_id, key):
    """{step: local PNG path} of the MLflow images logged under ``key`` (MLflow names them key+step+N+...)."""
    out = {}
    for item in client.list_artifacts(run_id, "images"):
        name = item.path.split("/")[-1]
        if name.startswith(f"{key}+step+") and name.endswith(".png"):
            out[int(name.split("+")[2])] = item.path
    return out


@pytest.mark.slow  # each tracker starts a writer process that imports MLflow: seconds on a loaded machine
def test_sqlite_store_holds_params_tags_metrics_artifacts_and_jsonl(run_root):
    long_prompt = ("a " * 1800).strip()  # two of them: over MLflow's 6000-character param limit
    cfg = make_cfg(
        run_root, "basic", f"tracking.sample_prompts=[{long_prompt}, {long_prompt}]", "tracking.tags={team: vision}"
    )
    tracker = open_tracker(cfg, 0, None, flush_interval_s=0.1)
    assert isinstance(tracker, Tracker) and tracker.run_id
    for step in range(1, 6):
        tracker.log_metrics({"loss/dm": 1.0 / step, "lr/generator": 1e-4 * step}, step)
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    tracker.log_images("grid", images, 2, captions=["a", "b", "c", "d"])
    tracker.log_images("grid", -images, 5, captions=["a", "b", "c", "d"])
    tracker.log_config(cfg)
    tracker.log_checkpoint(cfg.checkpoint_dir / "step_00000005", 5)
    tracker.close()
    assert tracker._proc.returncode == 0  # the writer's status: everything reached the store

    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "basic"
    params = run.data.params
    flat = flatten(to_dict(cfg))
    assert set(params) == set(flat)
    assert params["stage1.student_timesteps"] == str([999, 749, 499, 249])
    assert len(params["tracking.sample_prompts"]) == 6000 and params["tracking.sample_prompts"].endswith("[truncated]")
    tags = run.data.tags
    assert (tags["family"], tags["stage"], tags["engine"], tags["nodes"], tags["world_size"]) == (
        "tiny-sdxl",
        "stage1",
        "local",
        "1",
        "1",
    )
    assert tags["team"] == "vision" and len(tags["git_commit"]) in (0, 40)
    assert tags["checkpoint.step"] == "5" and tags["checkpoint.path"].endswith("step_00000005")
    assert (tags["job"], tags["mode"], tags["mlflow.source.type"]) == ("stage1", "flash", "JOB")
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    assert "**stage1**" in tags["mlflow.note.content"] and "`flash`" in tags["mlflow.note.content"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's training view
    assert history(client, tracker.run_id, "loss/dm") == [(s, 1.0 / s) for s in range(1, 6)]
    assert same_points(history(client, tracker.run_id, "lr/generator"), [(s, 1e-4 * s) for s in range(1, 6)])

    # sample grids: MLflow images at their steps (the UI's slider), 2 x 2 without empty cells, tiles
    # upscaled from 8 px to 256 px; the prompts beside them
    shown = logged_images(client, tracker.run_id, "grid")
    assert sorted(shown) == [2, 5]
    png = client.download_artifacts(tracker.run_id, shown[5], str(run_root / "dl"))
    assert np.array_equal(np.asarray(Image.open(png)), image_grid(-images, scale=32))
    assert np.asarray(Image.open(png)).shape == (2 * 256 + 3 * 2, 2 * 256 + 3 * 2, 3)
    prompts = client.download_artifacts(tracker.run_id, "samples/grid/prompts.txt", str(run_root / "dl"))
    assert Path(prompts).read_text().splitlines()[1:] == ["1. a", "2. b", "3. c", "4. d"]
    # artifacts: the YAML loads back to the same config
    config_yaml = client.download_artifacts(tracker.run_id, "config/config.yaml", str(run_root / "dl"))
    assert to_dict(from_yaml(Path(config_yaml).read_text())) == to_dict(cfg)
    repro = json.loads(
        Path(client.download_artifacts(tracker.run_id, "config/repro.json", str(run_root / "dl"))).read_text()
    )
    assert set(repro["packages"]) >= {"torch", "diffusers", "transformers", "deepspeed", "mlflow", "webdataset"}
    assert repro["git"]["commit"] == tags["git_commit"]

    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["metrics"] == {"loss/dm": 1.0 / 3, "lr/generator": 1e-4 * 3}
    assert sync_from_jsonl(cfg.run_dir / "metrics.jsonl", tracker.run_id, cfg.tracking_uri) == 0


@pytest.mark.slow
def test_resume_continues_the_run_without_duplicate_steps_and_links_stage2(run_root):
    cfg = make_cfg(run_root, "resume")
    first = open_tracker(cfg, 0, None, flush_interval_s=0.1)
    for step in range(1, 7):  # checkpoint at step 4, preempted after step 6
        first.log_metrics({"loss/g": float(step)}, step)
    first.close(status="KILLED")
    # step 7 reached only the JSONL copy (the store was down) before the job died
    with open(cfg.run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 7, "time": int(time.time() * 1000), "metrics": {"loss/g": 7.0}}) + "\n")

    cfg2 = make_cfg(run_root, "resume", "launch.max_requeues=5")
    second = open_tracker(cfg2, 0, first.run_id, flush_interval_s=0.1)
    assert second.run_id == first.run_id
    assert second.skip_through == 7
    for step in range(5, 10):  # replays 5 to 7 from the step-4 checkpoint
        second.log_metrics({"loss/g": 100.0 + step}, step)
    second.close()

    client = MlflowClient(cfg.tracking_uri)
    assert history(client, first.run_id, "loss/g") == [(s, float(s)) for s in range(1, 8)] + [
        (s, 100.0 + s) for s in (8, 9)
    ]
    assert [r["step"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl")] == list(range(1, 10))
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["launch.max_requeues"] == "3"
    assert run.data.tags["flashdmd.resume_count"] == "1"
    assert run.data.tags["flashdmd.config_changed_on_resume"] == "launch.max_requeues"

    stage2 = make_cfg(run_root, "stage2", f"stage2.init_from={cfg.run_dir}")
    child = open_tracker(stage2, 0, None, parent_run_id=first.run_id, flush_interval_s=0.1)
    child.close()
    tags = client.get_run(child.run_id).data.tags
    assert tags[PARENT_TAG] == first.run_id and tags["stage"] == "stage2"
    assert child.run_id != first.run_id


def test_other_ranks_get_a_null_tracker_and_bad_input_is_named(run_root):
    cfg = make_cfg(run_root, "rank1")
    null = open_tracker(cfg, 1, None)
    assert type(null) is NullTracker and null.run_id is None
    null.log_metrics({"x": 1.0}, 1)
    null.close()
    assert not cfg.run_dir.exists()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        image_grid(torch.zeros(2, 1, 4, 4))
    tracker = open_tracker(make_cfg(run_root, "badkey"), 0, None, flush_interval_s=0.1)
    with pytest.raises(ValueError, match="metric name 'loss\\?' is not valid"):
        tracker.log_metrics({"loss?": 1.0}, 1)
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracker.close(status="DONE")
    tracker.close()


def test_the_writer_backs_off_while_training_and_retries_every_second_once_closing():
    # training runs: exponential backoff from the flush interval, capped
    assert [retry_wait(0.1, n, None) for n in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert retry_wait(1.0, 12, None) == MAX_BACKOFF_S == 30.0
    # closed: the job waits only on delivery, so no pause is longer than CLOSING_RETRY_S, a
    # shorter backoff stays, and nothing waits past the close deadline
    assert retry_wait(1.0, 12, 60.0) == CLOSING_RETRY_S == 1.0
    assert retry_wait(0.1, 2, 60.0) == pytest.approx(0.4)
    assert retry_wait(1.0, 12, 0.25) == 0.25 and retry_wait(1.0, 12, -3.0) == 0.0


def test_image_grid_places_each_image_without_empty_cells():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(images)  # 1 x 3 cells of 2 px, 2 px padding around and between: no empty cell
    assert grid.shape == (6, 14, 3) and grid.dtype == np.uint8
    assert (grid[2:4, 2:4] == 0).all() and (grid[2:4, 6:8] == 128).all() and (grid[2:4, 10:12] == 255).all()
    assert (grid[0:2] == 0).all() and (grid[4:] == 0).all() and (grid[:, 12:] == 0).all()
    assert image_grid(images, scale=3).shape == (2 + 6 + 2, 2 + 3 * (6 + 2), 3)
    for n in range(1, 40):
        rows, cols = grid_shape(n)
        assert rows * cols == n and rows <= cols and all(n % r for r in range(rows + 1, math.isqrt(n) + 1))


@pytest.mark.slow
def test_real_server_outages_at_start_and_mid_run_lose_no_step(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(tmp_path / "server", port=free_port())
    cfg = make_cfg(tmp_path / "runs", "server", f"tracking.uri={server.uri}")

    # 1. nobody listens yet: training goes on, the run appears once the server does. The calls
    # return while no store exists at all (a call that waited on the store would never return
    # before the server below is started), which is what "never waits on the store" means.
    tracker = open_tracker(cfg, 0, None, connect_timeout_s=5, flush_interval_s=0.1)
    assert tracker.run_id is None
    returned = threading.Event()

    def log_three() -> None:
        for step in range(1, 4):
            tracker.log_metrics({"loss/g": float(step)}, step)
        returned.set()

    threading.Thread(target=log_three, daemon=True).start()
    returned.wait()  # blocks forever, failing the test by its timeout, if a call waits on the store
    assert tracker.run_id is None and server.proc is None  # the store was not touched
    server.start()
    try:
        assert tracker.flush(timeout_s=60) and tracker.run_id
        tracker.log_images("grid", torch.zeros(2, 3, 8, 8), 3)
        for step in range(4, 7):
            tracker.log_metrics({"loss/g": float(step)}, step)
        assert tracker.flush(timeout_s=60)

        # 2. the server dies mid-run and comes back on the same port with the same store
        server.stop()
        for step in range(7, 10):
            tracker.log_metrics({"loss/g": float(step)}, step)
        assert not tracker.flush(timeout_s=1)
        server.start()
        for step in range(10, 12):
            tracker.log_metrics({"loss/g": float(step)}, step)
        tracker.close(timeout_s=60)

        client = MlflowClient(server.uri)
        assert history(client, tracker.run_id, "loss/g") == [(s, float(s)) for s in range(1, 12)]
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.params["model.family"] == "tiny-sdxl"
        assert sorted(logged_images(client, tracker.run_id, "grid")) == [3]
    finally:
        server.stop()


@pytest.mark.slow
def test_system_metrics_come_from_mlflows_own_monitor(run_root):
    tracker = open_tracker(make_cfg(run_root, "system"), 0, None, flush_interval_s=0.1, system_metrics_s=0.2)
    client = MlflowClient(make_cfg(run_root, "system").tracking_uri)
    # MLflow's monitor samples CPU and memory in the writer process and logs them as system/*
    while not any(k.startswith("system/") for k in client.get_run(tracker.run_id).data.metrics):
        assert tracker._proc.poll() is None, "the writer process ended"
        time.sleep(0.2)
    tracker.close()
    keys = set(client.get_run(tracker.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
