"""The sample and eval jobs for the gmm2d toy: a scatter plot as its "sample grid", exact metrics as its table.

The toy has no images and no prompts; what a user wants to see of a trained gmm2d student is where
its samples fall against the truth and against the teacher it was distilled from. jobs/launcher.py
runs ``main`` for the sample and eval jobs of a gmm2d config. Both jobs load
the student exactly as for the image families (``flashdmd.apps.sample``: hand-over, checkpoint
or run directory) and use the training monitor's low-noise sets (``flashdmd.train.gmm_quality``):
the same quasi-random noise for student and teacher, a stratified truth set.

- sample: ``grid.png`` with three panels (truth, teacher in 50 steps, student in its few steps),
  mode means marked, each titled with its SW2; ``samples.json`` with the metrics;
- eval: a table with a teacher row (SW2, modes covered, mean reward, mass of the reward mode),
  written and logged like every evaluation (``flashdmd.apps.evaluate``); its own table, as the
  image metrics' registry knows none of the toy's metrics.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flashdmd.apps.evaluate import log_to_mlflow, out_dir_for  # noqa: E402
from flashdmd.apps.sample import default_source, find_student, load_generator_weights, timesteps_of  # noqa: E402
from flashdmd.config import Config  # noqa: E402
from flashdmd.apps.cli import on_ranks  # noqa: E402
from flashdmd.infra.distributed import DistContext  # noqa: E402
from flashdmd.nets.registry import build_parts  # noqa: E402
from flashdmd.train.gmm_quality import TEACHER_STEPS, GMMQuality  # noqa: E402

log = logging.getLogger("flashdmd.apps.toy_plot")
SHOWN_POINTS = 4096  # per panel: enough to see every mode's shape, few enough to stay readable


def _quality(cfg: Config, source: str | Path) -> tuple[GMMQuality, Any, torch.nn.Module]:
    """The toy's monitor sets for the student of ``source`` (its weights loaded) and that source."""
    src = find_student(source)
    if src.family and src.family != "gmm2d":
        raise ValueError(f"{src.folder} holds a {src.family} generator, not a gmm2d one")
    cfg.stage1.student_timesteps = timesteps_of(cfg, src)
    parts = build_parts(cfg, Path(cfg.model.cache_dir or Path(cfg.run_root) / "cache"))
    load_generator_weights(parts.generator, src)
    return GMMQuality(cfg, parts, torch.device("cpu")), src, parts.generator


def scatter(panels: list[tuple[str, torch.Tensor]], means: torch.Tensor, path: Path) -> Path:
    """One PNG of side-by-side scatter panels on shared axes, the mixture's means marked."""
    extent = float(means.abs().max()) * 1.35 + 0.5
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), dpi=110, sharex=True, sharey=True)
    for ax, (title, points) in zip(axes, panels):
        shown = points[:SHOWN_POINTS].numpy()
        ax.scatter(shown[:, 0], shown[:, 1], s=1.5, alpha=0.35, linewidths=0)
        ax.scatter(means[:, 0].numpy(), means[:, 1].numpy(), marker="x", c="red", s=30)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_toy_sample(cfg: Config) -> Path:
    """The sample job for gmm2d: ``grid.png`` (truth | teacher | student) and ``samples.json``; returns the folder."""
    quality, src, generator = _quality(cfg, cfg.sample.source or default_source(cfg, "sample"))
    student, teacher = quality.student(generator), quality.teacher()
    metrics = quality.measure(generator)
    refs = quality.references
    steps = len(quality.cfg.stage1.student_timesteps)
    panels = [(f"truth (SW2 floor {refs['eval/sw2_floor']:.3f})", quality.truth),
              (f"teacher, {TEACHER_STEPS} steps (SW2 {refs['eval/sw2_teacher']:.3f})", teacher),
              (f"student, {steps} steps, step {src.step} (SW2 {metrics['eval/sw2']:.3f})", student)]
    out = Path(cfg.sample.out_dir) if cfg.sample.out_dir else src.run_dir / "samples" / f"step-{src.step:08d}"
    scatter(panels, quality.gmm.means, out / "grid.png")
    (out / "samples.json").write_text(json.dumps({
        "source": str(src.folder), "step": src.step, "family": "gmm2d", "timesteps": quality.cfg.stage1.student_timesteps,
        "num_points": int(student.shape[0]), "metrics": metrics}, indent=1))
    log.info("wrote the gmm2d scatter plot grid.png to %s (student SW2 %.4f, teacher %.4f)", out, metrics["eval/sw2"],
             refs["eval/sw2_teacher"])
    return out


def _table_metrics(metrics: dict[str, float], reward_mode: int) -> dict[str, float]:
    out = {"sw2": metrics["eval/sw2"], "modes_covered": metrics["eval/modes_covered"],
           f"mode{reward_mode}_mass": metrics[f"eval/mode_mass/m{reward_mode}"]}
    if "eval/mean_reward" in metrics:
        out["mean_reward"] = metrics["eval/mean_reward"]
    return out


@dataclass
class ToyEvalResult:
    """What the eval job returns for gmm2d: the student's metrics, the teacher's row, the markdown table."""

    step: int
    method: str
    nfe: int
    num_images: int
    metrics: dict[str, float]
    baselines: list[dict[str, Any]]
    table: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def toy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: method, NFE and the toy's metrics (the image metrics' table knows none of them)."""
    names = list(rows[-1]["metrics"])
    lines = ["| Method | NFE | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for row in rows:
        cells = [f"{row['metrics'][n]:.4f}" if n in row["metrics"] else "-" for n in names]
        lines.append(f"| {row['method']} | {row['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_toy_eval(cfg: Config, job: str = "eval") -> ToyEvalResult:
    """The eval job for gmm2d: the exact metrics of the student and the teacher, written and logged like an
    image evaluation (``<run>/eval/step-<N>/results.{md,json}``, ``eval/*`` at the training step)."""
    quality, src, generator = _quality(cfg, cfg.eval.source or default_source(cfg, job))
    reward_mode = cfg.model.gmm.reward_mode
    student = _table_metrics(quality.measure(generator), reward_mode)
    teacher = {"method": f"gmm2d teacher ({TEACHER_STEPS} steps)", "nfe": TEACHER_STEPS,
               "metrics": _table_metrics(quality.measure_points(quality.teacher()), reward_mode)}
    row = {"method": f"Flash-DMD gmm2d (step {src.step})", "nfe": len(quality.cfg.stage1.student_timesteps),
           "metrics": student}
    result = ToyEvalResult(step=src.step, method=row["method"], nfe=row["nfe"], num_images=int(quality.z.shape[0]),
                           metrics=student, baselines=[teacher], table=toy_table([teacher, row]))
    out = out_dir_for(cfg, src)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(result.table)
    (out / "results.json").write_text(json.dumps(result.to_json() | {"source": str(src.folder)}, indent=1))
    log_to_mlflow(cfg, src, result, out / "results.md", out / "results.md")
    log.info("step %d: %s -> %s", src.step, student, out)
    return result


def main(cfg: Config, job: str) -> Path | ToyEvalResult | None:
    """Launcher entry of the gmm2d sample and eval jobs: rank 0 works (the point sets are small)."""
    if job not in ("sample", "eval"):
        raise ValueError(f"flashdmd.apps.toy_plot runs the sample and eval jobs, not {job!r}")
    def body(ctx: DistContext) -> Path | ToyEvalResult | None:
        if not ctx.is_main:
            return None
        return run_toy_sample(cfg) if job == "sample" else run_toy_eval(cfg, job)

    return on_ranks(cfg, body)
