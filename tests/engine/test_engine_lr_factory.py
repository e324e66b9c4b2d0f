"""LR schedules (flashdmd/engine/lr.py) against closed forms, and engine selection from the config."""
from __future__ import annotations

import math

import pytest
import torch

from flashdmd.config import load_config
from flashdmd.engine.base import OptimSpec
from flashdmd.engine.factory import build_engine, optim_specs
from flashdmd.engine.local import LocalEngine
from flashdmd.engine.lr import StepSchedule, lr_at


def test_warmup_then_cosine_and_linear() -> None:
    cos = OptimSpec(lr=2.0, warmup_steps=4, schedule="cosine", total_steps=14)
    assert [lr_at(cos, s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr_at(cos, 4) == 2.0 and lr_at(cos, 9) == pytest.approx(1.0) and lr_at(cos, 14) == pytest.approx(0.0)
    assert lr_at(cos, 6) == pytest.approx(1.0 + math.cos(math.pi * 0.2))
    lin = OptimSpec(lr=1.0, schedule="linear", total_steps=10)
    assert lr_at(lin, 5) == pytest.approx(0.5) and lr_at(lin, 50) == 0.0
    assert lr_at(OptimSpec(lr=3.0), 10**6) == 3.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(OptimSpec(lr=1.0, schedule="step"), 0)


def test_step_schedule_drives_param_groups_and_round_trips() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=99.0)
    sched = StepSchedule(OptimSpec(lr=1.0, warmup_steps=2))
    assert sched.apply(opt.param_groups) == 0.5 and opt.param_groups[0]["lr"] == 0.5
    sched.advance()
    again = StepSchedule(OptimSpec(lr=1.0, warmup_steps=2))
    again.load_state_dict(sched.state_dict())
    assert again.lr == 1.0


def test_factory_picks_engine_and_specs() -> None:
    cfg = load_config("tiny-sdxl", ["stage1.generator_lr=0.003", "stage1.disc_lr=0.02", "stage1.lr_schedule=cosine",
                                    "stage2.rl_lr=0.5"])
    specs = optim_specs(cfg)
    assert specs["generator"].lr == 0.003 and specs["discriminator"].lr == 0.02
    assert specs["fake_score"].schedule == "cosine" and specs["fake_score"].total_steps == cfg.stage1.iterations
    assert optim_specs(cfg, stage=2)["generator"].lr == 0.5
    assert isinstance(build_engine(cfg), LocalEngine)
    for kind in ("fsdp", "deepspeed"):
        with pytest.raises(RuntimeError, match="process group"):
            build_engine(load_config("tiny-sdxl", [f"engine.kind={kind}"]))
