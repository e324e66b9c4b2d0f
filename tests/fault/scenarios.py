"""The fault matrix: each scenario injects one fault into a real run and returns a
``Row`` (fault, outcome, steps lost, steps redone, data lost) after checking what survived.

Shared by the tests in this folder (which assert every row) and ``bench/fault_matrix.py`` (which
writes the table). Runs use the gmm2d toy (a trained MLP teacher, cached once) with few steps;
multi-rank runs are real processes over gloo with the launcher's environment variables, faults
come in through ``FLASHDMD_FAULTS`` (flashdmd/train/faults.py), nothing is patched.

Definitions: "steps lost" = training steps of the requested run that never made it into the
final state and its MLflow record (must be 0); "steps redone" = steps completed before the fault
but after the last valid checkpoint, computed again after the resume (bounded by
checkpoint.every); "data lost" = any metric step, checkpoint or sample that a rerun could not
recover.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow_store import migrated_store

from flashdmd.train.checkpoint import latest_valid, step_dirs
from flashdmd.config import REPO_ROOT, Config, load_config
from flashdmd.train.faults import ENV as FAULTS_ENV
from flashdmd.infra.tracking import read_jsonl

ITERATIONS = 8
EVERY = 2
TIMEOUT_S = 15  # engine.collective_timeout_s of the multi-rank runs


@dataclass
class Row:
    fault: str
    outcome: str
    steps_lost: int
    steps_redone: int
    data_lost: bool
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- runs ------------------------------------------------------------------------------------------


def gmm_overrides(root: Path, cache: Path, name: str, *extra: str) -> list[str]:
    return [
        f"run_root={root}", f"name={name}", f"model.cache_dir={cache}", "model.gmm.teacher_steps=100",
        "model.gmm.hidden=64", "data.batch_size=32", f"stage1.iterations={ITERATIONS}", "stage2.iterations=3",
        f"checkpoint.every={EVERY}", "checkpoint.keep_last=10", "tracking.log_every=1", "tracking.sample_every=0",
        f"engine.collective_timeout_s={TIMEOUT_S}", "health.monitor_batch=16", *extra,
    ]


def gmm_cfg(root: Path, cache: Path, name: str, *extra: str) -> Config:
    return load_config("gmm2d", gmm_overrides(root, cache, name, *extra))


def build_cache(cache: Path) -> Path:
    from flashdmd.nets.registry import build_parts

    build_parts(gmm_cfg(cache.parent, cache, "cache"), cache)
    return cache


@contextlib.contextmanager
def faults_env(spec: str) -> Iterator[None]:
    """Set the test-only fault variable for an in-process run, and clear it afterwards."""
    old = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = spec
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = old


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Launch:
    returncodes: list[int]
    exit_times: list[float]  # seconds since start, per rank
    logs: list[str]


def launch(overrides: list[str], world: int = 2, faults: str = "", job: str = "stage1", timeout_s: float = 300) -> Launch:
    """``world`` ranks of ``python -m flashdmd.train.main`` over gloo, as torchrun would start them."""
    port = free_port()
    procs, files = [], []
    log_dir = Path(overrides[0].split("=", 1)[1])
    started = time.perf_counter()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
        env.pop(FAULTS_ENV, None)
        if faults:
            env[FAULTS_ENV] = faults
        out = open(log_dir / f"launch-{port}-rank{rank}.log", "w+")  # noqa: SIM115 -- closed below
        files.append(out)
        procs.append(subprocess.Popen([sys.executable, "-m", "flashdmd.train", "--job", job, "--config", "gmm2d",
                                       *overrides], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    exit_times: list[float | None] = [None] * world
    while any(t is None for t in exit_times):
        for rank, proc in enumerate(procs):
            if exit_times[rank] is None and proc.poll() is not None:
                exit_times[rank] = time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            for proc in procs:
                proc.kill()
            raise TimeoutError(f"ranks still running after {timeout_s} s (a hang past the collective timeout)")
        time.sleep(0.1)
    logs = []
    for out in files:
        out.seek(0)
        logs.append(out.read())
        out.close()
    return Launch([p.returncode for p in procs], [float(t) for t in exit_times], logs)


def metric_steps(root: Path, run_id: str, key: str, uri: str | None = None) -> list[int]:
    client = mlflow.MlflowClient(tracking_uri=uri or f"sqlite:///{root / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def metric_values(root: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def handoff(cfg: Config) -> dict[str, Any]:
    return json.loads((cfg.run_dir / "final" / "handoff.json").read_text())


def jsonl_steps(cfg: Config) -> list[int]:
    path = cfg.run_dir / "metrics.jsonl"
    return sorted({int(r["step"]) for r in read_jsonl(path) if "step" in r}) if path.exists() else []


def _missing_steps(steps: list[int]) -> int:
    return len(set(range(1, ITERATIONS + 1)) - set(steps))


# -- 1. kill -9 of one rank ------------------------------------------------------------------------


def kill_rank(root: Path, cache: Path, phase: str) -> Row:
    """Rank 1 killed mid-step (iteration 5) or mid-save (step 6's checkpoint); rerun resumes."""
    started = time.perf_counter()
    migrated_store(root)
    fault = "kill_step@5:rank=1" if phase == "step" else "kill_save@6:rank=1"
    cfg = gmm_cfg(root, cache, f"kill-{phase}")
    overrides = gmm_overrides(root, cache, f"kill-{phase}")
    first = launch(overrides, faults=fault, timeout_s=TIMEOUT_S + 240)
    detected_s = first.exit_times[0] - first.exit_times[1]
    completed = max(jsonl_steps(cfg), default=0)
    valid = latest_valid(cfg.checkpoint_dir)
    partial = [p.name for _, p in step_dirs(cfg.checkpoint_dir) if not (p / "COMPLETE").exists()]
    second = launch(overrides, timeout_s=300)
    resumed = re.search(r"resuming run \S+ from step (\d+)", second.logs[0])
    meta = handoff(cfg)
    steps = metric_steps(root, meta["mlflow_run_id"], "loss/fake")
    ok = (first.returncodes[1] == -9 and first.returncodes[0] != 0 and second.returncodes == [0, 0]
          and resumed is not None and meta["step"] == ITERATIONS)
    resumed_step = int(resumed.group(1)) if resumed else -1
    return Row(
        fault=f"kill -9 rank 1 mid-{phase} (2 ranks, DDP/gloo)",
        outcome=(f"job failed {detected_s:.1f} s after the kill (timeout {TIMEOUT_S} s); rerun resumed from step "
                 f"{resumed_step} and finished" if ok else "FAILED: " + json.dumps(first.returncodes + second.returncodes)),
        steps_lost=ITERATIONS - meta["step"] + _missing_steps(steps),
        steps_redone=max(0, completed - resumed_step),
        data_lost=not ok or _missing_steps(steps) > 0,
        seconds=time.perf_counter() - started,
        detail={"returncodes_first": first.returncodes, "returncodes_rerun": second.returncodes,
                "detected_after_s": detected_s, "completed_before_kill": completed,
                "valid_before_rerun": valid.name if valid else None, "partial_dirs": partial,
                "resumed_step": resumed_step, "metric_steps": steps},
    )


# -- 2. NaN / Inf ------------------------------------------------------------------------------------


def nonfinite_skip(root: Path, cache: Path, spec: str, label: str) -> Row:
    """One poisoned step in an in-process run: skipped, counted, the run finishes."""
    from flashdmd.train.main import main

    started = time.perf_counter()
    migrated_store(root)
    cfg = gmm_cfg(root, cache, "skip-" + label.replace(" ", "-"))
    with faults_env(spec):
        main(cfg, "stage1")
    meta = handoff(cfg)
    skipped = metric_values(root, meta["mlflow_run_id"], "health/skipped_steps")
    steps = metric_steps(root, meta["mlflow_run_id"], "loss/fake")
    counted = [s for s, v in sorted(skipped.items()) if v >= 1]
    ok = meta["step"] == ITERATIONS and counted[:1] == [int(spec.split("@")[1].split(":")[0])] and skipped[ITERATIONS] == 1
    return Row(fault=f"{label} at step 3 (1 rank)", outcome="step skipped and counted; run finished" if ok else f"FAILED: {skipped}",
               steps_lost=_missing_steps(steps), steps_redone=0, data_lost=not ok,
               seconds=time.perf_counter() - started, detail={"skipped_steps": skipped})


def nonfinite_two_ranks(root: Path, cache: Path) -> Row:
    """Inf in rank 1's discriminator output only: both ranks skip step 3 and agree on the count."""
    started = time.perf_counter()
    migrated_store(root)
    cfg = gmm_cfg(root, cache, "skip-2ranks")
    run = launch(gmm_overrides(root, cache, "skip-2ranks"), faults="inf_loss@3:rank=1:net=discriminator")
    both = [bool(re.search(r"step 3: non-finite .* update skipped \(1 in a row, 1 in all\)", log)) for log in run.logs]
    meta = handoff(cfg)
    skipped = metric_values(root, meta["mlflow_run_id"], "health/skipped_steps")
    steps = metric_steps(root, meta["mlflow_run_id"], "loss/fake")
    ok = run.returncodes == [0, 0] and all(both) and skipped.get(2) == 0 and skipped.get(3) == 1 and skipped[ITERATIONS] == 1
    return Row(fault="Inf loss on rank 1 only at step 3 (2 ranks)",
               outcome="both ranks skipped step 3 together; run finished" if ok else f"FAILED: {run.returncodes} {both}",
               steps_lost=_missing_steps(steps), steps_redone=0, data_lost=not ok,
               seconds=time.perf_counter() - started, detail={"skipped_steps": skipped, "ranks_saw_skip": both})


def nonfinite_rollback(root: Path, cache: Path) -> Row:
    """Steps 5-7 poisoned (3 in a row): back to step 6's checkpoint at half the learning rates."""
    from flashdmd.train.main import main

    started = time.perf_counter()
    migrated_store(root)
    cfg = gmm_cfg(root, cache, "rollback", "health.max_consecutive_nonfinite=3", "stage1.lr_schedule=constant")
    with faults_env("nan_grad@5:net=fake_score,nan_grad@6:net=fake_score,nan_grad@7:net=fake_score"):
        main(cfg, "stage1")
    meta = handoff(cfg)
    lr = metric_values(root, meta["mlflow_run_id"], "fake_score_lr")
    scale = metric_values(root, meta["mlflow_run_id"], "health/lr_scale")
    trainer = json.loads((latest_valid(cfg.checkpoint_dir) / "trainer.json").read_text())
    steps = metric_steps(root, meta["mlflow_run_id"], "loss/fake")
    ok = (meta["step"] == ITERATIONS and math.isclose(lr[ITERATIONS], 0.5 * cfg.stage1.fake_lr)
          and math.isclose(lr[4], cfg.stage1.fake_lr) and scale[ITERATIONS] == 0.5 and trainer["guard"]["rollbacks"] == 1)
    return Row(fault="NaN gradients 3 steps in a row (steps 5-7)",
               outcome="rolled back to step 6 at 0.5x learning rates; run finished" if ok else f"FAILED: {lr} {scale}",
               steps_lost=_missing_steps(steps), steps_redone=1, data_lost=not ok,  # step 7, run again after the rollback
               seconds=time.perf_counter() - started, detail={"fake_score_lr": lr, "guard": trainer["guard"]})


def nonfinite_stop(root: Path, cache: Path) -> Row:
    """health.on_nonfinite=stop: two poisoned steps in a row end the run with a clear message."""
    from flashdmd.train.guard import TrainingHealthError
    from flashdmd.train.main import main

    started = time.perf_counter()
    migrated_store(root)
    cfg = gmm_cfg(root, cache, "stop", "health.on_nonfinite=stop", "health.max_consecutive_nonfinite=2")
    message = ""
    with faults_env("inf_grad@3:net=fake_score,inf_grad@4:net=fake_score"):
        try:
            main(cfg, "stage1")
        except TrainingHealthError as err:
            message = str(err)
    valid = latest_valid(cfg.checkpoint_dir)
    ok = "2 consecutive steps (3..4)" in message and "health.on_nonfinite=stop" in message and valid is not None
    return Row(fault="Inf gradients 2 steps in a row, on_nonfinite=stop",
               outcome="stopped with a clear message; step 2 checkpoint intact" if ok else f"FAILED: {message!r}",
               steps_lost=0, steps_redone=0, data_lost=not ok, seconds=time.perf_counter() - started,
               detail={"message": message, "valid": valid.name if valid else None})


# -- 4. bad configs ----------------------------------------------------------------------------------

# (category, job, overrides or a YAML text for --config, fragment the error must contain)
NO_STEPS = ["stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage2.rl_transitions=[]"]
MUTATIONS: list[tuple[str, str, list[str] | str, str]] = [
    ("wrong type", "stage1", ["stage1.ttur=two"], "stage1.ttur: expected int"),
    ("wrong type", "stage1", ["stage1.generator_lr=fast"], "stage1.generator_lr: expected float"),
    ("wrong type", "stage1", ["data.batch_size=[1,2]"], "data.batch_size: expected int"),
    ("wrong type", "stage1", ["engine.kind=ddp"], "engine.kind: expected one of"),
    ("wrong type", "stage1", ["stage1.fake_ema=maybe"], "stage1.fake_ema: expected bool"),
    ("wrong type", "stage1", ["model.lora.rank=1.5"], "model.lora.rank: expected int"),
    ("wrong type", "stage1", ["stage1.student_timesteps=999"], "stage1.student_timesteps: expected list"),
    ("wrong type", "stage1", ["tracking.tags=[a]"], "tracking.tags: expected dict"),
    ("wrong type", "stage1", ["launch.nodes=null"], "launch.nodes: expected int"),
    ("wrong type", "stage1", ["health.on_nonfinite=ignore"], "health.on_nonfinite: expected one of"),
    ("unknown key", "stage1", ["stage1.tturr=2"], "did you mean 'stage1.ttur'"),
    ("unknown key", "stage1", ["engine.knd=fsdp"], "engine.knd"),
    ("unknown key", "stage1", ["foo.bar=1"], "unknown config key 'foo'"),
    ("unknown key", "stage1", ["model.gmm.radiuss=2"], "model.gmm.radiuss"),
    ("unknown key", "stage1", ["stage1=3"], "is a section"),
    ("unknown key", "stage1", ["health.max_nonfinite=3"], "health.max_nonfinite"),
    ("unknown key", "stage1", "stage1:\n  iterationz: 5\n", "stage1.iterationz"),
    ("out of range", "stage1", ["stage1.ttur=0"], "stage1.ttur must be >= 1"),
    ("out of range", "stage1", ["stage2.beta=0"], "beta must be > 0"),
    ("out of range", "stage1", ["data.resolution=30"], "multiple of 8"),
    ("out of range", "stage1", ["checkpoint.keep_last=0"], "keep_last"),
    ("out of range", "stage1", ["health.rollback_lr_factor=2"], "rollback_lr_factor"),
    ("out of range", "stage1", ["stage1.fake_ema_decay=1.5"], "fake_ema_decay"),
    ("out of range", "stage1", ["engine.collective_timeout_s=0"], "collective_timeout_s"),
    ("out of range", "stage1", ["data.max_bad_fraction=-0.1"], "max_bad_fraction"),
    ("out of range", "stage1", ["launch.time_minutes=1", "launch.signal_lead_s=600"], "signal_lead_s"),
    ("inconsistent timesteps", "stage1", ["stage1.student_timesteps=[249,499,749,999]", *NO_STEPS], "strictly decreasing"),
    ("inconsistent timesteps", "stage1", ["stage1.dm_steps=[998]"], "dm_steps must be among"),
    ("inconsistent timesteps", "stage1", ["stage1.gan_steps=[1]"], "gan_steps must be among"),
    ("inconsistent timesteps", "stage1", ["stage2.rl_transitions=[[999,1]]"], "consecutive stage1.student_timesteps"),
    ("inconsistent timesteps", "stage1", ["stage1.student_timesteps=[1999,999]", *NO_STEPS], "must lie in [0, 999]"),
    ("inconsistent timesteps", "stage1", ["stage1.student_timesteps=[]", *NO_STEPS], "must not be empty"),
    ("missing path", "stage1", "/nonexistent/{preset}.yaml", "does not exist"),
    ("missing path", "stage1", "{preset}x", "unknown preset"),
    ("missing path", "stage1", ["model.teacher=/nonexistent/teacher"], "model.teacher='/nonexistent/teacher'"),
    ("missing path", "stage1", ["data.shards=/nonexistent/x-{000000..000003}.tar"], "none of its 4 shard files exist"),
    ("missing path", "stage2", ["stage2.init_from=/nonexistent/run"], "stage2.init_from='/nonexistent/run'"),
    ("missing path", "stage1", ["data.prompts=/nonexistent/prompts.txt"], "data.prompts"),
    ("missing path", "stage1", ["model.reward_model=./nonexistent/lrm.safetensors"], "model.reward_model"),
    ("bad file", "stage1", "stage1: [1, 2\n", "not valid YAML"),
    ("bad file", "stage1", "- {preset}\n- 2\n", "expected a mapping at the top level"),
    ("bad file", "stage1", "stage1:\n  ttur: fast\n", "stage1.ttur: expected int"),
]
PRESETS = ("gmm2d", "tiny-sdxl", "sdxl-4step", "sd3-medium-4step", "tiny-sd3", "sd15-4step", "sdxl-8step", "tiny-sd15")


def _applies(fragment: str, preset: str) -> bool:
    """Shard and prompt paths are not read by the gmm2d toy, and a YAML text replaces the preset."""
    return not (preset == "gmm2d" and ("shard" in fragment or "data.prompts" in fragment))


def config_variants(tmp: Path, count: int = 100) -> list[dict[str, Any]]:
    """``count`` (preset x mutation) variants, every mutation on several presets."""
    variants: list[dict[str, Any]] = []
    i = 0
    while len(variants) < count:
        category, job, change, fragment = MUTATIONS[i % len(MUTATIONS)]
        preset = PRESETS[(i // len(MUTATIONS) + i) % len(PRESETS)]
        i += 1
        if not _applies(fragment, preset):
            continue
        config, overrides = preset, []
        if isinstance(change, str) and "\n" in change:  # a mutated YAML file based on the preset
            path = tmp / f"variant-{len(variants):03d}.yaml"
            text = change.format(preset=preset) if change.startswith("-") else f"base: {preset}\n{change}"
            path.write_text(text)
            config = str(path)
        elif isinstance(change, str):  # another --config, derived from the preset's name
            config = change.format(preset=preset)
        else:
            overrides = list(change)
        variants.append({"category": category, "job": job, "config": config, "overrides": overrides, "fragment": fragment})
    return variants


def check_variant(variant: dict[str, Any]) -> dict[str, Any]:
    """Run jobs/submit.py --dry-run in-process, then the pre-submission path check; never a traceback."""
    import io
    import traceback

    from flashdmd.config import ConfigError
    from flashdmd.apps.preflight import preflight_all
    from jobs import submit

    argv = [variant["job"], "--config", variant["config"], "--dry-run", *variant["overrides"]]
    out, err = io.StringIO(), io.StringIO()
    caught_by, message = "nothing", ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = submit.main(argv)
        if rc != 0:
            caught_by, message = "submit --dry-run", err.getvalue()
        else:
            preflight_all(submit.resolve_all(submit.parse_args(argv)))
    except ConfigError as error:
        caught_by, message = "preflight", str(error)
    except SystemExit as error:  # argparse's own usage error
        caught_by, message = f"argparse (exit {error.code})", err.getvalue()
    except Exception:  # noqa: BLE001 -- the thing this matrix forbids: record it
        caught_by, message = "TRACEBACK", traceback.format_exc()
    clear = variant["fragment"] in message and "Traceback" not in message
    return {**variant, "caught_by": caught_by, "clear": clear, "message": message.strip()[-400:]}


def bad_configs(tmp: Path) -> tuple[Row, list[dict[str, Any]]]:
    started = time.perf_counter()
    tmp.mkdir(parents=True, exist_ok=True)
    results = [check_variant(v) for v in config_variants(tmp)]
    unclear = [r for r in results if not r["clear"]]
    by = {k: sum(r["caught_by"] == k for r in results) for k in sorted({r["caught_by"] for r in results})}
    return Row(fault=f"{len(results)} mutated preset configs", outcome=(
        f"all refused with a clear error before submission ({', '.join(f'{k}: {n}' for k, n in by.items())})"
        if not unclear else f"FAILED: {len(unclear)} unclear"),
        steps_lost=0, steps_redone=0, data_lost=bool(unclear), seconds=time.perf_counter() - started,
        detail={"caught_by": by, "unclear": unclear[:5]}), results


# -- 7. foreign checkpoints ----------------------------------------------------------------------------


def foreign_checkpoint(root: Path, cache: Path) -> Row:
    """A run directory holding another family's or another config's checkpoint is refused, naming the difference."""
    from flashdmd.train.compat import IncompatibleCheckpoint
    from flashdmd.train.main import main

    started = time.perf_counter()
    migrated_store(root)
    cfg = gmm_cfg(root, cache, "foreign", "stage1.iterations=2")
    main(cfg, "stage1")
    valid = latest_valid(cfg.checkpoint_dir)
    before = {p.name: p.read_bytes() for p in valid.iterdir()}
    messages = {}
    other_steps = ["stage1.student_timesteps=[999,499]", "stage2.rl_transitions=[[999,499]]", "stage1.dm_steps=[]",
                   "stage1.gan_steps=[]"]
    try:
        main(gmm_cfg(root, cache, "foreign", *other_steps), "stage1")
    except IncompatibleCheckpoint as err:
        messages["timesteps"] = str(err)
    trainer_path = valid / "trainer.json"
    trainer = json.loads(trainer_path.read_text())
    trainer_path.write_text(json.dumps({**trainer, "family": "tiny-sdxl"}))
    try:
        main(gmm_cfg(root, cache, "foreign", "stage1.iterations=4"), "stage1")
    except IncompatibleCheckpoint as err:
        messages["family"] = str(err)
    trainer_path.write_bytes(before["trainer.json"])
    untouched = {p.name: p.read_bytes() for p in valid.iterdir()} == before
    ok = ("student_timesteps: checkpoint [999, 749, 499, 249] != this run [999, 499]" in messages.get("timesteps", "")
          and "family: checkpoint 'tiny-sdxl' != this run 'gmm2d'" in messages.get("family", "") and untouched)
    return Row(fault="resume from another family's / config's checkpoint",
               outcome="refused, naming what differs; checkpoint untouched" if ok else f"FAILED: {messages}",
               steps_lost=0, steps_redone=0, data_lost=not untouched, seconds=time.perf_counter() - started,
               detail={"messages": messages})


# -- 3. health monitors --------------------------------------------------------------------------------


def health_monitors(root: Path, cache: Path) -> Row:
    """Stage 1 then stage 2 with tight bounds: every monitor is logged each step, and flags + warns."""
    from flashdmd.train.main import main

    started = time.perf_counter()
    migrated_store(root)
    s1 = gmm_cfg(root, cache, "health-s1", "health.fake_lag_max=1e-9", "health.d_logit_gap_max=1e9")
    main(s1, "stage1")
    s2 = gmm_cfg(root, cache, "health-s2", f"stage2.init_from={s1.run_dir}", "stage2.rl_per_dm=1", "health.diversity_min=1e9")
    main(s2, "stage2")
    run1, run2 = handoff(s1)["mlflow_run_id"], handoff(s2)["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    keys1, keys2 = set(client.get_run(run1).data.metrics), set(client.get_run(run2).data.metrics)
    every = list(range(1, ITERATIONS + 1))
    logged = {key: metric_steps(root, run1, key) == every for key in (
        "health/fake_lag", "health/d_logit_gap", "health/latent_mean_drift", "health/latent_std_drift",
        "health/out_of_bounds/fake_lag")}
    logged["health/dm_grad_norm/t*"] = any(k.startswith("health/dm_grad_norm/t") for k in keys1)
    logged.update({key: metric_steps(root, run2, key) == [1, 2, 3] for key in (
        "health/reward", "health/diversity", "health/out_of_bounds/diversity")})
    ok = all(logged.values())
    return Row(fault="health monitors with tight bounds (stage 1 + stage 2)",
               outcome="every monitor logged at every step; out-of-bounds ones flagged and warned" if ok
               else f"FAILED: {logged}",
               steps_lost=0, steps_redone=0, data_lost=not ok, seconds=time.perf_counter() - started,
               detail={"stage1_run": run1, "stage2_run": run2, "stage1_keys": sorted(keys1), "stage2_keys": sorted(keys2),
                       "logged": logged})


# -- 5. corrupt data -----------------------------------------------------------------------------------

SAMPLES = 1000
MAX_BAD = 0.05


def corrupt_shards(out: Path, rate: float) -> tuple[str, set[str], set[str]]:
    """``SAMPLES`` toy samples in 8 real tar shards, every ``1/rate``-th one's image bytes garbage."""
    from data_tools.make_shards import write_shards
    from data_tools.make_toy_shards import toy_samples

    n_bad = round(SAMPLES * rate)
    bad = {f"{i:08d}" for i in range(0, SAMPLES, SAMPLES // n_bad)} if n_bad else set()

    def samples() -> Iterator[dict[str, Any]]:
        for sample in toy_samples(SAMPLES, size=16):
            if sample["__key__"] in bad:
                sample = {**sample, "png": b"\x89PNG but not really" + sample["__key__"].encode()}
            yield sample

    write_shards(samples(), out, "part", maxcount=SAMPLES // 8)
    good = {f"{i:08d}" for i in range(SAMPLES)} - bad
    return f"{out}/part-{{000000..000007}}.tar", good, bad


def corrupt_data(root: Path, rate: float) -> Row:
    """One epoch of the trainer's image stream over shards with ``rate`` corrupt samples."""
    from flashdmd.data import DataError, build_image_loader

    started = time.perf_counter()
    pattern, good, bad = corrupt_shards(root / f"shards-{rate}", rate)
    cfg = load_config("tiny-sdxl", [
        f"data.shards={pattern}", "data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=0",
        "data.resampled=false", f"data.epoch_length={SAMPLES // 8}", f"data.max_bad_fraction={MAX_BAD}",
        "data.bad_check_after=100",
    ])
    loader = build_image_loader(cfg, 0, 1)
    keys: list[str] = []
    error = ""
    try:
        for batch in loader:
            keys.extend(batch["key"])
    except DataError as err:
        error = str(err)
    counts = loader.bad_counts()
    label = f"{rate:.1%} corrupt images ({len(bad)} of {SAMPLES}), max_bad_fraction={MAX_BAD}"
    if rate <= MAX_BAD:
        # every good sample delivered (the epoch is topped up to data.epoch_length batches), no bad one, each counted
        lost = good - set(keys)
        ok = not error and counts == {"corrupt_image": len(bad)} and not lost
        outcome = f"completed; skipped and counted {counts}" if ok else f"FAILED: {error or counts}"
        return Row(fault=label, outcome=outcome, steps_lost=0, steps_redone=0, data_lost=not ok or bool(set(keys) & bad),
                   seconds=time.perf_counter() - started,
                   detail={"delivered": len(keys), "distinct": len(set(keys)), "counts": counts, "undelivered_good": len(lost)})
    ok = "data.max_bad_fraction=0.05" in error and "corrupt_image" in error and "part-000000.tar" in error
    return Row(fault=label, outcome="stopped with a clear error" if ok else f"FAILED: {error!r}", steps_lost=0,
               steps_redone=0, data_lost=not ok, seconds=time.perf_counter() - started,
               detail={"error": error, "delivered_before_stop": len(keys)})


# -- 6. MLflow server killed mid-run ---------------------------------------------------------------------

OUTAGE_ITERATIONS = 30


def mlflow_outage(root: Path, cache: Path) -> Row:
    """kill -9 of the MLflow server at step >= 5, restarted at step >= 15 on the same port and store."""
    import signal

    from mlflow_server import MlflowServer

    started = time.perf_counter()
    server = MlflowServer(root / "server", port=free_port()).start()
    overrides = gmm_overrides(root, cache, "outage", f"tracking.uri={server.uri}",
                              f"stage1.iterations={OUTAGE_ITERATIONS}", "checkpoint.every=10")
    cfg = load_config("gmm2d", overrides)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="5", **{FAULTS_ENV: "delay@0:ms=150"})
    log_path = root / "outage-train.log"
    events: dict[str, int] = {}
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "flashdmd.train", "--job", "stage1", "--config", "gmm2d",
                                     *overrides], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                step = max(jsonl_steps(cfg), default=0)
                if "killed_at" not in events and step >= 5:
                    os.killpg(server.proc.pid, signal.SIGKILL)
                    server.proc.wait()
                    server.proc = None
                    events["killed_at"] = step
                elif "killed_at" in events and "restarted_at" not in events and step >= 15:
                    events["restarted_at"] = step
                    server.start()
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
            events["returncode"] = proc.wait()
        if "restarted_at" not in events:  # the run ended first: bring the server back to read it
            server.start()
        run_id = handoff(cfg)["mlflow_run_id"]
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        deadline = time.time() + 60  # the trainer's writer has delivered at close; allow the store to settle
        steps = metric_steps(root, run_id, "loss/fake", uri=server.uri)
        while steps != list(range(1, OUTAGE_ITERATIONS + 1)) and time.time() < deadline:
            time.sleep(1)
            steps = metric_steps(root, run_id, "loss/fake", uri=server.uri)
        status = client.get_run(run_id).info.status
    finally:
        server.stop()
    missing = len(set(range(1, OUTAGE_ITERATIONS + 1)) - set(steps))
    ok = events.get("returncode") == 0 and "restarted_at" in events and missing == 0 and status == "FINISHED"
    return Row(fault="MLflow server kill -9 mid-run, restarted later",
               outcome=(f"training went on (killed at step {events.get('killed_at')}, back at step "
                        f"{events.get('restarted_at')}); every step in the run" if ok else f"FAILED: {events} {status}"),
               steps_lost=missing, steps_redone=0, data_lost=not ok, seconds=time.perf_counter() - started,
               detail={**events, "metric_steps": len(steps), "status": status})


# The training runs only prove the trainer's side (skip, count, log to MLflow, or stop): the
# stream-level cases above already sweep the fractions over all 1000 samples. One bad image in a
# few small steps shows skip-and-count; the abort rule is judged after a short window.
TRAIN_ITERATIONS = 4
TRAIN_BATCH = 4
TRAIN_CHECK_AFTER = 20


def corrupt_training(root: Path, cache: Path, rate: float, iterations: int = 0) -> Row:
    """A tiny-sdxl stage-1 run over the corrupt shards: completes and logs its counts to MLflow
    below data.max_bad_fraction, stops with DataError naming the rule above it (judged after
    ``TRAIN_CHECK_AFTER`` items). ``iterations`` 0: ``TRAIN_ITERATIONS`` below the threshold, and
    above it enough steps to read past the judging window."""
    import logging

    iterations = iterations or (TRAIN_ITERATIONS if rate <= MAX_BAD else 4 * TRAIN_CHECK_AFTER // TRAIN_BATCH)

    from flashdmd.data import DataError
    from flashdmd.train.main import main

    started = time.perf_counter()
    migrated_store(root)
    pattern, _, bad = corrupt_shards(root / f"train-shards-{rate}", rate)
    cfg = load_config("tiny-sdxl", [
        f"run_root={root}", f"name=corrupt-{rate}", f"model.cache_dir={cache}", f"data.shards={pattern}",
        "data.resolution=32", f"data.batch_size={TRAIN_BATCH}", "data.shuffle_buffer=0", "data.resampled=false",
        f"data.epoch_length={SAMPLES // TRAIN_BATCH}", f"data.max_bad_fraction={MAX_BAD}",
        f"data.bad_check_after={TRAIN_CHECK_AFTER}", f"stage1.iterations={iterations}", f"checkpoint.every={iterations}",
        "tracking.sample_every=0", f"tracking.log_every={iterations}",
    ])
    skipped_keys: list[str] = []

    class Keys(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"\(corrupt_image\): key=(\d+)", record.getMessage())
            if found:
                skipped_keys.append(found.group(1))

    handler = Keys(level=logging.DEBUG)
    data_log = logging.getLogger("flashdmd.data")
    data_log.addHandler(handler)
    old_level = data_log.level
    data_log.setLevel(logging.DEBUG)
    error = ""
    try:
        main(cfg, "stage1")
    except DataError as err:
        error = str(err)
    finally:
        data_log.removeHandler(handler)
        data_log.setLevel(old_level)
    label = f"{rate:.1%} corrupt images in a tiny-sdxl training run ({iterations} steps of {TRAIN_BATCH})"
    if rate <= MAX_BAD:
        meta = handoff(cfg)
        logged = metric_values(root, meta["mlflow_run_id"], "data/bad_corrupt_image")
        ok = (not error and meta["step"] == iterations and bool(skipped_keys) and set(skipped_keys) <= bad
              and logged.get(iterations) == len(skipped_keys))
        return Row(fault=label, outcome=(f"completed; {len(skipped_keys)} skipped, counted in MLflow" if ok
                                         else f"FAILED: {error or logged}"),
                   steps_lost=iterations - meta["step"], steps_redone=0, data_lost=not ok,
                   seconds=time.perf_counter() - started, detail={"skipped_keys": skipped_keys, "logged": logged})
    ok = "data.max_bad_fraction=0.05" in error and "corrupt_image" in error and set(skipped_keys) <= bad
    return Row(fault=label, outcome="stopped with a clear error" if ok else f"FAILED: {error!r}", steps_lost=0,
               steps_redone=0, data_lost=not ok, seconds=time.perf_counter() - started,
               detail={"error": error, "skipped_keys": skipped_keys})
