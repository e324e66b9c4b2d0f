"""The distilled student as an image generator, and the sample job.

``find_student(source)`` locates trained generator weights: a run directory (its ``final/``
hand-over, else its newest valid checkpoint), a ``final/`` folder, or one checkpoint step
directory. ``load_student(cfg, source)`` builds the family's networks (``build_parts``), loads
the generator's trainable tensors into them and keeps what generation needs: generator, VAE
decoder, text encoders (and the frozen teacher, for the eval table's reference row,
``TeacherBaseline``). Generation runs in the networks' own dtypes (fp32 generator masters), without
autocast. ``Student.generate(prompts, seeds)`` runs the LCM-style few-step sampler
of spec 1.2 (``flashdmd.diffusion.rollout``: predict x0 at each student timestep, re-noise with
fresh noise to the next) without CFG, and decodes.

Seeds: image ``i`` owns a CPU ``torch.Generator`` seeded ``seed + i`` that draws its initial
noise and every re-noising draw, so an image depends only on its prompt and seed, never on the
batch it was generated in or the rank that made it (evaluation shards images over ranks). For a
batch of one this is exactly ``sample_student`` with that generator.

Weights are read by ``flashdmd.engine.checkpoint_reader.CheckpointReader`` on this one process,
from the map every step directory carries, so a step directory of any engine (local, DDP, FSDP2,
DeepSpeed ZeRO-3) and at any world size serves as well as the hand-over: sampling, export,
evaluation and the watcher all take intermediate checkpoints.

Raw or EMA weights (spec 6 #20 [INF]: report both; the raw ones are the paper-comparable ones):
a run with ``stage1.generator_ema`` saves network ``generator_ema`` beside ``generator``, and the
apps take it by default when the source has it (``--weights ema|raw``; ``weights=""``: ema when
present). The EMA covers the trainable tensors; buffers come from the generator. The choice is
``StudentSource.weights``, which the apps record (samples.json, export card, eval results).

The sample job (``main(cfg, "sample")`` or ``python -m flashdmd.apps.sample``): prompts from
``sample.prompts`` or ``sample.prompts_file`` -> ``grid.png`` plus one PNG per image and
``samples.json`` (prompt, seed, file) under ``sample.out_dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flashdmd.apps.cli import app_parser, exit_code, on_ranks, parse_app_args
from flashdmd.train.checkpoint import is_valid, latest_valid
from flashdmd.config import Config
from flashdmd.data.prompts import load_prompts
from flashdmd.diffusion.rollout import predict_x0, randn, timesteps_tensor
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.engine.shadow import shadow_name
from flashdmd.engine.state_io import load_json
from flashdmd.nets.parts import Parts
from flashdmd.nets.registry import build_parts
from flashdmd.train.handoff import FINAL, META, trainable_keys
from flashdmd.infra.tracking import image_grid

log = logging.getLogger("flashdmd.apps.sample")


@dataclass(frozen=True)
class StudentSource:
    """Where a student's weights are: the folder holding ``generator.safetensors`` and its facts."""

    folder: Path
    kind: str  # "handoff" | "checkpoint"
    step: int
    run_dir: Path
    family: str
    student_timesteps: list[int] | None  # None: not recorded (older checkpoints); the config's are used
    run_id: str | None
    weights: str = "raw"  # "raw" | "ema": which generator tensors load_generator_weights takes (spec 6 #20)


def _from_handoff(folder: Path) -> StudentSource:
    meta = json.loads((folder / META).read_text())
    return StudentSource(folder, "handoff", int(meta["step"]), folder.parent, meta["family"],
                         list(meta["student_timesteps"]), meta.get("mlflow_run_id"))


def _from_checkpoint(folder: Path) -> StudentSource:
    trainer = load_json(folder / "trainer.json")
    timesteps = trainer.get("student_timesteps")
    return StudentSource(folder, "checkpoint", int(trainer["step"]), folder.parent.parent, trainer.get("family", ""),
                         list(timesteps) if timesteps else None, trainer.get("mlflow_run_id"))


WEIGHTS = ("ema", "raw")
EMA_NETWORK = shadow_name("generator")


def choose_weights(source: StudentSource, weights: str = "") -> StudentSource:
    """``source`` with its weights chosen: "ema" or "raw" as asked, "" -> ema when the source has it."""
    if weights not in ("", *WEIGHTS):
        raise ValueError(f"weights must be one of {WEIGHTS} (or empty: ema when present), got {weights!r}")
    has_ema = EMA_NETWORK in CheckpointReader(source.folder).networks()
    if weights == "ema" and not has_ema:
        raise FileNotFoundError(f"{source.folder} holds no generator EMA (the run had stage1.generator_ema=false); "
                                "use --weights raw")
    return replace(source, weights=weights or ("ema" if has_ema else "raw"))


def find_student(source: str | Path, weights: str = "") -> StudentSource:
    """A run directory (hand-over first, else newest valid checkpoint), a ``final/`` folder or a step
    directory; ``weights`` as ``choose_weights``."""
    return choose_weights(_locate(source), weights)


def _locate(source: str | Path) -> StudentSource:
    path = Path(source)
    if (path / META).is_file():
        return _from_handoff(path)
    if (path / FINAL / META).is_file():
        return _from_handoff(path / FINAL)
    if path.name.startswith("step-"):
        if not is_valid(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid COMPLETE marker)")
        return _from_checkpoint(path)
    newest = latest_valid(path / "checkpoints") if path.is_dir() else None
    if newest is not None:
        return _from_checkpoint(newest)
    raise FileNotFoundError(
        f"no trained generator at {str(path)!r}: expected a run directory with final/{META} or checkpoints/step-*, "
        f"a final/ folder, or a checkpoint step directory"
    )


def default_source(cfg: Config, job: str, need_student: bool = True) -> Path:
    """The training run a job looks at when its ``*.source`` is empty.

    This config's run directory if it holds a student; under the default names of
    ``jobs/submit.py`` ("<preset>-<job>", e.g. tiny-sdxl-eval) the preset's stage-2 run, else its
    stage-1 run. ``need_student=False`` (the watcher, before the first checkpoint) takes the first
    of those directories that exists.
    """
    candidates = [cfg.run_dir]
    if cfg.name.endswith(f"-{job}"):
        base = cfg.name.removesuffix(f"-{job}")
        candidates += [Path(cfg.run_root) / f"{base}-stage2", Path(cfg.run_root) / f"{base}-stage1"]
    for path in candidates:
        if need_student:
            try:
                find_student(path)
                return path
            except (FileNotFoundError, OSError):
                continue
        elif path.is_dir():
            return path
    raise FileNotFoundError(f"no training run found for the {job} job in {', '.join(map(str, candidates))}; "
                            f"set {job if job != 'watch' else 'eval'}.source to a run directory, final/ folder or "
                            "checkpoint step directory")


def timesteps_of(cfg: Config, source: StudentSource) -> list[int]:
    """The student's timesteps: as recorded with the weights, else the config's (spec 1.2)."""
    return list(source.student_timesteps or cfg.stage1.student_timesteps)


class Student:
    """Generator + decoder + text encoders of one trained student, on one device."""

    def __init__(self, parts: Parts, timesteps: Sequence[int], source: StudentSource, device: torch.device) -> None:
        self.family = parts.family
        self.schedule = parts.schedule
        self.latent_shape = tuple(parts.latent_shape)
        self.timesteps = list(timesteps)
        self.source = source
        self.device = device
        self.generator = parts.generator.to(device).eval()
        self.decoder = parts.decoder.to(device).eval()
        self.text = parts.extras["text_encoder"].to(device)
        self.extras = parts.extras
        self.teacher = parts.teacher  # kept on the CPU for the eval table's reference row (TeacherBaseline)

    def load(self, source: StudentSource, cfg: Config) -> None:
        """Switch to the weights of another hand-over or checkpoint of the same run (the watcher's reuse)."""
        load_generator_weights(self.generator, source)
        self.source, self.timesteps = source, timesteps_of(cfg, source)

    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    @torch.no_grad()
    def latents(self, prompts: list[str], seeds: Sequence[int]) -> Tensor:
        """Few-step samples (scaled latents) for ``prompts``, image i driven by seed ``seeds[i]``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
        cond = self.text(list(prompts))
        rngs = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

        def draw() -> Tensor:  # one draw per image from its own generator, as a batch of one would
            return torch.cat([randn((1, *self.latent_shape), g) for g in rngs]).to(self.device)

        x0 = predict_x0(self.generator, self.schedule, draw(), self.timesteps[0], cond)
        for t in self.timesteps[1:]:
            tt = timesteps_tensor(t, x0.shape[0], self.device)
            x0 = predict_x0(self.generator, self.schedule, self.schedule.add_noise(x0, draw(), tt), t, cond)
        return x0

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: Sequence[int]) -> Tensor:
        """Images [N, 3, H, W] in [-1, 1] (clamped), on the CPU."""
        return self.decoder(self.latents(prompts, seeds)).clamp(-1, 1).float().cpu()


class TeacherBaseline:
    """The frozen teacher as the results table's reference row (spec 5, "SDXL (teacher)"): the
    deterministic multi-step DDIM/Euler sampler with CFG of ``flashdmd.diffusion.sampler``, from the
    same per-seed initial noise as the student."""

    def __init__(self, student: Student, steps: int, guidance: float) -> None:
        self.student, self.steps, self.guidance = student, steps, guidance

    @property
    def nfe(self) -> int:
        return self.steps * (1 if self.guidance == 1.0 else 2)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: Sequence[int]) -> Tensor:
        s = self.student
        teacher = s.teacher.to(s.device)
        z = torch.cat([randn((1, *s.latent_shape), torch.Generator("cpu").manual_seed(int(x))) for x in seeds])
        x0 = sample_teacher(teacher, s.schedule, z.to(s.device), self.steps, s.text(list(prompts)),
                            s.text.null(len(prompts)), self.guidance)
        return s.decoder(x0).clamp(-1, 1).float().cpu()


def load_generator_weights(generator: torch.nn.Module, source: StudentSource) -> None:
    """Load the generator's trainable tensors from a hand-over or a step directory of any engine:
    the raw ones, or with ``source.weights == "ema"`` the EMA's over the raw buffers."""
    reader = CheckpointReader(source.folder)
    if "generator" not in reader.networks():
        raise FileNotFoundError(f"{source.folder} holds no generator (networks: {reader.networks()})")
    expected = trainable_keys(generator)
    saved = set(reader.keys("generator"))
    buffers = {n for n, _ in generator.named_buffers()}  # non-persistent ones may be saved too; never required
    if not expected <= saved or saved - expected - buffers:
        diff = sorted(saved ^ expected - buffers)[:5]
        raise ValueError(f"{source.folder}: the saved generator does not fit the generator built from this config "
                         f"(e.g. {diff}); model.family or model.lora.enabled differ from the training run")
    state = {k: t for k, t in reader.tensors("generator") if k in expected}
    if source.weights == "ema":
        trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
        ema = reader.state_dict(EMA_NETWORK)
        if set(ema) != trainable:
            raise ValueError(f"{source.folder}: the saved generator EMA does not fit the generator built from this "
                             f"config (e.g. {sorted(set(ema) ^ trainable)[:5]})")
        state.update({k: v.to(state[k].dtype) for k, v in ema.items()})
    generator.load_state_dict(state, strict=False)


def new_student(cfg: Config, source: StudentSource, device: torch.device | str = "cpu") -> Student:
    """The networks of ``cfg``'s family for ``source``'s run; the generator still holds the teacher's
    weights until ``Student.load`` (the watcher builds once and loads each checkpoint)."""
    if source.family and source.family != cfg.model.family:
        raise ValueError(f"{source.folder} holds a {source.family} generator but model.family={cfg.model.family}; "
                         "pass the training run's preset and overrides")
    if cfg.model.family == "gmm2d":
        raise ValueError("model.family=gmm2d has no images; its sample and eval jobs run flashdmd/apps/toy_plot.py "
                         "(python jobs/submit.py sample --config gmm2d)")
    cache_dir = Path(cfg.model.cache_dir or Path(cfg.run_root) / "cache")
    # one process holds the whole student, whatever engine trained it: materialised, not meta
    return Student(build_parts(cfg, cache_dir, lazy=False), timesteps_of(cfg, source), source, torch.device(device))


def load_student(cfg: Config, source: str | Path | StudentSource, device: torch.device | str = "cpu",
                 weights: str = "") -> Student:
    """The trained student of ``source`` (see ``find_student``; ``weights``: ema | raw | "" = ema
    when present), built from ``cfg``'s family."""
    src = source if isinstance(source, StudentSource) else find_student(source, weights)
    student = new_student(cfg, src, device)
    student.load(src, cfg)
    return student


def generate_batched(student: Student, prompts: list[str], seeds: list[int], batch_size: int) -> Tensor:
    """``student.generate`` in chunks of ``batch_size`` (bounded memory; results do not depend on it)."""
    chunks = [student.generate(prompts[i:i + batch_size], seeds[i:i + batch_size])
              for i in range(0, len(prompts), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0)


def to_uint8(image: Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8 (the rounding of ``tracking.image_grid``)."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def sample_prompts(cfg: Config) -> list[str]:
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    if cfg.sample.prompts_file:
        return load_prompts(cfg.sample.prompts_file)
    return list(cfg.tracking.sample_prompts)  # the prompts of the training run's sample grids


def run_sample(cfg: Config, device: torch.device | str = "cpu", weights: str = "") -> Path:
    """Generate the sample job's images; returns the output folder."""
    prompts = sample_prompts(cfg)
    student = load_student(cfg, cfg.sample.source or default_source(cfg, "sample"), device, weights)
    expanded = [p for p in prompts for _ in range(cfg.sample.images_per_prompt)]
    seeds = [cfg.sample.seed + i for i in range(len(expanded))]
    images = generate_batched(student, expanded, seeds, cfg.sample.batch_size)
    out = Path(cfg.sample.out_dir) if cfg.sample.out_dir else student.source.run_dir / "samples" / f"step-{student.source.step:08d}"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, seed) in enumerate(zip(expanded, seeds)):
        name = f"{i:05d}.png"
        Image.fromarray(to_uint8(images[i])).save(out / name)
        records.append({"file": name, "prompt": prompt, "seed": seed})
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    (out / "samples.json").write_text(json.dumps({
        "source": str(student.source.folder), "step": student.source.step, "family": student.family,
        "weights": student.source.weights, "timesteps": student.timesteps, "images": records}, indent=1))
    log.info("wrote %d images and grid.png to %s", len(records), out)
    return out


def main(cfg: Config, job: str = "sample", weights: str = "") -> Path | None:
    """Launcher entry: rank 0 samples (a handful of images needs no sharding); returns the folder there."""
    return on_ranks(cfg, lambda ctx: run_sample(cfg, ctx.device, weights) if ctx.is_main else None)


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=WEIGHTS, default="",
                        help="the generator's EMA or raw weights (default: ema when the source has it, spec 6 #20)")


def cli(argv: list[str] | None = None) -> int:
    parser = app_parser("sample", "Sample images from a trained student.")
    parser.add_argument("--source", default="", help="run dir, final/ folder or checkpoint step dir (sample.source)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; sample.prompts)")
    parser.add_argument("--prompts-file", default="", help="text/JSONL prompt file (sample.prompts_file)")
    parser.add_argument("--out", default="", help="output folder (sample.out_dir)")
    add_weights_flag(parser)
    args, cfg = parse_app_args(parser, argv)
    cfg.sample.source = args.source or cfg.sample.source
    cfg.sample.prompts = args.prompt or cfg.sample.prompts
    cfg.sample.prompts_file = args.prompts_file or cfg.sample.prompts_file
    cfg.sample.out_dir = args.out or cfg.sample.out_dir
    return exit_code("sample", lambda: main(cfg, "sample", args.weights), lambda out: f"samples in {out}")


if __name__ == "__main__":
    sys.exit(cli())
