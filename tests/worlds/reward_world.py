"""A stage-2 RL update under DDP on gmm2d with uneven batches per rank, recording every reward score,
for the test that the logged ``rl_*`` values are global (tests/algo/test_stage2_metrics.py)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from stage2_world import SMALL, gmm_batch, stage2_setup
from torch import Tensor, nn

from flashdmd.config import load_config
from flashdmd.nets.gmm2d import build_gmm_parts


class Recording(nn.Module):
    """The reward model as it is, keeping each call's scores."""

    def __init__(self, reward: nn.Module) -> None:
        super().__init__()
        self.reward, self.seen = reward, []

    def forward(self, latents: Tensor, t: Tensor, cond: Any) -> Tensor:
        score = self.reward(latents, t, cond)
        self.seen.append(score.detach().float().clone())
        return score


def ddp_rl_scores(cache: str, sizes: list[int]) -> dict[str, Tensor]:
    """One RL update with ``sizes[rank]`` prompts on each rank; rank 0's logged metrics and every
    rank's (prompts x transitions, K) scores, gathered."""
    from pathlib import Path

    from flashdmd.engine.ddp import DDPEngine

    engine = DDPEngine("cpu")
    probe = build_gmm_parts(load_config("gmm2d", SMALL), Path(cache))
    reward = Recording(probe.reward)
    cfg, parts, s2 = stage2_setup(engine, cache, ["stage2.distill=false"], reward=reward)
    metrics = s2.rl_update(0, gmm_batch(parts, sizes[engine.rank], seed=engine.rank))
    K = cfg.stage2.num_candidates
    mine = torch.cat([s.view(-1, K) for s in reward.seen])
    every: list[Tensor] = [torch.empty(0)] * engine.world_size
    dist.all_gather_object(every, mine)
    out = {f"m.{k}": torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
    out.update({f"scores.{r}": s for r, s in enumerate(every)})
    return out
