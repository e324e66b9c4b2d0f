"""MLflow tracking of a run: rank 0 logs, every other rank holds a ``NullTracker``.

Implements issue 7 item 3 (see ../shared/research/anchors_jobsystem.md section 4).

Shape of the thing:

* ``open_tracker(cfg, rank, run_id, parent_run_id)`` returns a ``Tracker`` on rank 0 (a new MLflow
  run, or the continuation of ``run_id`` after a resume) and a ``NullTracker`` elsewhere.
* The training step never waits on MLflow.  ``log_metrics`` appends one line to
  ``<run_dir>/metrics.jsonl`` (the local copy and the source of truth) and queues the points; one
  background thread owns the ``MlflowClient`` (the fluent API is not thread safe) and sends
  queued points with ``log_batch`` every ``flush_interval_s``, images and artifacts as they come.
* An unreachable store never stops training.  The first failure is reported once; from then on
  points go only to the JSONL copy, and when the store answers again the thread re-syncs the run
  from the JSONL copy (``sync_from_jsonl``: only (key, step) pairs the run lacks are sent), so the
  run ends holding every step.  Other operations (tags, artifacts) are kept and retried in order.
* Continuing a run never duplicates a step: the JSONL copy is written before anything is sent, so
  its last step bounds what the run may already hold; ``log_metrics`` ignores steps up to it.  After
  a resume from checkpoint step S, the replayed steps S+1..k that were logged before the
  interruption therefore keep their first values (MLflow cannot delete single points).
* Params are immutable in MLflow, so a continued run does not re-log them; keys whose value
  changed are listed in the tag ``flashdmd.config_changed_on_resume``.

Store: ``cfg.tracking_uri`` (a server, or MLflow 3's SQLite default placed under the run root, with
artifacts in ``<run_root>/mlartifacts``).  For http(s) stores MLflow's own HTTP retries (7 with
exponential backoff by default, minutes per call) are turned down for this process unless the user
set them, because the thread here does its own retrying.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    path_not_unique,
    validate_param_and_metric_name,
)
from PIL import Image

from flashdmd.config import Config, flatten, to_dict, to_yaml
from flashdmd.repro import git_state, repro_bundle

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TRUNCATED = "...[truncated]"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the child under the parent


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _check_key(key: str) -> None:
    if len(key) > MAX_ENTITY_KEY_LENGTH or not validate_param_and_metric_name(key) or path_not_unique(key):
        raise ValueError(
            f"metric name {key!r} is not valid for MLflow: use letters, digits, '_', '-', '.', ' ', '/' "
            f"(no leading '/', no '..'), at most {MAX_ENTITY_KEY_LENGTH} characters"
        )


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened resolved config as MLflow params (values clipped to MLflow's length limit)."""
    return {key: _clip(str(value), MAX_PARAM_VAL_LENGTH) for key, value in flatten(to_dict(cfg)).items()}


def run_tags(cfg: Config, stage: str, git: dict[str, Any]) -> dict[str, str]:
    """The tags every run carries; ``cfg.tracking.tags`` win over the built-in ones."""
    tags = {
        "family": cfg.model.family,
        "stage": stage,
        "engine": cfg.engine.kind,
        "nodes": str(cfg.launch.nodes),
        "world_size": str(cfg.world_size),
        "git_commit": git["commit"],
        "git_dirty": str(git["dirty"]),
        "mlflow.source.git.commit": git["commit"],
        **cfg.tracking.tags,
    }
    return {key: _clip(str(value), MAX_TAG_VAL_LENGTH) for key, value in tags.items()}


def image_grid(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> one uint8 [rows*H', cols*W', 3] grid, near-square, 2 px padding."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"log_images expects a [N, 3, H, W] tensor in [-1, 1], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 2
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(3, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[:, top : top + h, left : left + w] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------
# Re-sync from the JSONL copy
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path, upto_bytes: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    with open(path, "rb") as handle:
        data = handle.read() if upto_bytes is None else handle.read(upto_bytes)
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def sync_from_jsonl(
    jsonl_path: str | Path, run_id: str, client: MlflowClient | str, upto_bytes: int | None = None
) -> int:
    """Send every (key, step) point of the JSONL copy that run ``run_id`` lacks; return how many.

    ``client`` is an ``MlflowClient`` or a tracking URI.  Points already in the run are left as they
    are, so calling this twice, or after a normal run, adds nothing.
    """
    client = MlflowClient(tracking_uri=client) if isinstance(client, str) else client
    records = read_jsonl(Path(jsonl_path), upto_bytes)
    keys = {key for record in records for key in record["metrics"]}
    present = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    missing = [
        Metric(key, float(value), record["time"], record["step"])
        for record in records
        for key, value in record["metrics"].items()
        if record["step"] not in present[key]
    ]
    for start in range(0, len(missing), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=missing[start : start + MAX_METRICS_PER_BATCH])
    return len(missing)


# --------------------------------------------------------------------------------------------
# Trackers
# --------------------------------------------------------------------------------------------


class NullTracker:
    """The tracker of ranks other than 0: the same interface, nothing logged."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, name: str, images: torch.Tensor, step: int) -> None:
        pass

    def log_config(self, cfg: Config) -> None:
        pass

    def log_checkpoint(self, path: str | Path, step: int) -> None:
        pass

    def flush(self, timeout_s: float = 60.0) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        pass


Op = Callable[[MlflowClient, str], None]


class Tracker(NullTracker):
    """Rank 0's MLflow logger; see the module docstring for the threading and failure model."""

    def __init__(
        self,
        client: MlflowClient,
        run_dir: Path,
        start_run: Callable[[MlflowClient], str],
        *,
        continuing: bool,
        flush_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._client = client
        self._run_dir = run_dir
        self._start_run = start_run
        self._interval = flush_interval_s
        self._max_backoff = max_backoff_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ready = threading.Event()  # set after the first attempt to start the run
        self._idle = threading.Event()  # set whenever nothing is pending
        self._closing = False
        self._run_id: str | None = None
        self._points: list[Metric] = []
        self._ops: collections.deque[Op] = collections.deque()
        self._failing = False  # the store did not answer; points go to the JSONL copy only
        self._needs_sync = continuing  # a continued run may lack points its JSONL copy holds
        self._failures = 0

        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / JSONL_NAME
        if not continuing and self.jsonl_path.exists():
            # a new run under an old run directory: keep the old copy, start a fresh one
            self.jsonl_path.rename(run_dir / f"metrics.{int(self.jsonl_path.stat().st_mtime)}.jsonl")
        records = read_jsonl(self.jsonl_path)
        self._skip_through = max((r["step"] for r in records), default=-1)
        self._jsonl = open(self.jsonl_path, "ab")
        self._jsonl_bytes = self._jsonl.tell()

        self._thread = threading.Thread(target=self._loop, name="flashdmd-mlflow", daemon=True)
        self._thread.start()

    # -- the interface ---------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None only while the store has not been reachable since the start."""
        return self._run_id

    @property
    def skip_through(self) -> int:
        """Steps up to this one are already recorded and are not logged again."""
        return self._skip_through

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``: a JSONL line now, MLflow from the background thread."""
        if step <= self._skip_through or not metrics:
            return
        values = {}
        for key, value in metrics.items():
            _check_key(key)
            values[key] = float(value)
        stamp = _now_ms()
        line = json.dumps({"step": step, "time": stamp, "metrics": values}).encode() + b"\n"
        with self._lock:
            self._jsonl.write(line)
            self._jsonl.flush()
            self._jsonl_bytes += len(line)
            if not self._failing:
                self._points.extend(Metric(k, v, stamp, step) for k, v in values.items())
            self._idle.clear()

    def log_images(self, name: str, images: torch.Tensor, step: int) -> None:
        """A PNG grid of ``images`` ([N, 3, H, W] in [-1, 1]) as artifact samples/<name>/step_<step>.png."""
        _check_key(name)
        grid = image_grid(images)
        path = self._run_dir / "samples" / name / f"step_{step:08d}.png"

        def op(client: MlflowClient, run_id: str) -> None:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(path)
            client.log_artifact(run_id, str(path), f"samples/{name}")

        self._submit(op)

    def log_config(self, cfg: Config) -> None:
        """The resolved config (config/config.yaml) and the reproducibility bundle (config/repro.json)."""
        files = {"config.yaml": to_yaml(cfg), "repro.json": json.dumps(repro_bundle(cfg), indent=2)}
        for name, text in files.items():
            (self._run_dir / name).write_text(text)

        def op(client: MlflowClient, run_id: str) -> None:
            for name in files:
                client.log_artifact(run_id, str(self._run_dir / name), "config")

        self._submit(op)

    def log_checkpoint(self, path: str | Path, step: int) -> None:
        """Reference a checkpoint by path (tags; multi-GB checkpoints are not uploaded)."""
        tags = [RunTag("checkpoint.path", _clip(str(path), MAX_TAG_VAL_LENGTH)), RunTag("checkpoint.step", str(step))]
        self._submit(lambda client, run_id: client.log_batch(run_id, tags=tags))

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything queued has reached the store; False if that took over ``timeout_s``."""
        self._wake.set()
        return self._idle.wait(timeout_s)

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Flush, mark the run ``status`` (FINISHED, FAILED, KILLED) and stop the thread.

        What could not be delivered within ``timeout_s`` stays in the JSONL copy; the message says
        how to send it later.
        """
        if status not in [RunStatus.to_string(s) for s in RunStatus.all_status()]:
            raise ValueError(f"close(status={status!r}): use FINISHED, FAILED or KILLED")
        self._submit(lambda client, run_id: client.set_terminated(run_id, status))
        delivered = self.flush(timeout_s)
        with self._lock:
            self._closing = True
            self._jsonl.close()
        self._wake.set()
        self._thread.join(timeout=5.0)
        if not delivered:
            log.warning(
                "MLflow: not everything reached %s before close; the metrics are in %s; send them with "
                "`python -m flashdmd.tracking sync %s %s --uri %s`",
                self._client.tracking_uri, self.jsonl_path, self.jsonl_path, self._run_id, self._client.tracking_uri,
            )

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the first attempt to start (or continue) the run."""
        return self._ready.wait(timeout_s)

    # -- the background thread --------------------------------------------------------------

    def _submit(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)
            self._idle.clear()
        self._wake.set()

    def _pending(self) -> bool:
        return bool(self._ops or self._points or self._needs_sync or self._failing or self._run_id is None)

    def _loop(self) -> None:
        while True:
            delay = min(self._interval * 2**self._failures, self._max_backoff) if self._failures else self._interval
            self._wake.wait(delay)
            self._wake.clear()
            delivered = self._deliver()
            self._ready.set()
            with self._lock:
                if delivered and not self._pending():
                    self._idle.set()
                if self._closing:
                    return

    def _deliver(self) -> bool:
        """Send what is pending, in order; on failure keep it, report once, return False."""
        try:
            if self._run_id is None:
                self._run_id = self._start_run(self._client)
            while self._ops:
                self._ops[0](self._client, self._run_id)
                with self._lock:
                    self._ops.popleft()
            if self._failing or self._needs_sync:
                with self._lock:  # the JSONL copy up to here holds every queued point
                    self._points.clear()
                    upto = self._jsonl_bytes
                    self._failing = False
                sent = sync_from_jsonl(self.jsonl_path, self._run_id, self._client, upto)
                if self._failures:
                    log.warning("MLflow: %s answers again; re-synced %d points from %s", self._client.tracking_uri, sent, self.jsonl_path)
                self._needs_sync = False
            while True:
                with self._lock:
                    batch = self._points[:MAX_METRICS_PER_BATCH]
                if not batch:
                    break
                self._client.log_batch(self._run_id, metrics=batch)
                with self._lock:
                    del self._points[: len(batch)]
        except Exception as err:  # noqa: BLE001 - any store failure must leave training running
            with self._lock:
                self._failing = True
                self._points.clear()
            if not self._failures:
                log.warning(
                    "MLflow: cannot reach %s (%s: %s); training continues, metrics go to %s and are "
                    "re-synced when the store answers",
                    self._client.tracking_uri, type(err).__name__, str(err).splitlines()[0][:300], self.jsonl_path,
                )
            self._failures += 1
            return False
        self._failures = 0
        return True


# --------------------------------------------------------------------------------------------
# Opening a tracker
# --------------------------------------------------------------------------------------------


def _experiment_id(client: MlflowClient, cfg: Config) -> str:
    name = cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        # MLflow would put artifacts in ./mlruns relative to the working directory
        location = (Path(cfg.run_root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another job created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _batched_log(
    client: MlflowClient, run_id: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None
) -> None:
    items_p = [Param(k, v) for k, v in (params or {}).items()]
    items_t = [RunTag(k, v) for k, v in (tags or {}).items()]
    for start in range(0, len(items_p), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items_p[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    for start in range(0, len(items_t), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items_t[start : start + MAX_PARAMS_TAGS_PER_BATCH])


def _run_starter(cfg: Config, stage: str, run_id: str | None, parent_run_id: str | None) -> Callable[[MlflowClient], str]:
    """The first operation of the background thread: create the run, or reopen ``run_id``."""
    params = config_params(cfg)
    git = git_state()

    def new_run(client: MlflowClient, extra: dict[str, str]) -> str:
        tags = {**run_tags(cfg, stage, git), **extra}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
            tags["flashdmd.parent_run_id"] = parent_run_id
        run = client.create_run(_experiment_id(client, cfg), run_name=cfg.tracking.run_name or cfg.name, tags=tags)
        _batched_log(client, run.info.run_id, params=params)
        return run.info.run_id

    def start(client: MlflowClient) -> str:
        if run_id is None:
            return new_run(client, {})
        try:
            run = client.get_run(run_id)
        except Exception as err:  # noqa: BLE001
            if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(err, "error_code", "")) + str(err):
                raise
            log.warning("MLflow: run %s is not in %s; starting a new run that names it", run_id, client.tracking_uri)
            return new_run(client, {"flashdmd.continues": run_id})
        old = run.data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        tags = {"flashdmd.resume_count": str(int(run.data.tags.get("flashdmd.resume_count", "0")) + 1)}
        if changed:
            tags["flashdmd.config_changed_on_resume"] = _clip(",".join(changed), MAX_TAG_VAL_LENGTH)
        client.update_run(run_id, status="RUNNING")
        _batched_log(client, run_id, params={k: v for k, v in params.items() if k not in old}, tags=tags)
        return run_id

    return start


def open_tracker(
    cfg: Config,
    rank: int,
    run_id: str | None,
    parent_run_id: str | None = None,
    *,
    stage: str | None = None,
    connect_timeout_s: float = 30.0,
    flush_interval_s: float = 1.0,
) -> Tracker | NullTracker:
    """The run's tracker: a ``Tracker`` on rank 0, a ``NullTracker`` on every other rank.

    ``run_id`` (from the checkpoint) continues that MLflow run; None starts a new one.
    ``parent_run_id`` links a stage-2 run to its stage-1 run.  ``stage`` defaults to "stage2"
    when ``cfg.stage2.init_from`` is set, else "stage1".  Waits at most ``connect_timeout_s`` for
    the store; if it does not answer, training goes on and the run is created when it does.
    """
    if rank != 0:
        return NullTracker()
    uri = cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("sqlite:"):
        Path(cfg.run_root).mkdir(parents=True, exist_ok=True)
    stage = stage or ("stage2" if cfg.stage2.init_from else "stage1")
    tracker = Tracker(
        MlflowClient(tracking_uri=uri),
        cfg.run_dir,
        _run_starter(cfg, stage, run_id, parent_run_id),
        continuing=run_id is not None,
        flush_interval_s=flush_interval_s,
    )
    tracker.flush(timeout_s=0)  # wake the thread: start the run now
    tracker.wait_ready(connect_timeout_s)
    return tracker


def main(argv: list[str] | None = None) -> int:
    """``python -m flashdmd.tracking sync JSONL RUN_ID --uri URI``: send what a run lacks."""
    parser = argparse.ArgumentParser(prog="python -m flashdmd.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="send the points of a metrics.jsonl copy that the MLflow run lacks")
    sync.add_argument("jsonl")
    sync.add_argument("run_id")
    sync.add_argument("--uri", required=True, help="the tracking URI, e.g. http://host:5000 or sqlite:///runs/mlflow.db")
    args = parser.parse_args(argv)
    sent = sync_from_jsonl(args.jsonl, args.run_id, args.uri)
    print(f"sent {sent} points to run {args.run_id} at {args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
