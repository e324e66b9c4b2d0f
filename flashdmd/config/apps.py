"""The ``eval``, ``sample`` and ``export`` sections: the jobs that read a trained student
(flashdmd/apps/evaluate.py + watch.py, sample.py, export.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flashdmd.config.rules import Scope, setting

# the metric registry of flashdmd/eval/ (spec section 5); tests/config checks that the two agree
Metric = Literal["clip_score", "pickscore", "hpsv2", "fid", "fd_clip", "image_reward", "mps"]
IMAGES = {"ge": 1, "le": 65536}


@dataclass
class EvalConfig:
    prompts: str = ""  # text/JSONL prompt file
    num_images: int = setting(0, ge=0)  # 0 -> every prompt once
    metrics: list[Metric] = setting(["clip_score"], min_len=1, why="the metrics to compute")
    reference_images: str = ""  # folder or shards for FID
    weights: dict[Metric, str] = field(default_factory=dict)  # metric -> local folder or hub id; absent -> its default
    every: int = setting(0, ge=0)  # watch job: evaluate checkpoints whose step is a multiple of N (0: every checkpoint it sees)
    seed: int = setting(10, ge=0)  # DMD2's COCO-10k seed (spec 6 #21)
    source: str = ""  # run dir, its final/ hand-over or a checkpoint step dir; "" -> the run dir
    out_dir: str = ""  # results (table, images) go to <out_dir>/step-<N>; "" -> <source run dir>/eval
    batch_size: int = setting(4, **IMAGES)  # images per generator call per rank
    method: str = setting("", max_len=200)  # the row name in the results table; "" -> "Flash-DMD <family> (step N)"
    save_images: bool = False  # also write every generated image under out_dir/images
    poll_s: float = setting(60.0, gt=0, le=86400)  # watcher: seconds between looks at the checkpoint directory
    watch_timeout_s: float = setting(0.0, ge=0)  # watcher: stop after this long without a new checkpoint; 0 = until the run's hand-over
    teacher_steps: int = setting(0, ge=0, le=10000)  # > 0: the eval job adds the teacher's row (this many DDIM/Euler steps)
    teacher_guidance: float = setting(0.0, ge=0, le=100)  # the teacher row's CFG scale; 0 -> stage1.real_guidance_scale

    def validate(self, rules: Scope) -> None:
        rules.check(len(set(self.metrics)) == len(self.metrics), "metrics", "must not list a metric twice")
        unread = sorted(set(self.weights) - set(self.metrics))
        rules.check(not unread, (*(f"weights.{m}" for m in unread or ["clip_score"]), "metrics"),
                    "is only read when eval.metrics lists that metric", "add it to eval.metrics or remove the weights")
        rules.check(self.teacher_steps > 0 or not self.teacher_guidance, ("teacher_guidance", "teacher_steps"),
                    "is only read with eval.teacher_steps > 0 (the teacher row)")


@dataclass
class SampleConfig:
    """The sample job: a few prompts -> an image grid and one file per image, fixed seeds."""

    source: str = ""  # run dir, its final/ hand-over or a checkpoint step dir; "" -> the run dir
    prompts: list[str] = setting([], max_len=65536)  # prompts given directly
    prompts_file: str = ""  # text/JSONL prompt file (used when prompts is empty)
    images_per_prompt: int = setting(1, **IMAGES)
    seed: int = setting(0, ge=0)  # image i (prompt-major order) uses seed + i
    batch_size: int = setting(4, **IMAGES)
    out_dir: str = ""  # "" -> <source run dir>/samples/step-<N>

    def validate(self, rules: Scope) -> None:
        rules.check(not (self.prompts and self.prompts_file), ("prompts_file", "prompts"),
                    "is only read when sample.prompts is empty", "give the prompts one way")


@dataclass
class ExportConfig:
    """The export job: a trained student -> a diffusers pipeline folder (flashdmd/apps/export.py)."""

    source: str = ""  # run dir, its final/ hand-over or a checkpoint step dir; "" -> the run dir
    out_dir: str = ""  # "" -> <source run dir>/export/step-<N>
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # the saved weights' dtype (every network of the pipeline)
    variant: str = ""  # "" -> plain file names; e.g. "fp16" -> diffusion_pytorch_model.fp16.safetensors (from_pretrained(variant=))
    base_model: str = ""  # the model card's base_model; "" -> model.teacher (or the family's default teacher)
