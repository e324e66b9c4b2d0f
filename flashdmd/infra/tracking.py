"""MLflow tracking of a run: rank 0 logs, every other rank holds a ``NullTracker``.

Follows (see ../shared/research/anchors_jobsystem.md section 4).

* ``open_tracker(cfg, rank, run_id, parent_run_id)`` returns a ``Tracker`` on rank 0 (a new MLflow
  run, or the continuation of ``run_id`` after a resume) and a ``NullTracker`` elsewhere.
* The training step never waits on MLflow.  ``log_metrics`` appends one line to
  ``<run_dir>/metrics.jsonl`` (the local copy and the source of truth); a writer process
  (``flashdmd.infra.tracking_writer``) tails that file and sends the points in batches, and receives
  artifacts, tags, flush and close requests over a pipe.  The writer also retries, reports an
  unreachable store once, and re-syncs the run from the JSONL copy when the store answers again.
* Continuing a run never duplicates a step: the JSONL copy is written before anything is sent, so
  its last step bounds what the run may already hold, and ``log_metrics`` ignores steps up to it.
  After a resume from checkpoint step S, the replayed steps S+1..k that were logged before the
  interruption therefore keep their first values (MLflow cannot delete single points).
* Params are immutable in MLflow: a continued run does not re-log them; keys whose value changed
  are listed in the tag ``flashdmd.config_changed_on_resume``.
* What the MLflow UI shows: the experiment is tagged for model training (MLflow 3 opens an
  untagged experiment in its GenAI view); each run carries a description (``mlflow.note.content``:
  preset, job, mode, parent), user, source command, and tags for preset, job, mode, family,
  engine, nodes and parent name; sample grids go through ``MlflowClient.log_image`` with their
  step (the UI's slider over steps), their prompts in ``samples/<name>/prompts.txt``; MLflow's own
  system-metrics monitor runs in the writer process (``system/*``: CPU, memory, disk, network,
  GPU where present).

Store: ``cfg.tracking_uri`` (a server, or MLflow 3's SQLite default under the run root, with
artifacts in ``<run_root>/mlartifacts`` instead of MLflow's ``./mlruns`` next to the working
directory).  For http(s) stores the writer turns MLflow's own HTTP retries down (7 with
exponential backoff by default: minutes per call) unless the user set them; it retries itself.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
    path_not_unique,
    validate_param_and_metric_name,
)
from PIL import Image

from flashdmd.config import REPO_ROOT, Config, flatten, to_dict, to_yaml
from flashdmd.infra.repro import git_state, repro_bundle
from flashdmd.infra.tracking_writer import PARENT_TAG, read_jsonl, sync_from_jsonl

__all__ = ["PARENT_TAG", "NullTracker", "Tracker", "image_grid", "open_tracker", "read_jsonl", "sync_from_jsonl"]

JSONL_NAME = "metrics.jsonl"
TRUNCATED = "...[truncated]"
STATUSES = tuple(RunStatus.to_string(s) for s in RunStatus.all_status())


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


COMMAND_ENV = "FLASHDMD_COMMAND"  # the command that started the job (jobs/submit.py, python -m flashdmd.train)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3: the model-training view
MIN_TILE_PX = 256  # grid tiles are upscaled (nearest) to at least this size, so 64-px samples stay readable


def run_mode(cfg: Config, stage: str) -> str:
    """What kind of training the run is: the stage-1 mode, with the RL:DM ratio in stage 2."""
    return cfg.stage1.mode if stage == "stage1" else f"{cfg.stage1.mode}+rl{cfg.stage2.rl_per_dm}:1"


def run_description(cfg: Config, stage: str, parent_name: str | None) -> str:
    """The run's description in the MLflow UI (markdown)."""
    preset = cfg.tracking.tags.get("preset", "")
    lines = [
        f"**{stage}** of {f'preset `{preset}`' if preset else 'a custom config'}: mode `{run_mode(cfg, stage)}`, "
        f"family `{cfg.model.family}`, engine `{cfg.engine.kind}`, {cfg.launch.nodes} node(s), "
        f"world size {cfg.world_size}, {cfg.stage1.iterations if stage == 'stage1' else cfg.stage2.iterations} "
        f"iterations.",
        f"Run directory: `{cfg.run_dir}`.",
    ]
    if parent_name:
        lines.append(f"Continues stage-1 run `{parent_name}` (`stage2.init_from={cfg.stage2.init_from}`).")
    command = os.environ.get(COMMAND_ENV)
    if command:
        lines.append(f"Started by `{command}`.")
    return "\n\n".join(lines)


def run_tags(cfg: Config, stage: str, git: dict[str, Any], parent_name: str | None = None) -> dict[str, str]:
    """The tags every run carries; ``cfg.tracking.tags`` win over the built-in ones."""
    tags = {
        "job": stage,
        "mode": run_mode(cfg, stage),
        "family": cfg.model.family,
        "stage": stage,
        "engine": cfg.engine.kind,
        "nodes": str(cfg.launch.nodes),
        "world_size": str(cfg.world_size),
        "git_commit": git["commit"],
        "git_dirty": str(git["dirty"]),
        "mlflow.source.git.commit": git["commit"],
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": os.environ.get(COMMAND_ENV, f"python -m flashdmd.train --job {stage}"),
        "mlflow.source.type": "JOB",
        "mlflow.note.content": run_description(cfg, stage, parent_name),
        **({"parent": parent_name} if parent_name else {}),
        **cfg.tracking.tags,
    }
    return {key: _clip(str(value), MAX_TAG_VAL_LENGTH) for key, value in tags.items()}


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see a run: its page in the MLflow UI, in the model-training view.

    MLflow 3's UI picks the GenAI or the model-training view from ``?workflowType=`` (else the
    browser's last choice); the experiment's ``mlflow.experimentKind`` tag is what older 3.x UIs read.
    """
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == n and rows <= cols as close as possible: no empty cell."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def image_grid(images: torch.Tensor, scale: int = 1) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> one uint8 grid of every image (``scale`` times, nearest), 2 px padding."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"log_images expects a [N, 3, H, W] tensor in [-1, 1], got shape {tuple(images.shape)}")
    if scale > 1:
        images = torch.nn.functional.interpolate(images.detach().float(), scale_factor=scale, mode="nearest")
    n, _, h, w = images.shape
    rows, cols = grid_shape(n)
    pad = 2
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(3, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[:, top : top + h, left : left + w] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


class NullTracker:
    """The tracker of ranks other than 0: the same interface, nothing logged."""

    @property
    def run_id(self) -> str | None:
        return None

    @property
    def page(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, name: str, images: torch.Tensor, step: int, captions: list[str] | None = None) -> None:
        pass

    def log_file(self, path: str | Path, artifact_dir: str) -> None:
        pass

    def log_config(self, cfg: Config) -> None:
        pass

    def log_checkpoint(self, path: str | Path, step: int) -> None:
        pass

    def flush(self, timeout_s: float = 60.0) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        pass


def start_writer(uri: str) -> subprocess.Popen[str]:
    """A writer process for the store ``uri``, started ahead of its run: it imports MLflow and opens
    the store (a new SQLite file's tables) while the trainer builds its networks; ``Tracker`` sends it
    the run's setup. ``discard_writer`` ends one that never got a run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if uri.startswith(("http://", "https://")):
        env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # own session: a Ctrl-C meant for training leaves the writer free to flush after stdin closes
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashdmd.infra.tracking_writer"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, start_new_session=True,
    )  # fmt: skip
    proc.stdin.write(json.dumps({"open": uri}) + "\n")
    proc.stdin.flush()
    return proc


def discard_writer(writer: subprocess.Popen[str] | None) -> None:
    """End a writer from ``start_writer`` that no ``Tracker`` took (the set-up failed): stdin closed
    before a setup, it exits without creating a run."""
    if writer is None or writer.stdin.closed:
        return
    with contextlib.suppress(OSError):
        writer.stdin.close()
    try:
        writer.wait(timeout=30)
    except subprocess.TimeoutExpired:
        writer.kill()
        writer.wait()


class Tracker(NullTracker):
    """Rank 0's MLflow logger: JSONL now, MLflow from the writer process (see the module docstring)."""

    def __init__(self, setup: dict[str, Any], run_dir: Path, continuing: bool,
                 writer: subprocess.Popen[str] | None = None) -> None:
        run_dir = run_dir.resolve()  # paths sent to the writer must not depend on its working directory
        self._run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run_dir / JSONL_NAME
        if not continuing and self.jsonl_path.exists():
            # a new run under an old run directory: keep the old copy, start a fresh one
            self.jsonl_path.rename(run_dir / f"metrics.{int(self.jsonl_path.stat().st_mtime)}.jsonl")
        self._skip_through = max((r["step"] for r in read_jsonl(self.jsonl_path)), default=-1)
        self._valid_keys: set[str] = set()
        self._jsonl = open(self.jsonl_path, "ab")  # noqa: SIM115 - held for the run, closed in close()
        self._uri = setup["uri"]

        self._lock = threading.Lock()
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._ready = threading.Event()  # the run exists, or the first attempt failed
        self._flushed: dict[int, threading.Event] = {}
        self._next_flush = 0
        self._closed_ok: bool | None = None
        self._writer_gone = False
        self._closed = False
        self._captioned: set[str] = set()

        self._proc = writer or start_writer(self._uri)
        self._reader = threading.Thread(target=self._read_replies, name="flashdmd-mlflow-replies", daemon=True)
        self._reader.start()
        self._send(setup)

    # -- the interface ---------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None only while the store has not answered since the start."""
        return self._run_id

    @property
    def page(self) -> str | None:
        """The run's page in the MLflow UI (``run_page``); None while the store has not answered."""
        if self._run_id is None or self._experiment_id is None:
            return None
        return run_page(self._uri, self._experiment_id, self._run_id)

    @property
    def writer_pid(self) -> int:
        """The process id of the writer process (for resource accounting)."""
        return self._proc.pid

    @property
    def skip_through(self) -> int:
        """Steps up to this one are already recorded and are not logged again."""
        return self._skip_through

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``: one JSONL line; the writer sends it to MLflow."""
        if step <= self._skip_through or not metrics:
            return
        values = {}
        for key, value in metrics.items():
            if key not in self._valid_keys:  # MLflow would reject the whole batch later
                _check_key(key)
                self._valid_keys.add(key)
            values[key] = float(value)
        line = json.dumps({"step": step, "time": int(time.time() * 1000), "metrics": values}).encode() + b"\n"
        with self._lock:
            self._jsonl.write(line)
            self._jsonl.flush()  # the writer process reads the file

    def log_images(self, name: str, images: torch.Tensor, step: int, captions: list[str] | None = None) -> None:
        """A grid of ``images`` ([N, 3, H, W] in [-1, 1]) as MLflow image ``name`` at ``step`` (the UI's
        slider over steps), kept as ``<run_dir>/samples/<name>/step_<step>.png``; ``captions`` (one per
        image, grid order) go once into the artifact ``samples/<name>/prompts.txt``."""
        _check_key(name)
        path = self._run_dir / "samples" / name / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scale = max(1, math.ceil(MIN_TILE_PX / max(images.shape[-2:])))
        Image.fromarray(image_grid(images, scale)).save(path, compress_level=1)  # fast; grids are small
        self._send({"op": "image", "path": str(path), "key": name, "step": step})
        if captions and name not in self._captioned:
            self._captioned.add(name)
            rows, cols = grid_shape(len(captions))
            listing = path.parent / "prompts.txt"
            listing.write_text(f"grid of {rows} x {cols}, row by row:\n"
                               + "".join(f"{i + 1}. {c}\n" for i, c in enumerate(captions)))
            self.log_file(listing, f"samples/{name}")

    def log_file(self, path: str | Path, artifact_dir: str) -> None:
        """Upload the file ``path`` (as it is when the writer sends it) into ``artifact_dir``."""
        self._send({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_dir})

    def log_config(self, cfg: Config) -> None:
        """The resolved config (config/config.yaml) and the reproducibility bundle (config/repro.json)."""
        files = {"config.yaml": to_yaml(cfg), "repro.json": json.dumps(repro_bundle(cfg), indent=2)}
        for name, text in files.items():
            (self._run_dir / name).write_text(text)
            self._send({"op": "artifact", "path": str(self._run_dir / name), "dir": "config"})

    def log_checkpoint(self, path: str | Path, step: int) -> None:
        """Reference a checkpoint by path (tags; multi-GB checkpoints are not uploaded)."""
        tags = {"checkpoint.path": _clip(str(path), MAX_TAG_VAL_LENGTH), "checkpoint.step": str(step)}
        self._send({"op": "tags", "tags": tags})

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything logged so far is in the store; False if not within ``timeout_s``."""
        with self._lock:
            flush_id, self._next_flush = self._next_flush, self._next_flush + 1
            done = self._flushed[flush_id] = threading.Event()
        self._send({"op": "flush", "id": flush_id})
        return done.wait(timeout_s)

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Send what is left, mark the run ``status`` (FINISHED, FAILED, KILLED), end the writer.

        What does not reach the store within ``timeout_s`` stays in the JSONL copy; the writer's
        message on stderr says how to send it later.
        """
        if status not in STATUSES:
            raise ValueError(f"close(status={status!r}): use FINISHED, FAILED or KILLED")
        if self._closed:  # closed before a requeue, then again by the loop's clean-up
            return
        self._closed = True
        self._send({"op": "close", "status": status, "timeout_s": timeout_s})
        with self._lock:
            self._jsonl.close()
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=timeout_s + 30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the run exists, or the first attempt to reach the store has failed."""
        return self._ready.wait(timeout_s)

    # -- the pipe to the writer -------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            if self._writer_gone or (self._closed and message["op"] != "close"):
                return
            try:
                self._proc.stdin.write(json.dumps(message) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                self._writer_gone = True
                print(
                    f"MLflow: the writer process is gone (exit code {self._proc.poll()}); training continues and "
                    f"metrics go to {self.jsonl_path}; send them later with `python -m flashdmd.infra.tracking_writer "
                    f"sync {self.jsonl_path} {self._run_id} --uri {self._uri}`",
                    file=sys.stderr,
                )

    def _read_replies(self) -> None:
        for line in self._proc.stdout:
            reply = json.loads(line)
            if "run_id" in reply:
                self._run_id, self._experiment_id = reply["run_id"], reply.get("experiment_id")
                self._ready.set()
            elif "unreachable" in reply:
                self._ready.set()
            elif "flushed" in reply:
                with self._lock:
                    for flush_id in [i for i in self._flushed if i <= reply["flushed"]]:
                        self._flushed.pop(flush_id).set()
            elif "closed" in reply:
                self._closed_ok = reply["closed"]
        self._ready.set()


def open_tracker(
    cfg: Config,
    rank: int,
    run_id: str | None,
    parent_run_id: str | None = None,
    *,
    stage: str | None = None,
    parent_name: str | None = None,
    connect_timeout_s: float = 60.0,
    flush_interval_s: float = 1.0,
    system_metrics_s: float = 10.0,
    writer: subprocess.Popen[str] | None = None,
) -> Tracker | NullTracker:
    """The run's tracker: a ``Tracker`` on rank 0, a ``NullTracker`` on every other rank.

    ``run_id`` (from the checkpoint) continues that MLflow run; None starts a new one.
    ``parent_run_id`` links a stage-2 run to its stage-1 run (MLflow's parent tag, so the UI nests
    it; ``parent_name`` names it in the tags and description).  ``stage`` defaults to "stage2" when
    ``cfg.stage2.init_from`` is set, else "stage1".  ``system_metrics_s``: the sampling interval of
    MLflow's system-metrics monitor (0: off).  ``writer``: one from ``start_writer`` (else one starts now).
    Waits at most ``connect_timeout_s`` for the run to exist; if the store does not answer,
    training goes on and the run is created when it does.
    """
    if rank != 0:
        discard_writer(writer)
        return NullTracker()
    uri = cfg.tracking_uri
    location = None
    if uri.startswith("sqlite:"):
        Path(cfg.run_root).mkdir(parents=True, exist_ok=True)
        location = (Path(cfg.run_root).resolve() / "mlartifacts").as_uri()
    stage = stage or ("stage2" if cfg.stage2.init_from else "stage1")
    setup = {
        "uri": uri,
        "experiment": cfg.tracking.experiment,
        "experiment_tags": EXPERIMENT_KIND,
        "artifact_location": location,
        "run_name": cfg.tracking.run_name or cfg.name,
        "run_id": run_id,
        "parent_run_id": parent_run_id,
        "params": config_params(cfg),
        "tags": run_tags(cfg, stage, git_state(), parent_name),
        "jsonl": str((cfg.run_dir / JSONL_NAME).resolve()),
        "flush_interval_s": flush_interval_s,
        "system_metrics_s": system_metrics_s,
    }
    tracker = Tracker(setup, cfg.run_dir, continuing=run_id is not None, writer=writer)
    tracker.wait_ready(connect_timeout_s)
    return tracker
