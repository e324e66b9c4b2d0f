"""Benchmark: the trainer's stage-1 step path against a hand-written loop doing the same math
(goal: ratio <= 1.05).

Trainer path: ``flashdmd.train.main.Trainer`` set up from the tiny-sdxl preset (local engine), then
per iteration what its loop does besides fetching data: ``Stage1.step`` through the engine,
the run metrics, the (null) tracker and the preemption agreement. Reference: one function below,
written straight against torch (the same networks copied before the first step, torch AdamW,
``clip_grad_norm_``, ``lerp_`` for the EMA pull) with the same random draws in the same order.
Both get the same fixed batch (data throughput is bench/data_throughput.py). They alternate
iteration by iteration in one process; the ratio is the median of per-iteration ratios. After
the run the two generators must hold the same weights, which checks the math is identical.

    python bench/step_overhead.py [--iters 40] [--warmup 3] [--batch 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from _common import fixed_batch, interleaved, paired_ratio, summary, tiny_config, write_result
from torch import Tensor, nn

GOAL = 1.05


class HandLoop:
    """Flash-DMD stage 1 (flash mode, ttur 1) in plain torch: spec 1.4-1.10 without the engine."""

    def __init__(self, cfg: Any, parts: Any, seed: int, device: torch.device) -> None:
        from flashdmd.algo.split import split_steps

        self.cfg, self.parts, self.seed, self.device = cfg, parts, seed, device
        self.sch = parts.schedule
        self.G = copy.deepcopy(parts.generator)
        self.F = copy.deepcopy(parts.fake_score)
        self.D = copy.deepcopy(parts.discriminator)
        self.T, self.V = parts.teacher, parts.decoder
        self.steps = list(cfg.student_timesteps)
        self.dm_steps, self.gan_steps = split_steps(cfg, self.sch)
        betas = (cfg.adam_betas[0], cfg.adam_betas[1])

        def adamw(net: nn.Module, lr: float) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=betas,
                                     weight_decay=cfg.weight_decay)

        self.opt = {"G": adamw(self.G, cfg.generator_lr), "F": adamw(self.F, cfg.fake_lr),
                    "D": adamw(self.D, cfg.disc_lr)}
        self.heads = [p for p in self.D.parameters() if p.requires_grad]

    def _update(self, name: str, loss: Tensor) -> None:
        loss.backward()
        opt = self.opt[name]
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def __call__(self, step: int, batch: Any) -> None:
        from flashdmd.algo.rng import control_rng, noise_generator
        from flashdmd.diffusion.rollout import backward_simulate, continue_from, predict_x0, randn, renoise
        from flashdmd.diffusion.sampler import cfg_predict
        from flashdmd.losses import d_loss, denoising_loss, dmd_loss, g_loss

        cfg, sch, cond = self.cfg, self.sch, batch.cond
        rng = control_rng(self.seed, step, "stage1")
        k = self.steps.index(rng.choice(self.dm_steps))
        j = self.steps.index(rng.choice(self.gan_steps))
        gen = noise_generator(self.seed, step, 0, self.device, "stage1")
        # generator: DM branch at tau_k, DMD loss against the real and fake scores
        for p in self.heads:
            p.requires_grad_(False)
        z = randn((batch.size, *self.parts.latent_shape), gen, device=self.device)
        x0 = predict_x0(self.G, sch, backward_simulate(self.G, sch, z, self.steps, k, cond, gen), self.steps[k], cond)
        t = sch.sample_t(batch.size, cfg.dmd_noise_min, cfg.dmd_noise_max, gen, device=x0.device)
        with torch.no_grad():
            x_t = sch.add_noise(x0.detach(), randn(x0.shape, gen, like=x0), t)
            fake = cfg_predict(self.F, x_t, t, cond, batch.uncond, cfg.fake_guidance_scale)
            real = cfg_predict(self.T, x_t, t, cond, batch.uncond, cfg.real_guidance_scale)
            x0_fake = sch.to_x0(fake.double(), x_t.double(), t)
            x0_real = sch.to_x0(real.double(), x_t.double(), t)
        loss = cfg.dm_weight * dmd_loss(x0, x0_real, x0_fake)
        # generator: GAN branch at t_hat from the rollout to the clean sample
        x0_src = continue_from(self.G, sch, x0.detach(), self.steps, k, len(self.steps), cond, gen)
        x_hat = renoise(sch, x0_src, self.steps[j], gen)
        images = self.V(predict_x0(self.G, sch, x_hat, self.steps[j], cond))
        loss = loss + cfg.gan_weight * g_loss(cfg.gan_loss, self.D(images))
        self._update("G", loss)
        for p in self.heads:
            p.requires_grad_(True)
        with torch.no_grad():  # Eq. 11: the fake score follows the generator
            for p, q in zip(self.F.parameters(), self.G.parameters()):
                p.lerp_(q, 1.0 - cfg.fake_ema_decay)
        # fake score: denoising loss on the DM outputs
        x0 = x0.detach()
        t = sch.sample_t(batch.size, 0.0, 1.0, gen, device=x0.device)
        noise = randn(x0.shape, gen, like=x0)
        self._update("F", denoising_loss(self.F(sch.add_noise(x0, noise, t), t, cond), sch.target(x0, noise, t)))
        # discriminator heads: real pixels vs the decoded GAN-branch outputs
        self._update("D", d_loss(cfg.gan_loss, self.D(batch.real), self.D(images.detach())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    from flashdmd.infra.distributed import init_distributed, shutdown
    from flashdmd.train.preemption import Preemption
    from flashdmd.infra.tracking import NullTracker
    from flashdmd.train.main import Trainer

    cfg = tiny_config(["engine.kind=local", "stage1.mode=flash", "stage1.ttur=1", f"data.batch_size={args.batch}"])
    ctx = init_distributed(cfg)
    try:
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, "stage1", ctx)
        trainer._setup()
        hand = HandLoop(cfg.stage1, trainer.parts, cfg.seed, ctx.device)
        batch = fixed_batch(trainer.parts, args.batch, cfg.data.resolution, ctx.device)
        tracker, preemption = NullTracker(), Preemption(cfg, ctx)

        def trainer_step(step: int) -> None:
            import time

            started = time.perf_counter()
            metrics = trainer.algo.step(step, batch)
            tracker.log_metrics(trainer._run_metrics(metrics, time.perf_counter() - started, batch.size, {}), step + 1)
            preemption.should_stop(step + 1)

        times = interleaved({"trainer": trainer_step, "hand": lambda step: hand(step, batch)},
                            args.iters, args.warmup, ctx.device)
        diff = max((a - b).abs().max().item() for a, b in zip(trainer.parts.generator.parameters(),
                                                                hand.G.parameters()))
    finally:
        shutdown()
    ratio = paired_ratio(times["trainer"], times["hand"])
    spread = statistics.quantiles([a / b for a, b in zip(times["trainer"], times["hand"])], n=4)
    tr, hd = summary(times["trainer"]), summary(times["hand"])
    table = "\n".join([
        "| path | median s/it | mean s/it | min s/it |", "|---|---|---|---|",
        f"| trainer (Stage1 + LocalEngine + loop extras) | {tr['median_s']:.4f} | {tr['mean_s']:.4f} | {tr['min_s']:.4f} |",
        f"| hand-written loop | {hd['median_s']:.4f} | {hd['mean_s']:.4f} | {hd['min_s']:.4f} |",
        (f"\ntrainer / hand: median of paired ratios {ratio:.3f} (quartiles {spread[0]:.3f}..{spread[2]:.3f}); "
        f"goal <= {GOAL} -> {'met' if ratio <= GOAL else 'NOT met'}"),
        f"same math: max |generator weight difference| after {args.warmup + args.iters} iterations = {diff:.3g}",
    ])
    write_result("step_overhead", {
        "preset": "tiny-sdxl", "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
        "trainer": tr, "hand": hd, "ratio_median": ratio, "ratio_quartiles": [spread[0], spread[2]], "goal": GOAL,
        "goal_met": ratio <= GOAL, "max_weight_diff": diff, "times": times,
    }, table)


if __name__ == "__main__":
    main()
