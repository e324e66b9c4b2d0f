"""What a training run shows: every loss of every network at every log step (metrics aggregated over
the logging window), per-timestep statistics, the progress line, the toy's exact quality beside the
teacher's, and a rerun with another config refused unless asked to resume."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric

from flashdmd.config import Config, ConfigError, load_config
from flashdmd.train.main import main
from flashdmd.train.rundir import RESUME_ENV
from flashdmd.train.window import MetricWindow, display_name

STAGE1_LOSSES = ("loss/dmd", "loss/gan_g", "loss/fake", "loss/d")


def gmm_cfg(root: Path, cache: Path, name: str, *overrides: str) -> Config:
    return load_config("gmm2d", [
        f"run_root={root}", f"name={name}", f"model.cache_dir={cache}", "model.gmm.teacher_steps=300",
        "data.batch_size=64", "checkpoint.every=1000", "tracking.sample_every=0", *overrides,
    ])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def histories(root: Path, run_id: str) -> dict[str, list[Metric]]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    keys = client.get_run(run_id).data.metrics
    return {key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step) for key in keys}


def run_id_of(cfg: Config) -> str:
    import json

    return json.loads((cfg.run_dir / "final" / "handoff.json").read_text())["mlflow_run_id"]


def test_window_means_over_the_steps_where_each_metric_occurred():
    window = MetricWindow()
    window.add({"loss_fake": 1.0, "loss_dmd": 4.0}, seconds=0.5, samples=8)
    window.add({"loss_fake": 3.0, "loss_dmd": math.nan}, seconds=0.5, samples=8)  # a skipped update's NaN
    window.add({"loss_fake": 5.0}, seconds=1.0, samples=8)
    assert (window.steps, window.seconds, window.samples) == (3, 2.0, 24)
    summary = window.summary()
    assert summary == {"loss_fake": 3.0, "steps/loss_fake": 3.0, "loss_dmd": 4.0, "steps/loss_dmd": 1.0}
    assert window.steps == 0
    window.add({"x": math.inf})
    later = window.summary()
    assert math.isinf(later["x"])  # only non-finite values: the last one stays visible
    # metrics absent from this window (an RL:DM period longer than it) repeat their last mean, count 0
    assert (later["loss_fake"], later["steps/loss_fake"], later["loss_dmd"], later["steps/loss_dmd"]) == (3.0, 0, 4.0, 0)
    assert display_name("loss_gan_g") == "loss/gan_g" and display_name("generator_lr") == "generator_lr"


@pytest.mark.slow  # a few gmm2d runs: tens of seconds on 2 loaded cores
def test_ttur_2_logs_every_loss_of_every_network_at_every_log_step(root: Path, cache: Path, caplog):
    caplog.set_level(logging.INFO, logger="flashdmd.progress")
    cfg = gmm_cfg(root, cache, "ttur", "stage1.ttur=2", "tracking.log_every=10", "stage1.iterations=30")
    main(cfg, "stage1")
    logged = histories(root, run_id_of(cfg))
    for key in (*STAGE1_LOSSES, "generator_lr", "generator_grad_norm", "fake_score_lr", "discriminator_lr"):
        assert [m.step for m in logged[key]] == [10, 20, 30], key
    # the window's counts: 5 generator updates (TTUR 2) and 10 fake-score updates per 10 iterations
    assert [m.value for m in logged["steps/loss/dmd"]] == [5.0, 5.0, 5.0]
    assert [m.value for m in logged["steps/loss/fake"]] == [10.0, 10.0, 10.0]
    # per-timestep gradient norms: every student DM step drawn in a window, with counts adding up
    per_t = [k for k in logged if k.startswith("health/dm_grad_norm/t")]
    assert per_t
    for step in (10, 20, 30):
        counts = [m.value for k in per_t for m in logged[f"steps/{k}"] if m.step == step]
        assert sum(counts) == 5.0
    assert not any(k.startswith("loss_") for k in logged)  # losses only under loss/
    lines = [r.getMessage() for r in caplog.records if r.name == "flashdmd.progress"]
    assert [line.split()[1] for line in lines] == ["10/30", "20/30", "30/30"]
    assert all("loss/dmd" in line and "samples/s" in line and "ETA" in line for line in lines)


@pytest.mark.slow  # a few gmm2d runs: tens of seconds on 2 loaded cores
def test_stage2_logs_rl_and_distillation_losses_at_every_log_step(root: Path, cache: Path):
    s1 = gmm_cfg(root, cache, "s1", "stage1.iterations=4", "tracking.log_every=4")
    main(s1, "stage1")
    s2 = gmm_cfg(root, cache, "s2", f"stage2.init_from={s1.run_dir}", "stage2.rl_per_dm=5", "stage2.iterations=18",
                 "tracking.log_every=6", "health.monitors=false")
    main(s2, "stage2")
    logged = histories(root, run_id_of(s2))
    for key in ("loss/rl", "loss/dmd", "loss/gan_g", "loss/fake", "loss/d"):
        assert [m.step for m in logged[key]] == [6, 12, 18], key
    # 5 RL updates to 1 distillation update in every window of 6 iterations; the fake score and D every one
    assert [m.value for m in logged["steps/loss/rl"]] == [5.0] * 3 and [m.value for m in logged["steps/loss/dmd"]] == [1.0] * 3
    assert [m.value for m in logged["steps/loss/fake"]] == [6.0] * 3
    tags = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_run(run_id_of(s2)).data.tags
    assert tags["parent"] == "s1" and tags["job"] == "stage2" and "rl5:1" in tags["mode"]
    assert "s1" in tags["mlflow.note.content"]


@pytest.mark.slow  # a few gmm2d runs: tens of seconds on 2 loaded cores
def test_gmm_quality_is_logged_beside_the_teacher_and_above_the_noise_floor(root: Path, cache: Path):
    cfg = gmm_cfg(root, cache, "quality", "stage1.iterations=4", "tracking.sample_every=2", "tracking.log_every=2")
    main(cfg, "stage1")
    logged = histories(root, run_id_of(cfg))
    for key in ("eval/sw2", "eval/sw2_teacher", "eval/sw2_floor", "eval/modes_covered", "eval/mean_reward",
                *(f"eval/mode_mass/m{k}" for k in range(cfg.model.gmm.num_modes))):
        assert [m.step for m in logged[key]] == [2, 4], key
    floor, teacher = logged["eval/sw2_floor"][0].value, logged["eval/sw2_teacher"][0].value
    assert floor < teacher / 5  # the measurement resolves differences far smaller than the teacher's own error
    assert sum(logged[f"eval/mode_mass/m{k}"][-1].value for k in range(cfg.model.gmm.num_modes)) == pytest.approx(1.0)


@pytest.mark.slow  # a few gmm2d runs: tens of seconds on 2 loaded cores
def test_rerun_with_another_config_is_refused_unless_resume_is_asked(root: Path, cache: Path, monkeypatch):
    base = ("stage1.iterations=4", "tracking.log_every=2", "checkpoint.every=2")
    main(gmm_cfg(root, cache, "rerun", *base), "stage1")
    changed = gmm_cfg(root, cache, "rerun", *base, "stage1.fake_lr=0.002", "launch.time_minutes=99")
    with pytest.raises(ConfigError) as err:
        main(changed, "stage1")
    message = str(err.value)
    assert "stage1.fake_lr: 0.001 -> 0.002" in message and "--resume" in message
    assert "launch.time_minutes" not in message  # resources may change between submissions of one run
    monkeypatch.setenv(RESUME_ENV, "1")
    main(changed, "stage1")
    assert "fake_lr: 0.002" in (changed.run_dir / "config.yaml").read_text()
    monkeypatch.delenv(RESUME_ENV)
    main(gmm_cfg(root, cache, "rerun", *base, "stage1.fake_lr=0.002"), "stage1")  # the same as saved: resumes


def test_bad_samples_are_counted_and_listed_once_each(tmp_path: Path, monkeypatch):
    from flashdmd.data.bad_samples import RECORD_ENV, BadSamples, recorded_bad_samples

    listing = tmp_path / "bad_samples.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(listing))
    tally = BadSamples(where="rank 0 worker 0")
    for _ in range(3):  # three epochs over the same broken sample
        tally.bad("corrupt_image", "k1", "s-000001.tar", "truncated")
        tally.ok()
    tally.bad("missing_caption", "k2", "s-000002.tar")
    assert dict(tally.counts) == {"corrupt_image": 1, "missing_caption": 1}
    assert tally.seen == 5 and tally.good == 3  # re-reads of a known bad item are not reads of new data
    other = BadSamples(where="rank 1 worker 0")  # another process that met k1 too
    other.bad("corrupt_image", "k1", "s-000001.tar", "truncated")
    assert len(listing.read_text().splitlines()) == 3
    assert [(i["shard"], i["key"], i["reason"]) for i in recorded_bad_samples(listing)] == [
        ("s-000001.tar", "k1", "corrupt_image"), ("s-000002.tar", "k2", "missing_caption")]
