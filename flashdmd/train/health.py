"""Training-health monitors logged to MLflow as ``health/*`` (config ``health``).

At every ``tracking.log_every`` step, on every rank with the same inputs (a sharded network's
forward is collective), from the networks as they are after that step:

- ``fake_lag``: the fake score's own denoising loss (spec 1.6, t ~ U[0, T)) on FRESH generator
  samples, which it has not been trained on: it rises when the fake score falls behind the
  generator, the failure the TTUR and EMA pull (spec 1.6-1.7) are there to prevent;
- ``dm_grad_norm/t<T>``: the generator's gradient norm on the steps whose DM branch was student
  step T (spec 1.3), averaged since the last log step (observed every step, from the engine's
  ``generator_grad_norm``), so a collapse or blow-up at one timestep is not averaged away;
  ``steps/health/dm_grad_norm/t<T>`` says over how many updates (``flashdmd.train.window``);
- ``d_logit_gap``: mean D(real) - mean D(fake) of this step (spec 1.8): a gap growing without bound
  means the discriminator wins and the GAN gradient vanishes or explodes;
- ``latent_mean`` / ``latent_std`` and their drift from the first measurement of this run
  (absolute for the mean, relative for the std) of few-step generator samples;
- stage 2: ``reward`` and ``diversity`` (mean pairwise L2 distance) of ``health.monitor_batch``
  samples for ONE prompt (spec 2.6: reward hacking shows as reward up, diversity down).

A value outside its configured bound (``health.*_max``, ``health.diversity_min``; 0 = no bound)
logs a WARNING and the metric ``health/out_of_bounds/<name>`` = 1 at that step.
Departure: the latent reference is the run's first measurement, not the teacher's distribution
(sampling the teacher costs its full step count per log step).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from flashdmd.algo.batch import Batch
from flashdmd.algo.rng import noise_generator
from flashdmd.config import Config
from flashdmd.diffusion.rollout import randn, sample_student, timesteps_tensor
from flashdmd.engine.base import Engine
from flashdmd.losses import denoising_loss
from flashdmd.nets.interfaces import repeat_cond, take_cond
from flashdmd.nets.parts import Parts
from flashdmd.train.window import MetricWindow

log = logging.getLogger("flashdmd.health")
HEALTH_SEED_TAG = "health"


class HealthMonitor:
    def __init__(self, cfg: Config, parts: Parts, stage: int, plan_dm_step: Any, rank: int) -> None:
        """``plan_dm_step(step) -> int`` gives the student timestep of a 0-based iteration's DM branch."""
        self.cfg, self.h, self.parts, self.stage, self.rank = cfg, cfg.health, parts, stage, rank
        self.plan_dm_step = plan_dm_step
        self.reference: dict[str, float] = {}
        self._per_t = MetricWindow()  # per-timestep statistics over the logging window, with counts

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Every iteration (0-based ``step``): keep the DM gradient norm by student timestep."""
        if "generator_grad_norm" in metrics and not metrics.get("generator_skipped"):
            t = self.plan_dm_step(step)
            self._per_t.add({f"health/dm_grad_norm/t{t}": metrics["generator_grad_norm"]})

    @torch.no_grad()
    def measure(self, engine: Engine, batch: Batch, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Collective: the health metrics at (1-based) ``step``, with out-of-bounds flags."""
        out = dict(sorted(self._per_t.summary().items()))
        if "d_real" in metrics and "d_fake" in metrics:
            out["health/d_logit_gap"] = metrics["d_real"] - metrics["d_fake"]
        n = self.h.monitor_batch
        gen = noise_generator(self.cfg.seed, step, self.rank, engine.device, HEALTH_SEED_TAG)
        cond = _first_rows(batch.cond, n)
        x0 = self._sample(engine, cond, n, gen)
        out.update(self._fake_lag(engine, x0, cond, gen))
        out.update(self._latent_stats(x0))
        if self.stage == 2 and self.parts.reward is not None:
            out.update(self._reward_diversity(engine, batch, n, gen))
        out.update(self._bounds(out, step))
        return out

    def _sample(self, engine: Engine, cond: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
        z = randn((n, *self.parts.latent_shape), gen, device=engine.device)
        return sample_student(engine["generator"], self.parts.schedule, z, self.cfg.stage1.student_timesteps, cond, gen)

    def _fake_lag(self, engine: Engine, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                  gen: torch.Generator) -> dict[str, float]:
        sch = self.parts.schedule
        t = sch.sample_t(x0.shape[0], 0.0, 1.0, gen, device=x0.device)
        noise = randn(x0.shape, gen, like=x0)
        pred = engine["fake_score"](sch.add_noise(x0, noise, t), t, cond)
        return {"health/fake_lag": float(denoising_loss(pred, sch.target(x0, noise, t)))}

    def _latent_stats(self, x0: torch.Tensor) -> dict[str, float]:
        mean, std = float(x0.float().mean()), float(x0.float().std())
        if not self.reference:
            self.reference = {"mean": mean, "std": std}
        return {
            "health/latent_mean": mean, "health/latent_std": std,
            "health/latent_mean_drift": abs(mean - self.reference["mean"]),
            "health/latent_std_drift": abs(std / max(self.reference["std"], 1e-12) - 1.0),
        }

    def _reward_diversity(self, engine: Engine, batch: Batch, n: int, gen: torch.Generator) -> dict[str, float]:
        one = repeat_cond(_first_rows(batch.cond, 1), n) if batch.cond else {}
        x0 = self._sample(engine, one, n, gen)
        reward = engine["reward"](x0, timesteps_tensor(0, n, x0.device), one)
        diversity = torch.pdist(x0.flatten(1).float()).mean()
        return {"health/reward": float(reward.float().mean()), "health/diversity": float(diversity)}

    def _bounds(self, values: dict[str, float], step: int) -> dict[str, float]:
        h = self.h
        checks: list[tuple[str, float, float, bool]] = [("fake_lag", values["health/fake_lag"], h.fake_lag_max, True)]
        checks += [(k.removeprefix("health/"), v, h.dm_grad_norm_max, True)
                   for k, v in values.items() if k.startswith("health/dm_grad_norm/")]
        if "health/d_logit_gap" in values:
            checks.append(("d_logit_gap", abs(values["health/d_logit_gap"]), h.d_logit_gap_max, True))
        checks += [("latent_mean_drift", values["health/latent_mean_drift"], h.latent_drift_max, True),
                   ("latent_std_drift", values["health/latent_std_drift"], h.latent_drift_max, True)]
        if "health/diversity" in values:
            checks.append(("diversity", values["health/diversity"], h.diversity_min, False))
        flags: dict[str, float] = {}
        for name, value, bound, upper in checks:
            if bound > 0 and (value > bound if upper else value < bound):
                flags[f"health/out_of_bounds/{name}"] = 1.0
                if self.rank == 0:
                    log.warning("step %d: health monitor %s = %.4g is %s its bound %g", step, name, value,
                                "above" if upper else "below", bound)
        return flags

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = dict(state.get("reference", {}))


def _first_rows(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` rows of a conditioning, repeated when the batch has fewer."""
    if not cond:
        return {}
    have = next(iter(cond.values())).shape[0]
    if have >= n:
        return take_cond(cond, slice(0, n))
    index = torch.arange(n) % have
    return take_cond(cond, index.to(next(iter(cond.values())).device))
