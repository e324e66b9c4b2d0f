"""Pre-submission checks of the paths a job will read (missing paths fail
before submission, not on the cluster an hour later).

``validate`` (flashdmd/config/__init__.py) checks types, ranges and cross-field rules; this module checks
the file system: the teacher and other model folders given as local paths, the training shards
(``flashdmd.data.check_shards``: empty, matching nothing, or every file missing), prompt files,
FID reference images and, for a stage-2 job, ``stage2.init_from``. Hub ids (``org/name``) and
remote or ``pipe:`` URLs are not probed: there may be no network where jobs are submitted.
``preflight`` raises one ConfigError listing every problem.
"""
from __future__ import annotations

from pathlib import Path

from flashdmd.config import Config, ConfigError
from flashdmd.data import DataError, check_shards

TRAINING_JOBS = ("stage1", "stage2", "pipeline")


def _is_local_path(value: str) -> bool:
    """An absolute, home or dot-relative path, or one that names a file suffix; not an ``org/name`` hub id."""
    return value.startswith(("/", "./", "../", "~", "file:")) or Path(value).suffix in (".safetensors", ".pt", ".bin", ".ckpt")


def _missing(key: str, value: str, what: str) -> str | None:
    path = Path(value.removeprefix("file:")).expanduser()
    return None if path.exists() else f"{key}={value!r}: {what} does not exist"


def preflight_problems(cfg: Config, job: str, init_from_pending: bool = False) -> list[str]:
    """Every missing input of ``job`` under ``cfg``, one message per key (empty when all is there).

    ``init_from_pending``: stage 2 of a pipeline, whose ``stage2.init_from`` stage 1 has yet to write."""
    problems: list[str | None] = []
    model = cfg.model
    for key, value in (("model.teacher", model.teacher), ("model.vae", model.vae), ("model.sam", model.sam),
                       ("model.reward_model", model.reward_model)):
        if value and _is_local_path(value):
            problems.append(_missing(key, value, "this local model path"))
    for i, value in enumerate(model.text_encoders):
        if value and _is_local_path(value):
            problems.append(_missing(f"model.text_encoders[{i}]", value, "this local model path"))
    if job in TRAINING_JOBS and model.family != "gmm2d":
        try:
            check_shards(cfg)
        except DataError as err:
            problems.append(str(err))
        if cfg.data.prompts and ":" not in cfg.data.prompts.split("/", 1)[0]:
            problems.append(_missing("data.prompts", cfg.data.prompts, "the prompt file"))
    if job == "stage2" and cfg.stage2.init_from and not init_from_pending:
        problems.append(_missing("stage2.init_from", cfg.stage2.init_from, "the stage-1 run directory"))
    for key, value in (("eval.prompts", cfg.eval.prompts), ("eval.reference_images", cfg.eval.reference_images),
                       ("sample.prompts_file", cfg.sample.prompts_file)):
        if value and _is_local_path(value):
            problems.append(_missing(key, value, "this file"))
    return [p for p in problems if p]


def preflight(cfg: Config, job: str) -> None:
    """Raise ConfigError listing every missing input of ``job``; call before submitting it."""
    preflight_all([(job, cfg)])


def preflight_all(configs: list[tuple[str, Config]]) -> None:
    """``preflight`` for the (job, config) list of jobs/submit.py, stage 2 of a pipeline after its stage 1."""
    problems = []
    for i, (job, cfg) in enumerate(configs):
        pending = job == "stage2" and any(earlier == "stage1" for earlier, _ in configs[:i])
        problems += [f"{job}: {p}" if len(configs) > 1 else p for p in preflight_problems(cfg, job, pending)]
    if problems:
        raise ConfigError("missing inputs:\n  - " + "\n  - ".join(problems))
