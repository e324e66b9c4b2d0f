"""What a family hands to the algorithm: the schedule and every network of spec 1.1, by role.

``build_parts`` of each family (``flashdmd.nets.registry``) returns one ``Parts``. The algorithm
takes networks by role; the engine wraps the trainable ones (generator, fake_score,
discriminator: only its parameters with requires_grad are optimised) and keeps the rest frozen.
Frozen networks are never checkpointed and never get optimizer state (DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from torch import Generator, Tensor, nn

from flashdmd.diffusion.schedules import Schedule
from flashdmd.nets.interfaces import Conditioning


class ExactDistribution(Protocol):
    """A data distribution known in closed form (the gmm2d toy world): fresh true samples and
    the modes that exact quality metrics measure against (DESIGN.md toy world 1)."""

    means: Tensor  # (modes, dim)
    weights: Tensor  # (modes,)

    def sample(self, n: int, generator: Generator) -> tuple[Tensor, Tensor]:
        """(samples, mode labels)."""


@dataclass
class Parts:
    family: str
    schedule: Schedule  # VPSchedule | FlowSchedule
    latent_shape: tuple[int, ...]  # one sample's latent shape, e.g. (4, 8, 8); gmm2d: (2,)
    teacher: nn.Module  # Denoiser, frozen (real score mu_real)
    generator: nn.Module  # Denoiser, trainable, initialised from the teacher (Algorithm 1 init)
    fake_score: nn.Module  # Denoiser, trainable, initialised from the teacher
    decoder: nn.Module  # Decoder V, frozen, differentiable
    discriminator: nn.Module  # frozen backbone + trainable heads
    encode_prompts: Callable[[list[str]], Conditioning]  # frozen text encoders
    null_cond: Callable[[int], Conditioning]  # unconditional conditioning for CFG, batch n
    reward: nn.Module | None = None  # RewardModel (LRM), frozen; stage 2 only
    encode_images: Callable[[Tensor], Tensor] | None = None  # pixels -> latents (VAE encoder), for data tools
    exact: ExactDistribution | None = None  # the true data distribution when known (gmm2d), else None
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific facts (VAE scaling, ...)

    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "fake_score": self.fake_score, "discriminator": self.discriminator}

    def frozen(self) -> dict[str, nn.Module]:
        nets = {"teacher": self.teacher, "decoder": self.decoder}
        if self.reward is not None:
            nets["reward"] = self.reward
        return nets
