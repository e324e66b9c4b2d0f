"""The eval job: a trained student on a prompt set, the paper's metrics, MLflow and a results table
(protocol of spec section 5: COCO-10k captions, fixed seeds, no CFG).

``run_eval(cfg, student, rank, world_size)`` generates image ``i`` of the prompt set (prompt
``i mod len(prompts)``, seed ``eval.seed + i``) on rank ``i mod world_size`` only, feeds each rank's
images to the metrics of ``flashdmd.eval`` (``eval.metrics``; weights from ``eval.weights``, a
metric without weights is skipped with its message), and sums the metrics' sufficient statistics
over ranks (one all-reduce per statistic), so the numbers equal a one-rank evaluation: images
depend only on prompt and seed (``flashdmd.apps.sample``), and the statistics are sums.

The paper's protocol (spec 4.4, 5): ``data_tools/make_coco10k.py`` turns a COCO captions file into
the 10k prompts (``eval.prompts``) and the list of their images (``eval.reference_images``, for
Inception FID); the released metric checkpoints are converted once by ``data_tools/convert_*.py``
where they are not loadable as they are (flashdmd/eval says which).

``main(cfg, "eval")`` evaluates ``eval.source`` (a run dir, its ``final/`` hand-over or a
checkpoint step dir) and, on rank 0, writes ``results.json`` and ``results.md`` (a table shaped like
the paper's tables: method, NFE, one column per metric) to ``<eval.out_dir>/step-<N>`` (default
``<run>/eval/step-<N>``), ``table.md`` next to those folders (one row per evaluated step), and logs
``eval/<metric>`` at the training step and both tables as artifacts to MLflow.

Raw and EMA weights (spec 6 #20 [INF]: report both): the generator's EMA is evaluated when the
source has one (``--weights ema|raw``, flashdmd.apps.sample.choose_weights); its results go to
``step-<N>-ema`` and ``eval_ema/<metric>``, the row reads "EMA", and the MLflow param
``weights.<prefix>`` names the network each prefix was measured on.

With ``eval.teacher_steps > 0`` the eval job adds the teacher's reference row (the paper's "SDXL
(teacher)" row: the multi-step DDIM/Euler sampler with CFG ``eval.teacher_guidance``; NFE = steps,
x 2 with CFG) on the same prompts and seeds, logged as ``eval_teacher/<metric>``; the watcher
leaves it out (the teacher does not change).

The MLflow run is one eval run per training run, in the training run's experiment, nested under
it (MLflow's parent tag) and found again by the tag ``flashdmd.eval_of``, so the checkpoint watcher
(``flashdmd.apps.watch``) adds one point per checkpoint to the same curves. Departure: eval metrics
live in that child run rather than in the training run itself, so an evaluation never writes into
a run whose own writer process may be logging at that moment.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from flashdmd.apps.cli import app_parser, exit_code, on_ranks, parse_app_args
from flashdmd.config import Config
from flashdmd.data.prompts import cycled_prompts
from flashdmd.infra.distributed import DistContext, barrier
from flashdmd.eval import build_metrics, results_table
from flashdmd.eval.table import COLUMN_ORDER
from flashdmd.apps.sample import (EMA_NETWORK, Student, StudentSource, TeacherBaseline, add_weights_flag,
                                  default_source, load_student, to_uint8)
from flashdmd.infra.tracking_writer import PARENT_TAG

log = logging.getLogger("flashdmd.apps.evaluate")
EVAL_OF_TAG = "flashdmd.eval_of"
RESULTS_JSON = "results.json"


@dataclass
class EvalResult:
    step: int
    method: str
    nfe: int
    num_images: int
    prompts: str
    metrics: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)  # every requested metric, skipped ones show "-"
    baselines: list[dict[str, Any]] = field(default_factory=list)  # reference rows (the teacher), same prompts/seeds

    @property
    def row(self) -> dict[str, Any]:
        return {"method": self.method, "nfe": self.nfe, "metrics": self.metrics}

    @property
    def table(self) -> str:
        return results_table([*self.baselines, self.row], self.columns or None, notes=list(self.skipped.values()))

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "method": self.method, "nfe": self.nfe, "num_images": self.num_images,
                "prompts": self.prompts, "metrics": self.metrics, "skipped": self.skipped, "columns": self.columns,
                "baselines": self.baselines, "table": self.table}


def prompt_set(cfg: Config) -> list[str]:
    """``eval.num_images`` prompts (0: each prompt once); a shorter list is cycled, each image its own seed."""
    return cycled_prompts(cfg.eval.prompts, cfg.eval.num_images, "eval.prompts")


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The image indices rank ``rank`` generates: disjoint across ranks, together 0..n-1."""
    return list(range(rank, n, world_size))


def method_name(cfg: Config, student: Student) -> str:
    ema = ", EMA" if student.source.weights == "ema" else ""
    return cfg.eval.method or f"Flash-DMD {student.family} (step {student.source.step}{ema})"


def metric_prefix(source: StudentSource) -> str:
    """``eval`` for raw weights, ``eval_ema`` for the generator EMA: both curves in one MLflow run."""
    return "eval_ema" if source.weights == "ema" else "eval"


def step_folder(step: int, weights: str) -> str:
    return f"step-{step:08d}" + ("-ema" if weights == "ema" else "")


def metric_columns(cfg: Config) -> list[str]:
    """Every requested metric, in the paper's column order."""
    return [m for m in COLUMN_ORDER if m in cfg.eval.metrics] + [m for m in cfg.eval.metrics if m not in COLUMN_ORDER]


@torch.no_grad()
def measure(cfg: Config, model: Student | TeacherBaseline, device: torch.device, rank: int = 0, world_size: int = 1,
            image_dir: Path | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Collective over the process group (if any): this rank's images -> (metrics summed over ranks, skips)."""
    prompts = prompt_set(cfg)
    metrics, skipped = build_metrics(cfg.eval, device)
    for message in skipped.values():
        if rank == 0:
            log.warning(message)
    mine = shard(len(prompts), rank, world_size)
    for start in range(0, len(mine), cfg.eval.batch_size):
        idx = mine[start:start + cfg.eval.batch_size]
        batch_prompts = [prompts[i] for i in idx]
        images = model.generate(batch_prompts, [cfg.eval.seed + i for i in idx])
        for metric in metrics.values():
            metric.update(images, batch_prompts)
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            for i, image in zip(idx, images):
                Image.fromarray(to_uint8(image)).save(image_dir / f"{i:05d}.png")
    values = {}
    for name, metric in metrics.items():
        sum_over_ranks(metric.state(), device)
        values[name] = metric.compute()
    return values, skipped


def sum_over_ranks(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Sum a metric's statistics over the process group, in place. Unlike ``Metric.all_reduce`` this
    also works under NCCL, which reduces device tensors only: each statistic travels via ``device``."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for value in state.values():
        buffer = value.to(device)
        dist.all_reduce(buffer)
        value.copy_(buffer.to(value.device))


def run_eval(cfg: Config, student: Student, rank: int = 0, world_size: int = 1,
             image_dir: Path | None = None) -> EvalResult:
    """The student's row: collective over the process group (if any)."""
    values, skipped = measure(cfg, student, student.device, rank, world_size, image_dir)
    return EvalResult(student.source.step, method_name(cfg, student), student.nfe, len(prompt_set(cfg)),
                      cfg.eval.prompts, values, skipped, metric_columns(cfg))


def teacher_row(cfg: Config, student: Student, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """The teacher's reference row: ``eval.teacher_steps`` steps with CFG ``eval.teacher_guidance``."""
    guidance = cfg.eval.teacher_guidance or cfg.stage1.real_guidance_scale
    teacher = TeacherBaseline(student, cfg.eval.teacher_steps, guidance)
    values, _ = measure(cfg, teacher, student.device, rank, world_size)
    return {"method": f"{student.family} teacher ({teacher.steps} steps, CFG {guidance:g})", "nfe": teacher.nfe,
            "metrics": values}


def eval_root(cfg: Config, run_dir: Path) -> Path:
    """Where evaluations of a run go: ``eval.out_dir``, else ``<run>/eval``; one ``step-<N>`` folder each."""
    return Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir / "eval"


def out_dir_for(cfg: Config, source: StudentSource) -> Path:
    return eval_root(cfg, source.run_dir) / step_folder(source.step, source.weights)


def tagged_run_id(cfg: Config, tag: str, key: str, stage: str, tags: dict[str, str] | None = None) -> str:
    """The MLflow run of ``cfg.tracking.experiment`` whose tag ``tag`` is ``key``: found, else created
    (with ``tags``); how a job rerun (eval of the same training run, a resumed synth) finds its run again."""
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        location = None
        if cfg.tracking_uri.startswith("sqlite:"):  # where flashdmd.infra.tracking puts artifacts for this store
            location = (Path(cfg.run_root).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {tag: key, "flashdmd.stage": stage, "flashdmd.family": cfg.model.family, **(tags or {})}
    run = client.create_run(experiment_id, run_name=f"{cfg.tracking.run_name or cfg.name}-{stage}", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")  # nothing keeps it open; logging to it still works
    return run.info.run_id


def eval_run_id(cfg: Config, source: StudentSource) -> str:
    """The MLflow run holding this training run's evaluations: found by tag, else created (nested)."""
    key = source.run_id or str(source.run_dir.resolve())
    return tagged_run_id(cfg, EVAL_OF_TAG, key, "eval", {PARENT_TAG: source.run_id} if source.run_id else {})


def log_to_mlflow(cfg: Config, source: StudentSource, result: EvalResult, table_path: Path, run_table_path: Path) -> str:
    """``eval/<metric>`` (and ``eval_teacher/<metric>``) at the training step, this step's table and the
    run's table over all steps as artifacts; returns the MLflow run id."""
    import mlflow
    from mlflow.entities import Metric, Param

    run_id = eval_run_id(cfg, source)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    now = int(time.time() * 1000)
    prefix = metric_prefix(source)
    points = [Metric(f"{prefix}/{name}", value, now, result.step) for name, value in result.metrics.items()]
    for row in result.baselines:
        points += [Metric(f"eval_teacher/{name}", value, now, result.step) for name, value in row["metrics"].items()]
    network = EMA_NETWORK if source.weights == "ema" else "generator"
    client.log_batch(run_id, metrics=points, params=[Param(f"weights.{prefix}", network)])
    client.log_artifact(run_id, str(table_path), artifact_path=step_folder(result.step, source.weights))
    client.log_artifact(run_id, str(run_table_path))
    return run_id


def run_table(root: Path) -> str:
    """One row per evaluated step under ``root`` (oldest first), after the newest baselines (teacher row)."""
    results = [json.loads(p.read_text()) for p in sorted(root.glob(f"step-*/{RESULTS_JSON}"))]
    if not results:
        return ""
    baselines = next((r["baselines"] for r in reversed(results) if r.get("baselines")), [])
    rows = [*baselines, *({"method": r["method"], "nfe": r["nfe"], "metrics": r["metrics"]} for r in results)]
    return results_table(rows, results[-1].get("columns") or None)


def write_results(cfg: Config, source: StudentSource, result: EvalResult) -> Path:
    """``step-<N>/results.{json,md}``, the run's ``table.md`` over all steps, then MLflow; returns the step folder."""
    out = out_dir_for(cfg, source)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(result.table)
    data = result.to_json() | {"source": str(source.folder), "weights": source.weights}
    (out / RESULTS_JSON).write_text(json.dumps(data, indent=1))
    (out.parent / "table.md").write_text(run_table(out.parent))
    data["mlflow_run_id"] = log_to_mlflow(cfg, source, result, out / "results.md", out.parent / "table.md")
    (out / RESULTS_JSON).write_text(json.dumps(data, indent=1))
    return out


def load_student_ranked(cfg: Config, source: str | Path, rank: int, device: torch.device, weights: str = "") -> Student:
    """Rank 0 first: a tiny preset's cache is built once, then read by the others."""
    student = load_student(cfg, source, device, weights) if rank == 0 else None
    barrier()
    return student if student is not None else load_student(cfg, source, device, weights)


def evaluate_source(cfg: Config, student: Student, rank: int, world_size: int, teacher: bool = False) -> EvalResult:
    """Evaluate the student's current weights (and with ``teacher`` the teacher's row); rank 0 writes the results."""
    image_dir = out_dir_for(cfg, student.source) / "images" if cfg.eval.save_images else None
    result = run_eval(cfg, student, rank, world_size, image_dir)
    if teacher and cfg.eval.teacher_steps:
        result.baselines.append(teacher_row(cfg, student, rank, world_size))
    if rank == 0:
        out = write_results(cfg, student.source, result)
        log.info("step %d: %s -> %s", result.step, result.metrics, out)
    return result


def main(cfg: Config, job: str = "eval", weights: str = "") -> EvalResult:
    """Launcher entry (every rank): evaluate ``eval.source`` (or the training run, ``sampling.default_source``)."""
    def body(ctx: DistContext) -> EvalResult:
        student = load_student_ranked(cfg, cfg.eval.source or default_source(cfg, job), ctx.rank, ctx.device, weights)
        return evaluate_source(cfg, student, ctx.rank, ctx.world_size, teacher=True)

    return on_ranks(cfg, body, wait_for_all=True)


def cli(argv: list[str] | None = None) -> int:
    parser = app_parser("evaluate", "Evaluate a trained student.")
    parser.add_argument("--source", default="", help="run dir, final/ folder or checkpoint step dir (eval.source)")
    add_weights_flag(parser)
    args, cfg = parse_app_args(parser, argv)
    cfg.eval.source = args.source or cfg.eval.source
    return exit_code("eval", lambda: main(cfg, "eval", args.weights), lambda result: result.table)


if __name__ == "__main__":
    sys.exit(cli())
