"""Stage 2: joint preference RL with continuing distillation (spec 2.1-2.5).

Iterations alternate by a fixed pattern of period ``rl_per_dm + 1``: ``rl_per_dm`` RL iterations,
then one distillation iteration (a stage-1 generator update). The fake score, the discriminator
and the EMA pull of the fake score toward the generator run in EVERY iteration (spec 2.5
scheduler: the stage-2 block is appended to the stage-1 loop), so the pull follows each of the
generator's moves, RL ones included. With ``distill=false`` every iteration is an RL update and
nothing else is trained (the reward-hacking baseline). Stage 1's TTUR does not apply in stage 2:
the RL:DM pattern decides when the generator moves.

RL update (spec 2.3, 2.4): the generator rolls out from noise (no grad) through the student steps;
at each RL transition (t -> t_next) it draws K LCM candidates ``alpha' x0 + sigma' eps_i`` from the
same state, the reward model scores them at t_next, the highest and lowest form a win/lose pair
(kept when softmax(s_w, s_l) differs by more than ``threshold``), and the chain continues from a
uniformly drawn candidate. The loss is LPO's (ratio-clipped, beta-scaled log-sigmoid of the
log-likelihood-ratio gap, per-element mean Gaussian log-density) against the frozen reference,
whose x0 prediction is cached at sampling time (spec 6 #18).

Normalisation and empty updates: the loss is the sum over kept pairs on all ranks divided by the
GLOBAL kept count (each rank scales its sum by world_size / N, since the engines average
gradients over ranks), so a rank with few pairs weighs each of them as much as any other rank.
When no rank kept a pair, nothing is back-propagated and the generator's optimizer does not step:
AdamW's momentum and weight decay would move the generator without any signal, and the update
would be counted. The iteration reports ``rl_no_pairs = 1`` instead of ``generator_lr``.
The logged ``rl_kept``, ``rl_reward`` and ``rl_reward_gap`` are global as well: means over every
rank's pairs and candidates, weighted by each rank's count, from the same one all-reduce.

The frozen network ``"reference"`` must be registered in the engine by the caller
(``reference_copy``): the generator's weights at the start of stage 2 (the stage-1 result),
in the dtype the engine runs the generator's forward in, so that at step 0 the log-ratio of
every pair is exactly 0 (an fp32 reference beside a bf16 policy would give precision noise times
beta = 500). It is frozen and never checkpointed, so a resumed stage-2 run rebuilds it from
``stage2.init_from``, not from the current generator.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashdmd.algo.batch import Batch
from flashdmd.algo.rng import noise_generator
from flashdmd.algo.stage1 import Stage1, prefixed
from flashdmd.config import Config
from flashdmd.diffusion.rollout import predict_x0, randn, renoise, timesteps_tensor
from flashdmd.engine.base import Engine
from flashdmd.losses import gaussian_logprob_mean, lpo_loss
from flashdmd.nets.interfaces import Conditioning, repeat_cond, take_cond
from flashdmd.nets.parts import Parts


def reference_copy(generator: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The frozen reference policy (spec 2.4): a copy of the generator in the policy's compute
    dtype (``Engine.compute_dtype``; None keeps the generator's own dtype)."""
    reference = copy.deepcopy(generator).requires_grad_(False)
    return reference if dtype is None else reference.to(dtype)


@dataclass
class Transition:
    """One RL transition of the rollout, for all n prompts of the RL batch (spec 2.3)."""

    state: Tensor  # z_t, the input both policies are evaluated at
    t: int
    t_next: int
    win: Tensor  # highest-scored candidate z_{t_next}^w
    lose: Tensor  # lowest-scored candidate z_{t_next}^l
    x0_ref: Tensor  # the reference's x0 at z_t, cached at sampling time (spec 6 #18)
    keep: Tensor  # (n,) 1.0 where softmax(s_w, s_l) differs by more than the threshold


@dataclass
class Rollout:
    transitions: list[Transition]
    scores: Tensor  # (n * transitions, K) reward scores of every candidate


class Stage2:
    def __init__(self, cfg: Config, parts: Parts, engine: Engine, seed: int, stage1: Stage1) -> None:
        self.cfg, self.s2, self.parts, self.engine, self.seed, self.stage1 = cfg, cfg.stage2, parts, engine, seed, stage1
        self.schedule = parts.schedule
        self.steps = list(cfg.stage1.student_timesteps)
        for name in ("reference", "reward"):
            if name not in engine:
                raise ValueError(f"stage 2 needs a frozen {name!r} network registered in the engine "
                                 f"(reference: the generator's weights from stage2.init_from; reward: the "
                                 f"family's reward model, model.reward_model)")
        self.rl_from = {self.steps.index(t) for t, _ in cfg.stage2.rl_transitions}  # source step indices

    def is_rl_iteration(self, step: int) -> bool:
        """Fixed 5:1-style pattern from the step alone: identical on all ranks."""
        if not self.s2.distill:
            return True
        return step % (self.s2.rl_per_dm + 1) != self.s2.rl_per_dm

    def step(self, step: int, batch: Batch) -> dict[str, float]:
        if not self.s2.distill:
            return self.rl_update(step, batch)
        if not self.is_rl_iteration(step):
            return self.stage1.iteration(step, batch, update_generator=True)  # pulls the fake score itself
        rl = self.rl_update(step, batch)
        self.stage1.pull_fake_score()
        return {**rl, **self.stage1.iteration(step, batch, update_generator=False)}

    # -- RL ---------------------------------------------------------------------------------------
    def rl_update(self, step: int, batch: Batch) -> dict[str, float]:
        n = self.s2.rl_batch_size or batch.size
        smallest = min(batch.shares or (batch.size,))  # every rank refuses alike on an uneven split (spec 1.9)
        if self.s2.rl_batch_size > smallest:
            raise ValueError(f"stage2.rl_batch_size={n} exceeds the batch of {smallest} prompts on the smallest rank")
        cond = take_cond(batch.cond, slice(0, n))
        gen = noise_generator(self.seed, step, self.engine.rank, self.engine.device, "stage2")
        rollout = self.sample_pairs(n, cond, gen)
        world, scores = self.engine.world_size, rollout.scores
        # one all-reduce of sums and counts: the kept count decides the update on every rank, and the
        # logged rates and rewards are means over every rank's pairs and candidates, weighted by
        # how many each rank holds (an uneven split of the global batch, spec 1.9), not per rank
        local = torch.stack([torch.stack([tr.keep.sum() for tr in rollout.transitions]).sum().float(),
                             scores.sum(), scores.amax(1).sub(scores.amin(1)).sum(),
                             scores.new_tensor(float(scores.numel())), scores.new_tensor(float(scores.shape[0]))])
        kept, reward_sum, gap_sum, candidates, pairs = (self.engine.all_reduce_mean(local) * world).tolist()
        global_kept, candidates, pairs = round(kept), round(candidates), round(pairs)  # counts: mean * W is inexact
        stats = {"rl_kept": global_kept / pairs, "rl_reward": reward_sum / candidates, "rl_reward_gap": gap_sum / pairs}
        if global_kept == 0:  # the same decision on every rank: no backward, no step
            return {"loss_rl": 0.0, "rl_no_pairs": 1.0, **stats}
        G = self.engine["generator"]
        losses = []
        for tr in rollout.transitions:  # every rank runs every forward: one backward, same collectives
            x0 = predict_x0(G, self.schedule, tr.state, tr.t, cond)  # with grad: the policy's mean
            a, s = self.schedule.alpha_sigma(timesteps_tensor(tr.t_next, n, x0.device), x0)
            logp = [gaussian_logprob_mean(z, a * mean, s) for z in (tr.win, tr.lose) for mean in (x0, tr.x0_ref)]
            losses.append((lpo_loss(*logp, beta=self.s2.beta, ratio_clip=self.s2.ratio_clip) * tr.keep).sum())
        loss = torch.stack(losses).sum() * (world / global_kept)
        self.engine.backward("generator", loss)
        stats["loss_rl"] = float(loss.detach()) / world  # this rank's share of the global mean
        return {**stats, **prefixed("generator", self.engine.step("generator"))}

    @torch.no_grad()
    def sample_pairs(self, n: int, cond: Conditioning, gen: torch.Generator) -> Rollout:
        """Roll out to the last RL transition, forming one win/lose pair per prompt and transition (spec 2.3)."""
        G, ref, reward = self.engine["generator"], self.engine["reference"], self.engine["reward"]
        K = self.s2.num_candidates
        x = randn((n, *self.parts.latent_shape), gen, device=self.engine.device)
        transitions, all_scores = [], []
        for j in range(max(self.rl_from) + 1):
            t, t_next = self.steps[j], self.steps[j + 1]
            x0 = predict_x0(G, self.schedule, x, t, cond)
            if j not in self.rl_from:
                x = renoise(self.schedule, x0, t_next, gen)
                continue
            a, s = self.schedule.alpha_sigma(timesteps_tensor(t_next, n, x.device), x0)
            eps = randn((n, K, *self.parts.latent_shape), gen, like=x0)
            cands = a.unsqueeze(1) * x0.unsqueeze(1) + s.unsqueeze(1) * eps  # (n, K, ...)
            scores = reward(cands.flatten(0, 1), timesteps_tensor(t_next, n * K, x.device),
                            repeat_cond(cond, K)).view(n, K).float()
            rows = torch.arange(n, device=x.device)
            i_w, i_l = scores.argmax(1), scores.argmin(1)
            p = torch.softmax(torch.stack([scores[rows, i_w], scores[rows, i_l]], dim=1), dim=1)
            keep = ((p[:, 0] - p[:, 1]) > self.s2.threshold).to(x0.dtype)
            transitions.append(Transition(x, t, t_next, cands[rows, i_w], cands[rows, i_l],
                                          predict_x0(ref, self.schedule, x, t, cond), keep))
            all_scores.append(scores)
            pick = torch.randint(K, (n,), generator=gen, device=gen.device).to(x.device)
            x = cands[rows, pick]
        return Rollout(transitions, torch.cat(all_scores))
