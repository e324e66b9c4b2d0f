"""Diffusion math: schedules, conversions, student rollout and teacher sampler (pure functions)."""
from flashdmd.diffusion.schedules import FlowSchedule, Schedule, VPSchedule

__all__ = ["FlowSchedule", "Schedule", "VPSchedule"]
