"""What the trainer shows every ``tracking.sample_every`` steps besides the losses.

- image families: a grid of the generator's few-step samples for the fixed prompts of
  ``tracking.sample_prompts`` from fixed noise, so grids at different steps are comparable
  (prompts are encoded once, at start-up);
- gmm2d: the exact quality of the toy (sliced W2 to the true mixture, mass of each mode, modes
  covered, mean reward at t = 0) beside the teacher's SW2 and the measurement's noise floor,
  since its truth is known (``flashdmd.train.gmm_quality``).

Sampling is run on every rank with identical inputs (a sharded generator's forward is collective);
only rank 0's tracker records the result.
"""
from __future__ import annotations

import torch

from flashdmd.algo.rng import noise_generator
from flashdmd.config import Config
from flashdmd.diffusion.rollout import randn, sample_student
from flashdmd.engine.base import Engine
from flashdmd.nets.parts import Parts
from flashdmd.infra.tracking import NullTracker
from flashdmd.train.gmm_quality import GMMQuality

MONITOR_SEED_TAG = "monitor"


class SampleGrid:
    # a grid before the first step too: the untrained start to compare with, and MLflow's image
    # slider opens at step 0 ("No image logged at this step" otherwise)
    at_start = True

    def __init__(self, cfg: Config, parts: Parts, device: torch.device) -> None:
        self.cfg, self.parts = cfg, parts
        with torch.no_grad():
            self.cond = {k: v.to(device) for k, v in parts.encode_prompts(cfg.tracking.sample_prompts).items()}
        n = len(cfg.tracking.sample_prompts)
        self.z = randn((n, *parts.latent_shape), noise_generator(cfg.seed, 0, 0, "cpu", MONITOR_SEED_TAG)).to(device)

    @torch.no_grad()
    def __call__(self, engine: Engine, tracker: NullTracker, step: int) -> None:
        gen = noise_generator(self.cfg.seed, 0, 0, self.z.device, MONITOR_SEED_TAG)
        x0 = sample_student(engine["generator"], self.parts.schedule, self.z, self.cfg.stage1.student_timesteps,
                            self.cond, gen)
        images = self.parts.decoder(x0).clamp(-1, 1)
        tracker.log_images("generator", images.float().cpu(), step, captions=list(self.cfg.tracking.sample_prompts))


class GMMMonitor:
    """The toy's exact quality (``flashdmd.train.gmm_quality``) as metrics at the sampling step."""

    at_start = False  # metrics start at the first sampling step, like every other metric

    def __init__(self, cfg: Config, parts: Parts, device: torch.device) -> None:
        self.quality = GMMQuality(cfg, parts, device)

    def __call__(self, engine: Engine, tracker: NullTracker, step: int) -> None:
        tracker.log_metrics(self.quality.measure(engine["generator"]), step)


def build_monitor(cfg: Config, parts: Parts, device: torch.device) -> SampleGrid | GMMMonitor:
    if parts.exact is not None:
        return GMMMonitor(cfg, parts, device)
    return SampleGrid(cfg, parts, device)
