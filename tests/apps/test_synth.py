"""The synth job on tiny-sd3: two ranks through jobs/submit.py write the bytes one rank writes, the
shards pass data_tools/inspect_shards.py and feed the stage-1 trainer, a run killed mid-shard and
rerun ends with every image exactly once, and the curation filter keeps what its score says."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_metric_models import tiny_clip

from flashdmd.config import REPO_ROOT, Config, EvalConfig, load_config
from flashdmd.eval import build_metrics
from flashdmd.apps.synth import main, shard_range

PROMPTS = ["a red car", "a cat", "a house", "two dogs", "the sea"]
N = 6  # more images than prompts: prompts cycle, each image its own seed


def overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [
        f"run_root={root}",
        f"name={name}",
        f"model.cache_dir={root / 'cache'}",
        f"synth.prompts={root / 'p.txt'}",
        f"synth.num_images={N}",
        "synth.steps=2",
        "synth.resolution=32",
        "synth.per_shard=3",
        "synth.batch_size=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Config]:
    """The prompt file and a finished single-rank run (with latents and text embeddings) as the reference."""
    root = tmp_path_factory.mktemp("synth")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config("tiny-sd3", overrides(root, "one", "synth.latents=true", "synth.text_embeddings=true"))
    main(cfg, "synth")
    return root, cfg


def members(folder: Path) -> dict[str, bytes]:
    """Every member of every shard in ``folder``; a name seen twice is a duplicate and fails."""
    found: dict[str, bytes] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                assert member.name not in found, f"{member.name} written twice"
                found[member.name] = tar.extractfile(member).read()
    return found


def images_of(found: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in found.items() if name.endswith(".png")}


def test_shard_ranges_cover_every_shard_once():
    for shards, world_size in ((7, 3), (2, 2), (1, 4), (16, 5)):
        ranges = [list(shard_range(shards, r, world_size)) for r in range(world_size)]
        assert sum(ranges, []) == list(range(shards))


def test_single_rank_shards_are_complete_and_logged(world):
    root, cfg = world
    found = members(cfg.run_dir / "shards")
    assert sorted(images_of(found)) == [f"{i:09d}.png" for i in range(N)]
    assert {n.split(".", 1)[1] for n in found} == {"png", "txt", "json", "latent.safetensors", "text.safetensors"}
    meta = json.loads(found["000000005.json"])
    assert meta["caption"] == PROMPTS[0] and meta["seed"] == 5 and meta["latent_shape"] == [16, 8, 8]
    assert Image.open(io.BytesIO(found["000000005.png"])).size == (32, 32)
    assert sorted(p.name for p in (cfg.run_dir / "shards").glob("*.tar")) == ["synth-000000.tar", "synth-000001.tar"]

    report = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "data_tools" / "inspect_shards.py"),
            str(cfg.run_dir / "shards"),
            "--strict",
            "--resolution",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0 and f"{N} good" in report.stdout and "bad: none" in report.stdout, report.stdout

    client = mlflow.MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string="tags.`flashdmd.stage` = 'synth'",
    )
    assert run.data.metrics["synth/generated"] == N and run.data.metrics["synth/kept_fraction"] == 1.0
    assert run.data.metrics["synth/images_per_s"] > 0 and run.data.params["synth.steps"] == "2"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["sample_grid.png"]


@pytest.mark.slow  # two spawned ranks, then one stage-1 iteration on the shards
def test_two_ranks_write_what_one_writes_and_stage1_trains_on_it(world):
    root, reference = world
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPO_ROOT / "jobs" / "submit.py"),
        "synth",
        "--config",
        "tiny-sd3",
        "--executor",
        "local",
        "--gpus-per-node",
        "2",
        *overrides(root, "two"),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = members(root / "two" / "shards")
    assert images_of(two) == images_of(members(reference.run_dir / "shards"))

    from flashdmd.train.main import main as train

    cfg = load_config(
        "tiny-sd3",
        [
            f"run_root={root}",
            "name=train",
            f"model.cache_dir={root / 'cache'}",
            f"data.shards={root / 'two' / 'shards'}",
            "stage1.iterations=1",
            "checkpoint.every=1",
            "tracking.sample_every=0",
        ],
    )
    train(cfg, "stage1")
    assert (cfg.run_dir / "final").is_dir()


@pytest.mark.slow  # about 25 CPU-seconds: a killed run and its resume
def test_a_run_killed_mid_shard_resumes_without_duplicates(world):
    root, reference = world
    command = [sys.executable, "-m", "flashdmd.apps.synth", "--config", "tiny-sd3", *overrides(root, "killed")]
    shards = root / "killed" / "shards"
    log = root / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    partial = shards / ".synth-000001.tar.partial"
    # shard 1 is written in ~0.1 s on an idle machine: poll often enough to land inside it
    while not (partial.is_file() and partial.stat().st_size > 0) and proc.poll() is None:  # ends with the run
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ended = log.read_text(errors="replace")[-3000:]
    assert partial.is_file() and not (shards / "synth-000001.tar").exists(), ended  # killed inside shard 1
    finished = (shards / "synth-000000.tar").read_bytes()

    # the same command again, here through its entry (cli) in this process: the killed one above
    # already ran it as a fresh interpreter
    from flashdmd.apps.synth import cli

    assert cli(["--config", "tiny-sd3", *overrides(root, "killed")]) == 0
    assert (shards / "synth-000000.tar").read_bytes() == finished  # the finished shard was skipped
    assert not partial.exists()
    assert images_of(members(shards)) == images_of(members(reference.run_dir / "shards"))


def test_the_filter_keeps_images_scoring_over_the_threshold(world):
    root, reference = world
    clip = tiny_clip(root / "clip")
    cfg = EvalConfig(metrics=["pickscore"], weights={"pickscore": str(clip)})  # unclamped: no ties at 0
    scorer = build_metrics(cfg)[0]["pickscore"]
    pngs = images_of(members(reference.run_dir / "shards"))
    pixels = (
        torch.stack(
            [torch.from_numpy(np.array(Image.open(io.BytesIO(pngs[k])))).permute(2, 0, 1) for k in sorted(pngs)]
        ).float()
        / 127.5
        - 1
    )
    scores = scorer.score(pixels, [PROMPTS[i % len(PROMPTS)] for i in range(N)])
    ordered = scores.sort().values
    threshold = float(ordered[N // 2 - 1] + ordered[N // 2]) / 2  # halfway between two images' scores

    cfg = load_config(
        "tiny-sd3",
        overrides(
            root,
            "curated",
            "synth.filter_metric=pickscore",
            f"synth.filter_threshold={threshold}",
            f"synth.filter_weights={clip}",
        ),
    )
    result = main(cfg, "synth")
    kept = sorted(images_of(members(cfg.run_dir / "shards")))
    expected = [f"{i:09d}.png" for i in range(N) if scores[i] >= threshold]
    assert kept == expected and 0 < len(kept) < N
    assert result.generated == N and result.kept == len(kept) and result.kept_fraction == pytest.approx(len(kept) / N)
