"""The few rules that relate fields of different sections.

Everything else is checked by the section that owns the fields (its ``validate``) or by the
field's own limits (rules.py).
"""
from __future__ import annotations

from typing import Any

from flashdmd.config.model import STEP_RANGE, schedule_of
from flashdmd.config.rules import Scope

TOY_IGNORES = ("shards", "prompts", "latent_shards")  # the gmm2d toy samples its mixture, it reads no data


def validate_cross(cfg: Any, rules: Scope) -> None:
    steps, family = cfg.stage1.student_timesteps, cfg.model.family
    schedule = schedule_of(family)
    low, high = STEP_RANGE[schedule]
    rules.check(all(low <= t <= high for t in steps), ("stage1.student_timesteps", "model.family"),
                f"must lie in [{low}, {high}] for model.family={family} (the {schedule.upper()} schedule's "
                "timesteps, spec 1.2)")
    pairs = cfg.stage2.rl_transitions
    rules.check(all(len(p) == 2 and p[0] in steps and p[1] in steps and steps.index(p[1]) == steps.index(p[0]) + 1
                    for p in pairs), ("stage2.rl_transitions", "stage1.student_timesteps"),
                "must be pairs [t, t_next] of consecutive stage1.student_timesteps (spec 2.3)")
    rules.check(bool(pairs) or len(steps) < 2, ("stage2.rl_transitions", "stage1.student_timesteps"),
                "must not be empty: stage 2 trains the generator at these transitions (spec 2.3)",
                "e.g. the first two: [[t0, t1], [t1, t2]]")
    # DMD2's classifier loss reads the fake score's bottleneck, not its output (spec 4.2). The
    # sharded engines hook a network's backward on its output: ZeRO-3 then leaves the head's
    # gradients unreduced and FSDP2 meets the fake score's resharded root parameters, so the
    # pairing is refused before any job starts
    rules.check(cfg.stage1.mode != "dmd2" or cfg.engine.kind not in ("deepspeed", "fsdp"),
                ("stage1.mode", "engine.kind"),
                "must not be dmd2 with a sharded engine (its classifier loss reads the fake score's "
                "bottleneck, which DeepSpeed and FSDP2 do not back-propagate)", "use engine.kind=local (DDP over ranks)")
    read = [f"data.{name}" for name in TOY_IGNORES if getattr(cfg.data, name)]
    rules.check(family != "gmm2d" or not read, (*(read or ["data.shards"]), "model.family"),
                "is not read by model.family=gmm2d (the toy samples its own mixture)", "leave it empty")
