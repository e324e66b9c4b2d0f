"""The MLflow writer process of a run, and the re-sync of a run from its JSONL metrics copy.

``flashdmd.infra.tracking.Tracker`` (in the training process) starts ``python -m flashdmd.infra.tracking_writer``
and talks to it with JSON lines: a setup message, then operations (artifacts, tags, flush, close)
on stdin; the run id and acknowledgements come back on stdout.  Metrics do not cross the pipe: the
writer tails ``<run_dir>/metrics.jsonl``, which the training process appends to.  The trainer
starts its writer before it builds the networks (``tracking.start_writer``): the writer's imports
and the opening of the store (``{"open": uri}``, ahead of the setup) overlap the trainer's set-up.

Why a process and not a thread: MLflow's SQLite store spends ~40 us of Python per metric point in
SQLAlchemy; in a thread of the training process that work holds the GIL and measurably slowed a
20 ms training step (bench/tracking_overhead.py).  In its own process it costs the trainer nothing
but one JSONL line per step.

Failure model: every operation is retried in order with exponential backoff (up to 30 s while the
trainer runs, at most 1 s apart once it has closed: ``retry_wait``); the first failure of an outage
is reported once on stderr.  Metrics sent before a failure may or may not
have landed, so after any failure (and when continuing a run) the writer re-syncs from the JSONL
copy with ``sync_from_jsonl``, which sends only the (key, step) points the run lacks.  When the
training process closes the tracker, or dies (stdin closes), the writer keeps trying until a
deadline, marks the run FINISHED/KILLED/FAILED and exits.

Signals: Slurm signals every process of a job (USR1 ahead of the time limit, TERM when a requeue
or scancel ends it) and Ctrl-C the whole foreground group; the writer ignores them all, so the
trainer's last points and the run's status still go out after the trainer has saved; it ends
when the trainer closes it or its stdin closes (SIGKILL after Slurm's KillWait ends it anyway).

The writer also runs MLflow's own system-metrics monitor on the run (``system/*``) while the
run is open, stopped before the run's status is set.

``python -m flashdmd.infra.tracking_writer sync JSONL RUN_ID --uri URI`` re-syncs a run by hand.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the child under the parent
EOF = None  # the stdin reader's marker for "the training process is gone"


def _lines(data: bytes) -> list[dict[str, Any]]:
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn line from a crash mid-write
            continue
    return records


def read_jsonl(path: str | Path, start_bytes: int = 0, upto_bytes: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file between two byte offsets."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as handle:
        handle.seek(start_bytes)
        data = handle.read() if upto_bytes is None else handle.read(max(upto_bytes - start_bytes, 0))
    return _lines(data)


def read_new(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of ``path`` after byte ``offset`` and the offset after the last of them."""
    if not path.is_file():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # a line being written is left for the next pass
    return _lines(data[:end]), offset + end


def _metrics(records: list[dict[str, Any]]) -> list[Metric]:
    return [Metric(k, float(v), r["time"], r["step"]) for r in records for k, v in r["metrics"].items()]


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def sync_from_jsonl(
    jsonl_path: str | Path,
    run_id: str,
    client: MlflowClient | str,
    start_bytes: int = 0,
    upto_bytes: int | None = None,
) -> int:
    """Send every (key, step) point of the JSONL copy that run ``run_id`` lacks; return how many.

    ``client`` is an ``MlflowClient`` or a tracking URI.  Points the run holds are left as they
    are, so a second call, or a call after a clean run, sends nothing.
    """
    client = MlflowClient(tracking_uri=client) if isinstance(client, str) else client
    records = read_jsonl(jsonl_path, start_bytes, upto_bytes)
    keys = {key for record in records for key in record["metrics"]}
    present = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    missing = [m for m in _metrics(records) if m.step not in present[m.key]]
    _log_metrics(client, run_id, missing)
    return len(missing)


def _batched(client: MlflowClient, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
    items_p = [Param(k, v) for k, v in params.items()]
    items_t = [RunTag(k, v) for k, v in tags.items()]
    for start in range(0, len(items_p), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items_p[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    for start in range(0, len(items_t), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items_t[start : start + MAX_PARAMS_TAGS_PER_BATCH])


MAX_BACKOFF_S = 30.0  # the longest pause between attempts while the trainer runs
CLOSING_RETRY_S = 1.0  # the longest pause between attempts once the trainer has closed (or died)


def retry_wait(interval: float, failures: int, closing_left_s: float | None) -> float:
    """Seconds until the next delivery attempt after ``failures`` failed ones in a row.

    While training runs, failed attempts back off exponentially (``interval * 2**failures``, at
    most ``MAX_BACKOFF_S``): the trainer does not wait on them and a down store is not hammered.
    Once closing (``closing_left_s``: seconds left to the close deadline) the job waits only on
    this delivery, so the writer retries at least every ``CLOSING_RETRY_S`` and the job ends as
    soon as the store is back, not a whole backoff later; it never waits past the deadline.
    """
    wait = min(interval * 2**failures, MAX_BACKOFF_S) if failures else interval
    if closing_left_s is not None:
        wait = min(wait, CLOSING_RETRY_S, max(closing_left_s, 0.0))
    return wait


class Writer:
    """Owns the MlflowClient; ``serve`` runs until the tracker closes or the trainer is gone."""

    def __init__(self, setup: dict[str, Any], replies: TextIO) -> None:
        self.setup = setup
        self.replies = replies
        self.client = MlflowClient(tracking_uri=setup["uri"])
        self.jsonl = Path(setup["jsonl"])
        self.interval = float(setup["flush_interval_s"])
        self.run_id: str | None = None
        self.ops: list[dict[str, Any]] = []
        self.flush_ids: list[int] = []
        self.offset = 0  # JSONL bytes known to be in the run
        self.needs_sync = setup["run_id"] is not None  # a continued run may lack lines of its copy
        self.failures = 0
        self.deadline: float | None = None  # set once closing
        self.monitor: Any = None  # MLflow's SystemMetricsMonitor, once the run exists

    def reply(self, message: dict[str, Any]) -> None:
        self.replies.write(json.dumps(message) + "\n")
        self.replies.flush()

    # -- the run ----------------------------------------------------------------------------

    def experiment_id(self) -> str:
        name = self.setup["experiment"]
        kind = self.setup.get("experiment_tags", {})
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=self.setup["artifact_location"], tags=kind)
            except Exception:  # created by a concurrent run meanwhile: use that one
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        for key, value in kind.items():
            if key not in found.tags:  # a user's own choice of view stays
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def new_run(self, extra_tags: dict[str, str]) -> tuple[str, str]:
        tags = {**self.setup["tags"], **extra_tags}
        parent = self.setup["parent_run_id"]
        if parent:
            tags[PARENT_TAG] = parent
            tags["flashdmd.parent_run_id"] = parent
        run = self.client.create_run(self.experiment_id(), run_name=self.setup["run_name"], tags=tags)
        _batched(self.client, run.info.run_id, self.setup["params"], {})
        return run.info.run_id, run.info.experiment_id

    def start_run(self) -> tuple[str, str]:
        """Create the run, or reopen the one being continued (params are immutable: only new keys);
        returns its id and its experiment's."""
        run_id = self.setup["run_id"]
        if run_id is None:
            return self.new_run({})
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            if "RESOURCE_DOES_NOT_EXIST" not in f"{getattr(err, 'error_code', '')} {err}":
                raise
            print(f"MLflow: run {run_id} is not in {self.client.tracking_uri}; starting a new run", file=sys.stderr)
            return self.new_run({"flashdmd.continues": run_id})
        params, old = self.setup["params"], run.data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        tags = {"flashdmd.resume_count": str(int(run.data.tags.get("flashdmd.resume_count", "0")) + 1)}
        if changed:
            tags["flashdmd.config_changed_on_resume"] = ",".join(changed)[:8000]
        self.client.update_run(run_id, status="RUNNING")
        _batched(self.client, run_id, {k: v for k, v in params.items() if k not in old}, tags)
        return run_id, run.info.experiment_id

    def apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "artifact":
            self.client.log_artifact(self.run_id, op["path"], op["dir"])
        elif kind == "image":
            with Image.open(op["path"]) as image:
                self.client.log_image(self.run_id, image.convert("RGB"), key=op["key"], step=op["step"],
                                      synchronous=True)
        elif kind == "tags":
            _batched(self.client, self.run_id, {}, op["tags"])
        elif kind == "terminate":
            self.stop_monitor()
            self.client.set_terminated(self.run_id, op["status"])
        else:
            raise ValueError(f"unknown tracker operation {kind!r}")

    # -- delivery ---------------------------------------------------------------------------

    def deliver(self) -> bool:
        """Send what is pending, in order; on failure keep it, report once, return False."""
        try:
            if self.run_id is None:
                self.run_id, experiment_id = self.start_run()
                self.reply({"run_id": self.run_id, "experiment_id": experiment_id})
                self.start_monitor()
            while self.ops:
                self.apply(self.ops[0])
                self.ops.pop(0)
            records, end = read_new(self.jsonl, self.offset)
            if self.needs_sync:
                sent = sync_from_jsonl(self.jsonl, self.run_id, self.client, self.offset, end)
                if self.failures:
                    print(f"MLflow: {self.client.tracking_uri} answers again; re-synced {sent} points", file=sys.stderr)
                self.needs_sync = False
            else:
                _log_metrics(self.client, self.run_id, _metrics(records))
            self.offset = end
        except Exception as err:  # noqa: BLE001 - any store failure must leave training running
            self.needs_sync = self.run_id is not None
            if not self.failures:
                first = str(err).splitlines()[0][:300] if str(err) else ""
                print(
                    f"MLflow: cannot reach {self.client.tracking_uri} ({type(err).__name__}: {first}); training "
                    f"continues, metrics go to {self.jsonl} and are re-synced when the store answers",
                    file=sys.stderr,
                )
                self.reply({"unreachable": True})
            self.failures += 1
            return False
        self.failures = 0
        return True

    # -- system metrics ---------------------------------------------------------------------

    def start_monitor(self) -> None:
        interval = float(self.setup.get("system_metrics_s", 0.0))
        if interval <= 0 or self.deadline is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=True,
                                                tracking_uri=self.setup["uri"])
            self.monitor.start()
        except Exception as err:  # noqa: BLE001 - e.g. psutil missing: the run goes on without them
            print(f"MLflow: no system metrics ({type(err).__name__}: {err})", file=sys.stderr)
            self.monitor = None

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.finish()

    def take(self, message: dict[str, Any] | None) -> None:
        if message is EOF:  # the trainer died without closing
            if self.deadline is None:
                self.ops.append({"op": "terminate", "status": "FAILED"})
                self.deadline = time.time() + 60.0
        elif message["op"] == "flush":
            self.flush_ids.append(message["id"])
        elif message["op"] == "close":
            self.ops.append({"op": "terminate", "status": message["status"]})
            self.deadline = time.time() + float(message["timeout_s"])
        else:
            self.ops.append(message)

    def serve(self, inbox: queue.Queue[dict[str, Any] | None]) -> bool:
        """Deliver until closed; True when everything reached the store."""
        wait = 0.0  # the first pass starts the run at once
        while True:
            try:
                self.take(inbox.get(timeout=wait))
                while True:
                    self.take(inbox.get_nowait())
            except queue.Empty:
                pass
            ok = self.deliver()
            if ok:
                for flush_id in self.flush_ids:
                    self.reply({"flushed": flush_id})
                self.flush_ids.clear()
            if self.deadline is not None and (ok or time.time() > self.deadline):
                self.reply({"closed": ok})
                return ok
            left = None if self.deadline is None else self.deadline - time.time()
            wait = retry_wait(self.interval, self.failures, left)


def _read_stdin(stream: TextIO, inbox: queue.Queue[dict[str, Any] | None]) -> None:
    for line in stream:
        inbox.put(json.loads(line))
    inbox.put(EOF)


def open_store(uri: str) -> None:
    """Open a local SQLite store now: MLflow creates a new file's tables on first use (seconds of
    migrations), which a writer started ahead of its run does while the trainer still sets up.
    A failure is left to ``Writer.deliver``, which reports and retries it; a file whose folder does
    not exist yet is left alone (the trainer creates the run root)."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or not Path(path).parent.is_dir():
        return
    with contextlib.suppress(Exception):  # reported by the first delivery
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def read_setup(stream: TextIO) -> dict[str, Any] | None:
    """The setup message; None when the trainer ended first. A writer started ahead of its run
    (``flashdmd.infra.tracking.start_writer``) is sent ``{"open": uri}`` before it."""
    while line := stream.readline():
        message = json.loads(line)
        if "open" not in message:
            return message
        open_store(message["open"])
    return None


def serve_main() -> int:
    replies = os.fdopen(os.dup(1), "w")  # the protocol keeps the real stdout ...
    os.dup2(2, 1)  # ... and anything printed by libraries goes to stderr
    setup = read_setup(sys.stdin)
    if setup is None:  # the set-up failed before the run was opened: nothing to record
        return 0
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_stdin, args=(sys.stdin, inbox), daemon=True).start()
    writer = Writer(setup, replies)
    ok = writer.serve(inbox)
    if not ok:
        print(
            f"MLflow: not everything reached {setup['uri']}; the metrics are in {setup['jsonl']}; send them with "
            f"`python -m flashdmd.infra.tracking_writer sync {setup['jsonl']} {writer.run_id} --uri {setup['uri']}`",
            file=sys.stderr,
        )
    return 0 if ok else 1


def end_now(code: int) -> NoReturn:
    """Exit with ``code`` once the run is closed, skipping only the interpreter's teardown.

    Tearing down MLflow's import graph (thousands of modules) takes over a second on a loaded
    machine, and the trainer's ``close`` and the job's end wait for this process; nothing is left
    to deliver by then. What a normal exit does first still happens: other non-daemon threads are
    joined, the atexit handlers run (logging's flush among them) and the streams are flushed.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs; os._exit skips them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        # Slurm signals every process of the job (USR1 ahead of the time limit, TERM on a requeue),
        # and Ctrl-C the whole foreground group: the writer keeps going until the trainer closes it
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines in job logs
        end_now(serve_main())
    parser = argparse.ArgumentParser(prog="python -m flashdmd.infra.tracking_writer")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="send the points of a metrics.jsonl copy that the MLflow run lacks")
    sync.add_argument("jsonl")
    sync.add_argument("run_id")
    sync.add_argument(
        "--uri", required=True, help="tracking URI, e.g. http://host:5000 or sqlite:////abs/runs/mlflow.db"
    )
    args = parser.parse_args(argv)
    print(f"sent {sync_from_jsonl(args.jsonl, args.run_id, args.uri)} points to run {args.run_id} at {args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
