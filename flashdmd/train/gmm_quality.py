"""The gmm2d toy's exact quality during training, with a noise floor well below the teacher's SW2.

The toy's truth is known (DESIGN.md toy world 1), so its quality is measured, not estimated:
sliced W2 to the true mixture, the mass of each mode, mean reward at t = 0 (flashdmd.eval.gmm).
With i.i.d. samples the measurement noise is as large as the quantity of interest: two sets of
4,096 true samples of the preset's mixture are ~0.14 apart in SW2 while the 50-step teacher's
own SW2 is ~0.10 (the MLP teacher; ~0.03 for the exact one, bench/results/gmm_distill*.md),
because the number of points per mode alone varies by ~sqrt(n w). The benchmark measures the
same way.
Here both sides are low-discrepancy instead:

- the truth set holds exactly round(n w_k) points of mode k, its Gaussian offsets the inverse
  normal CDF of a scrambled Sobol sequence;
- the student's (and the teacher's) noise z is the same kind of quasi-random normal set,
  fixed for the run, so successive measurements differ only by what the generator learned.

At n = 8192 two such truth sets are ~0.005 apart (``eval/sw2_floor``, logged with the others),
and the teacher's SW2 from the same z (``eval/sw2_teacher``, 50 deterministic steps, computed
once) is the reference a distilled student is read against.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from flashdmd.algo.rng import noise_generator
from flashdmd.config import Config
from flashdmd.diffusion.rollout import sample_student, timesteps_tensor
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.eval.gmm import mode_mass, modes_covered, sliced_w2
from flashdmd.nets.gmm2d import GMM
from flashdmd.nets.parts import Parts

NUM_SAMPLES = 8192  # a power of two: Sobol points are balanced at these sizes
TEACHER_STEPS = 50
SEED_TAG = "monitor"
PROJECTION_SEED = 0


def quasi_normal(n: int, dim: int, seed: int) -> Tensor:
    """``n`` low-discrepancy standard-normal points (scrambled Sobol through the inverse normal CDF)."""
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    return torch.special.ndtri(u.clamp(1e-9, 1 - 1e-9)).float()


def stratified_truth(means: Tensor, weights: Tensor, std: float, n: int, seed: int) -> Tensor:
    """``n`` points of the mixture with exactly round(n w_k) in mode k (the rest in the last mode)."""
    counts = (weights.double() * n).round().long()
    counts[-1] += n - counts.sum()
    labels = torch.repeat_interleave(torch.arange(len(weights)), counts)
    return means.float()[labels] + std * quasi_normal(n, means.shape[1], seed)


class GMMQuality:
    """``measure(generator)``: SW2, per-mode mass, modes covered and mean reward, beside the references."""

    def __init__(self, cfg: Config, parts: Parts, device: torch.device, num_samples: int = NUM_SAMPLES) -> None:
        self.cfg, self.parts, self.device = cfg, parts, device
        if not isinstance(parts.exact, GMM):
            raise TypeError(f"the exact toy quality needs the gmm2d mixture as parts.exact, got {type(parts.exact).__name__}")
        self.gmm = parts.exact
        self.z = quasi_normal(num_samples, 2, cfg.seed).to(device)
        self.truth = stratified_truth(self.gmm.means, self.gmm.weights, self.gmm.std, num_samples, cfg.seed + 1)
        self._references: dict[str, float] = {}

    @property
    def references(self) -> dict[str, float]:
        """The noise floor (two truth sets) and the teacher's SW2; computed once, at the first use."""
        if not self._references:
            other = stratified_truth(self.gmm.means, self.gmm.weights, self.gmm.std, self.truth.shape[0],
                                     self.cfg.seed + 2)
            self._references = {"eval/sw2_floor": self._sw2(other), "eval/sw2_teacher": self._sw2(self.teacher())}
        return self._references

    def _sw2(self, x: Tensor) -> float:
        return sliced_w2(x.float().cpu(), self.truth, generator=torch.Generator().manual_seed(PROJECTION_SEED))

    @torch.no_grad()
    def teacher(self) -> Tensor:
        """The teacher's samples from the run's z (the reference a student is read against)."""
        return sample_teacher(self.parts.teacher, self.parts.schedule, self.z, TEACHER_STEPS, {}, {}).cpu()

    @torch.no_grad()
    def student(self, generator: nn.Module) -> Tensor:
        """The generator's few-step samples from the run's z."""
        gen = noise_generator(self.cfg.seed, 0, 0, self.device, SEED_TAG)
        return sample_student(generator, self.parts.schedule, self.z, self.cfg.stage1.student_timesteps, {}, gen).cpu()

    @torch.no_grad()
    def measure_points(self, x: Tensor) -> dict[str, float]:
        """SW2, per-mode mass, modes covered and mean reward of the points ``x``."""
        mass = mode_mass(x, self.gmm.means)
        metrics = {"eval/sw2": self._sw2(x), "eval/modes_covered": float(modes_covered(mass, self.gmm.weights))}
        metrics.update({f"eval/mode_mass/m{k}": float(m) for k, m in enumerate(mass)})
        if self.parts.reward is not None:
            n = x.shape[0]
            reward = self.parts.reward(x.to(self.device), timesteps_tensor(0, n, self.device), {})
            metrics["eval/mean_reward"] = float(reward.mean())
        return metrics

    def measure(self, generator: nn.Module) -> dict[str, float]:
        """The generator's quality beside the references (noise floor, teacher's SW2)."""
        return {**self.measure_points(self.student(generator)), **self.references}
