"""Stage 2: joint preference RL with continuing distillation (spec 2.1-2.5).

Iterations alternate by a fixed pattern of period ``rl_per_dm + 1``: ``rl_per_dm`` RL iterations,
then one distillation iteration (a stage-1 generator update). The fake score, the discriminator
and the EMA pull keep running in every iteration (spec 2.5 scheduler). With ``distill=false``
every iteration is an RL update and nothing else is trained (the reward-hacking baseline).
Stage 1's TTUR does not apply in stage 2: the RL:DM pattern decides when the generator moves.

RL update (spec 2.3, 2.4): the generator rolls out from noise (no grad) through the student steps;
at each RL transition (t -> t_next) it draws K LCM candidates ``alpha' x0 + sigma' eps_i`` from the
same state, the reward model scores them at t_next, the highest and lowest form a win/lose pair
(kept when softmax(s_w, s_l) differs by more than ``threshold``), and the chain continues from a
uniformly drawn candidate. The loss is LPO's (ratio-clipped, beta-scaled log-sigmoid of the
log-likelihood-ratio gap, per-element mean Gaussian log-density) against the frozen reference,
whose x0 prediction is cached at sampling time.

The frozen network ``"reference"`` must be registered in the engine by the caller, holding the
generator's weights at the start of stage 2 (the stage-1 result, spec 6 #18). It is frozen and
never checkpointed, so a resumed stage-2 run rebuilds it from ``stage2.init_from``, not from the
current generator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashdmd.algo.batch import Batch
from flashdmd.algo.rng import noise_generator
from flashdmd.algo.stage1 import Stage1, _prefixed, stage1_optim_specs
from flashdmd.config import Config
from flashdmd.diffusion.rollout import predict_x0, randn, renoise, timesteps_tensor
from flashdmd.engine.base import Engine, OptimSpec
from flashdmd.losses import gaussian_logprob_mean, lpo_loss
from flashdmd.nets.interfaces import Conditioning, repeat_cond, take_cond
from flashdmd.nets.parts import Parts


def stage2_optim_specs(cfg: Config) -> dict[str, OptimSpec]:
    """Stage-2 optimisers: stage 1's, with the generator at ``rl_lr`` (0 -> stage-1 rate) for both its RL
    and distillation updates (they share one optimizer), and every schedule spanning stage-2 iterations."""
    specs = stage1_optim_specs(cfg.stage1)
    for spec in specs.values():
        spec.total_steps = cfg.stage2.iterations
    specs["generator"].lr = cfg.stage2.rl_lr or cfg.stage1.generator_lr
    return specs


class Stage2:
    def __init__(self, cfg: Config, parts: Parts, engine: Engine, seed: int, stage1: Stage1) -> None:
        self.cfg, self.s2, self.parts, self.engine, self.seed, self.stage1 = cfg, cfg.stage2, parts, engine, seed, stage1
        self.schedule = parts.schedule
        self.steps = list(cfg.stage1.student_timesteps)
        for name in ("reference", "reward"):
            try:
                engine[name]
            except KeyError:
                raise ValueError(f"stage 2 needs a frozen {name!r} network registered in the engine "
                                 f"(reference: the generator's weights from stage2.init_from; reward: the "
                                 f"family's reward model, model.reward_model)") from None
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
            return self.stage1.iteration(step, batch, update_generator=True)
        return {**self.rl_update(step, batch), **self.stage1.iteration(step, batch, update_generator=False)}

    # -- RL ---------------------------------------------------------------------------------------
    def rl_update(self, step: int, batch: Batch) -> dict[str, float]:
        n = self.s2.rl_batch_size or batch.size
        if n > batch.size:
            raise ValueError(f"stage2.rl_batch_size={n} exceeds the batch of {batch.size} prompts per rank")
        cond = take_cond(batch.cond, slice(0, n))
        gen = noise_generator(self.seed, step, self.engine.rank, self.engine.device, "stage2")
        pairs, scores = self._sample_pairs(n, cond, gen)
        G = self.engine["generator"]
        losses, kept = [], []
        for x, t, t_next, win, lose, x0_ref, keep in pairs:
            x0 = predict_x0(G, self.schedule, x, t, cond)  # with grad: the policy's mean
            a, s = self.schedule.alpha_sigma(timesteps_tensor(t_next, n, x.device), x)
            logp = [gaussian_logprob_mean(z, a * mean, s) for z in (win, lose) for mean in (x0, x0_ref)]
            losses.append(lpo_loss(*logp, beta=self.s2.beta, ratio_clip=self.s2.ratio_clip) * keep)
            kept.append(keep)
        num_kept = torch.stack(kept).sum()
        loss = torch.stack(losses).sum() / num_kept.clamp(min=1)  # always a graph through G (collectives)
        self.engine.backward("generator", loss)
        stats = _prefixed("generator", self.engine.step("generator"))
        values = torch.stack([loss.detach(), num_kept / num_kept.new_tensor(float(len(kept) * n)),
                              scores.mean(), scores.amax(1).sub(scores.amin(1)).mean()]).tolist()
        return {**dict(zip(("loss_rl", "rl_kept", "rl_reward", "rl_reward_gap"), values)), **stats}

    @torch.no_grad()
    def _sample_pairs(self, n: int, cond: Conditioning, gen: torch.Generator) -> tuple[list[tuple], Tensor]:
        """Roll out to the last RL transition, forming one (pair, mask) per transition (spec 2.3)."""
        G, ref, reward = self.engine["generator"], self.engine["reference"], self.engine["reward"]
        K = self.s2.num_candidates
        x = randn((n, *self.parts.latent_shape), gen, device=self.engine.device)
        pairs, all_scores = [], []
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
            pairs.append((x, t, t_next, cands[rows, i_w], cands[rows, i_l], predict_x0(ref, self.schedule, x, t, cond),
                          keep))
            all_scores.append(scores)
            pick = torch.randint(K, (n,), generator=gen, device=gen.device).to(x.device)
            x = cands[rows, pick]
        return pairs, torch.cat(all_scores)
