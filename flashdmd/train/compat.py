"""Is a checkpoint this run's to resume?

``save_checkpoint`` gets ``checkpoint_identity(cfg, job)`` in trainer.json; before the engine
loads anything, ``check_resume`` compares it with the running config and refuses with one
message listing every difference (family, job, student timesteps, LoRA) and the two ways out.
Checkpoints written before these keys existed carry only family and job; absent keys are not
compared. Network shapes are checked again, key by key, by the engine's loader. The world size
is deliberately not part of the identity: every engine re-shards from the step directory's map
and the data positions are re-split (flashdmd/train/checkpoint.py), so a requeued job on fewer or
more nodes resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flashdmd.config import Config


class IncompatibleCheckpoint(ValueError):
    """The checkpoint was written by another family or an incompatible config."""


def checkpoint_identity(cfg: Config, job: str) -> dict[str, Any]:
    """What must match for a checkpoint to resume under ``cfg``."""
    lora = cfg.model.lora
    return {
        "family": cfg.model.family,
        "job": job,
        "student_timesteps": list(cfg.stage1.student_timesteps),
        "lora": {"enabled": lora.enabled, "rank": lora.rank if lora.enabled else 0,
                 "target_modules": sorted(lora.target_modules) if lora.enabled else []},
    }


def check_resume(trainer: dict[str, Any], cfg: Config, job: str, path: Path | str) -> None:
    """Raise IncompatibleCheckpoint naming what differs between ``trainer`` (trainer.json) and ``cfg``."""
    mine = checkpoint_identity(cfg, job)
    differences = [f"{key}: checkpoint {trainer[key]!r} != this run {value!r}"
                   for key, value in mine.items() if key in trainer and trainer[key] != value]
    if differences:
        raise IncompatibleCheckpoint(
            f"refusing to resume from {path}: it was written by an incompatible run ("
            + "; ".join(differences)
            + "). Use another run name (a new run directory) or checkpoint.dir, or restore the config that wrote it."
        )
