"""``jobs/submit.py pipeline`` end to end on every tiny image family: stage 1, then stage 2 from
its hand-over, on the local executor. Stage 2 must keep win/lose pairs (rl_kept > 0 with the
default threshold), move the generator away from stage 1's, and be nested under stage 1's
MLflow run.

The families' pipelines are independent (a run root and MLflow store each), so they run at the
same time: each is mostly one interpreter importing and setting up at a time, and side by side
they keep the cores busy. One intra-op thread each (OMP_NUM_THREADS, which
``flashdmd.train.main.split_cpu_threads`` honours) keeps their steps from spinning against each
other."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow_store import migrated_store
from safetensors.torch import load_file

from flashdmd.config import REPO_ROOT

FAMILIES = ["tiny-sdxl", "tiny-sd15", "tiny-sd3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("pipeline-shards")
    subprocess.run([sys.executable, str(REPO_ROOT / "data_tools" / "make_toy_shards.py"), str(folder), "--count", "8",
                    "--per-shard", "4", "--size", "64"], check=True, capture_output=True)
    return f"{folder}/toy-{{000000..000001}}.tar"


def _selected(request: pytest.FixtureRequest) -> list[str]:
    """The families whose test runs in this session (all three, or those picked with -k)."""
    picked = {item.callspec.params.get("family") for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
    return [family for family in FAMILIES if family in picked]


@pytest.fixture(scope="module")
def pipelines(request, tmp_path_factory, shards) -> dict[str, tuple[Path, subprocess.Popen, Path]]:
    """Every selected family's pipeline, started at once: family -> (run root, process, log file)."""
    started = {}
    for family in _selected(request):
        root = tmp_path_factory.mktemp(f"pipeline-{family}")
        migrated_store(root)  # MLflow's schema ready: no stage waits out a new store's migrations
        cmd = [sys.executable, str(REPO_ROOT / "jobs" / "submit.py"), "pipeline", "--config", family,
               "--executor", "local", "--name", family, f"run_root={root}", f"data.shards={shards}",
               f"model.cache_dir={root / 'cache'}", "stage1.iterations=1", "stage2.iterations=1",
               "tracking.sample_every=0", "health.monitors=false", "checkpoint.every=100"]
        log = root / "submit.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        started[family] = (root, proc, log)
    yield started
    for _, proc, _ in started.values():
        if proc.poll() is None:  # a failed assertion elsewhere left it running
            proc.kill()
            proc.wait()


def _metric_rows(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line)["metrics"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_runs_stage2_after_stage1(pipelines, family):
    import mlflow

    root, proc, log = pipelines[family]
    assert proc.wait(timeout=1800) == 0, log.read_text()[-3000:]
    stage1, stage2 = root / f"{family}-stage1", root / f"{family}-stage2"

    rows = _metric_rows(stage2)
    assert rows and all(r["rl_kept"] > 0 for r in rows), rows  # pairs kept at stage2.threshold's default
    assert all("generator_lr" in r for r in rows)  # and the generator stepped on them

    before, after = load_file(str(stage1 / "final" / "generator.safetensors")), load_file(
        str(stage2 / "final" / "generator.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert runs[f"{family}-stage2"].data.tags.get("mlflow.parentRunId") == runs[f"{family}-stage1"].info.run_id
