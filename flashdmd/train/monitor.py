"""What the trainer shows every ``tracking.sample_every`` steps besides the losses.

- image families: a grid of the generator's few-step samples for the fixed prompts of
  ``tracking.sample_prompts`` from fixed noise, so grids at different steps are comparable
  (prompts are encoded once, at start-up);
- gmm2d: the exact quality of the toy (sliced W2 to fresh true samples, modes covered, mean
  reward at t = 0), since its truth is known.

Sampling is run on every rank with identical inputs (a sharded generator's forward is collective);
only rank 0's tracker records the result.
"""
from __future__ import annotations

import torch

from flashdmd.algo.rng import noise_generator
from flashdmd.config import Config
from flashdmd.diffusion.rollout import randn, sample_student, timesteps_tensor
from flashdmd.engine.base import Engine
from flashdmd.eval.gmm import mode_mass, modes_covered, sliced_w2
from flashdmd.nets.parts import Parts
from flashdmd.infra.tracking import NullTracker

MONITOR_SEED_TAG = "monitor"


class SampleGrid:
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
        tracker.log_images("generator", images.float().cpu(), step)


class GMMQuality:
    def __init__(self, cfg: Config, parts: Parts, device: torch.device, num_samples: int = 2000) -> None:
        self.cfg, self.parts, self.device, self.n = cfg, parts, device, num_samples
        self.gmm = parts.exact

    @torch.no_grad()
    def measure(self, generator: torch.nn.Module) -> dict[str, float]:
        gen = noise_generator(self.cfg.seed, 0, 0, self.device, MONITOR_SEED_TAG)
        z = randn((self.n, 2), gen, device=self.device)
        x = sample_student(generator, self.parts.schedule, z, self.cfg.stage1.student_timesteps, {}, gen).cpu()
        truth, _ = self.gmm.sample(self.n, noise_generator(self.cfg.seed, 1, 0, "cpu", MONITOR_SEED_TAG))
        reward = self.parts.reward(x.to(self.device), timesteps_tensor(0, self.n, self.device), {}) if self.parts.reward else None
        metrics = {
            "eval/sw2": sliced_w2(x, truth, generator=torch.Generator().manual_seed(0)),
            "eval/modes_covered": float(modes_covered(mode_mass(x, self.gmm.means), self.gmm.weights)),
        }
        if reward is not None:
            metrics["eval/mean_reward"] = float(reward.mean())
        return metrics

    def __call__(self, engine: Engine, tracker: NullTracker, step: int) -> None:
        tracker.log_metrics(self.measure(engine["generator"]), step)


def build_monitor(cfg: Config, parts: Parts, device: torch.device) -> SampleGrid | GMMQuality:
    if parts.exact is not None:
        return GMMQuality(cfg, parts, device)
    return SampleGrid(cfg, parts, device)
