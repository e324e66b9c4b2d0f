"""Benchmark on the exact 2-D toy world: Flash-DMD vs the DMD2 baseline, joint RL vs RL-only.

Runs, for a fixed budget and fixed seeds, through the very same stage-1/stage-2 code that the
image families use (LocalEngine, gmm2d parts, the gmm2d preset), on each of ``GEOMETRIES``
(mixtures set through ``model.gmm.*``: mode count, radius, std, unequal weights):

1. the 50-step teacher sampler (the quality reference) and the undistilled 4-step student;
2. stage 1 on every geometry (``STAGE1_RUNS``): Flash-DMD with the current defaults
   (GAN branch on half the batch, rollout-state input), the full GAN branch of the paper
   (whole batch, rollout to zero), and the real DMD2 baseline (its classifier on the fake score,
   both losses on every step, no EMA pull, TTUR 5, softplus losses: DMD2's recipe); on the first
   geometry also the ablations (``ABLATIONS``): no EMA pull, no GAN step. The 4-step student is
   scored every ``--eval-every`` iterations and at the end;
3. stage 2 on the first geometry from each seed's Flash-DMD result: joint (5 RL : 1
   distillation), RL only (post-training LPO), and joint RL at every transition.
Writes bench/results/gmm_distill.json and .md (the table).

Metrics (flashdmd.eval.gmm) against a stratified truth set from low-discrepancy noise (the
measurement of flashdmd/train/gmm_quality.py: its floor, two truth sets, is ~0.005 at 4096
points where i.i.d. sets sit ~0.15 apart): sliced W2, modes covered, mean reward and the mass at
the rewarded mode. "Updates to threshold" counts generator updates until SW2 first drops below
2 / 1.5 times the teacher's on the same points.
The teacher is explicit (``--teacher``, default the preset's ``mlp``) and recorded in the JSON's
"config" and in the table's header; bench/results/gmm_distill.md is the preset (mlp) teacher.
Usage: ``python bench/gmm_distill.py [--quick] [--teacher mlp|exact] [--seeds 0 1 2] [--geometries ring8 ...]
[--runs NAME ...] [--ablations NAME ...] [--no-stage2] [key=value overrides]``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashdmd.algo.batch import Batch
from flashdmd.algo.optim import optim_specs
from flashdmd.algo.stage1 import Stage1
from flashdmd.algo.stage2 import Stage2, reference_copy
from flashdmd.config import Config, load_config
from flashdmd.diffusion.rollout import sample_student, timesteps_tensor
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.engine.local import LocalEngine
from flashdmd.eval.gmm import mode_mass, modes_covered, sliced_w2
from flashdmd.nets.dmd2_classifier import with_mode_discriminator
from flashdmd.nets.gmm2d import GMM, build_gmm_parts
from flashdmd.nets.parts import Parts
from flashdmd.train.gmm_quality import quasi_normal, stratified_truth

RESULTS = REPO / "bench" / "results" / "gmm_distill.json"
# DMD2's recipe (spec 4.1-4.2): its classifier on the fake score, both losses every step, TTUR 5,
# softplus GAN losses, no EMA pull
DMD2_OVERRIDES = ["stage1.mode=dmd2", "stage1.ttur=5", "stage1.fake_ema=false", "stage1.gan_loss=nonsaturating"]


@dataclass
class EvalSet:
    """Fixed noise, fixed true samples and fixed projections: every score uses the same draws."""

    z: torch.Tensor
    real: torch.Tensor
    seed: int


def make_eval_set(gmm: GMM, n: int, seed: int = 123) -> EvalSet:
    """Low-discrepancy noise and a stratified truth set (flashdmd/train/gmm_quality.py): i.i.d. sets
    of a few thousand points are ~0.1 apart in SW2 by mode-count noise alone, more than the gap
    between a distilled student and the teacher."""
    return EvalSet(quasi_normal(n, 2, seed), stratified_truth(gmm.means, gmm.weights, gmm.std, n, seed + 1), seed)


def score(x: torch.Tensor, parts: Parts, ev: EvalSet) -> dict[str, float]:
    gmm: GMM = parts.extras["gmm"]
    mass = mode_mass(x, gmm.means)
    reward = parts.reward(x, timesteps_tensor(0, len(x), x.device), {})
    return {
        "sw2": sliced_w2(x, ev.real, generator=torch.Generator().manual_seed(ev.seed)),
        "modes_covered": modes_covered(mass, gmm.weights),
        "reward": float(reward.mean()),
        "reward_mode_mass": float(mass[parts.extras["reward_mode"]]),
    }


def evaluate_student(generator: torch.nn.Module, parts: Parts, cfg: Config, ev: EvalSet) -> dict[str, float]:
    x = sample_student(generator, parts.schedule, ev.z, cfg.stage1.student_timesteps, {},
                       torch.Generator().manual_seed(ev.seed + 1))
    return score(x, parts, ev)


def make_engine(parts: Parts, cfg: Config, stage: int) -> LocalEngine:
    """Stage 2 adds the frozen reference: a copy of the generator as stage 2 starts."""
    frozen = parts.frozen()
    if stage == 2:
        frozen["reference"] = reference_copy(parts.generator, None)
    engine = LocalEngine()
    engine.setup(parts.trainable(), optim_specs(cfg, stage), frozen)
    return engine


def data_batch(parts: Parts, n: int, gen: torch.Generator) -> Batch:
    x, _ = parts.extras["gmm"].sample(n, gen)
    return Batch(cond={}, uncond={}, real=parts.decoder(x), size=n)


def run_stage1(cfg: Config, parts: Parts, ev: EvalSet, eval_every: int) -> list[dict[str, float]]:
    """Train stage 1 on ``parts`` in place; the curve of 4-step student scores."""
    engine = make_engine(parts, cfg, stage=1)
    stage1 = Stage1(cfg.stage1, parts, engine, cfg.seed)
    data = torch.Generator().manual_seed(cfg.seed + 17)
    curve = [{"iteration": 0, "generator_updates": 0, **evaluate_student(parts.generator, parts, cfg, ev)}]
    updates = 0
    for it in range(cfg.stage1.iterations):
        updates += it % cfg.stage1.ttur == 0
        stage1.step(it, data_batch(parts, cfg.data.batch_size, data))
        if (it + 1) % eval_every == 0:
            curve.append({"iteration": it + 1, "generator_updates": updates,
                          **evaluate_student(parts.generator, parts, cfg, ev)})
    return curve


def run_stage2(cfg: Config, parts: Parts, ev: EvalSet, eval_every: int) -> list[dict[str, float]]:
    """Stage 2 from the current weights of ``parts`` (the reference is their frozen copy)."""
    engine = make_engine(parts, cfg, stage=2)
    stage2 = Stage2(cfg, parts, engine, cfg.seed, Stage1(cfg.stage1, parts, engine, cfg.seed))
    data = torch.Generator().manual_seed(cfg.seed + 29)
    curve = [{"iteration": 0, **evaluate_student(parts.generator, parts, cfg, ev)}]
    for it in range(cfg.stage2.iterations):
        stage2.step(it, data_batch(parts, cfg.data.batch_size, data))
        if (it + 1) % eval_every == 0:
            curve.append({"iteration": it + 1, **evaluate_student(parts.generator, parts, cfg, ev)})
    return curve


def first_below(curve: list[dict[str, float]], threshold: float) -> int | None:
    """Generator updates at the first evaluation with SW2 <= threshold (None: never)."""
    for point in curve:
        if point["sw2"] <= threshold:
            return int(point["generator_updates"])
    return None


def trainable_copy(parts: Parts, cfg: Config) -> Parts:
    """Parts sharing the frozen networks, with independent copies of the trainable ones and the
    discriminator ``cfg.stage1.mode`` trains (DMD2's classifier head in dmd2 mode)."""
    copied = dataclasses.replace(parts, **{k: copy.deepcopy(getattr(parts, k))
                                           for k in ("generator", "fake_score", "discriminator")})
    return with_mode_discriminator(cfg, copied)


GEOMETRIES = {  # name -> model.gmm overrides (the preset's mixture first)
    "ring8": [],
    "sharp5": ["model.gmm.num_modes=5", "model.gmm.radius=3.0", "model.gmm.std=0.08", "model.gmm.weights=[4,2,1,1,1]"],
    "wide12": ["model.gmm.num_modes=12", "model.gmm.radius=6.0", "model.gmm.std=0.15",
               "model.gmm.weights=[1,2,3,1,2,3,1,2,3,1,2,3]"],
}
STAGE1_RUNS = {  # name -> overrides on top of the gmm2d preset, run on every geometry
    "flash": [],  # the defaults: gan_batch_fraction=0.5, gan_input=rollout_state
    "flash_full_branch": ["stage1.gan_batch_fraction=1.0", "stage1.gan_input=rollout_to_zero"],
    "dmd2": DMD2_OVERRIDES,
}
ABLATIONS = {  # run on the first geometry only
    "flash_no_ema": ["stage1.fake_ema=false"],
    "flash_no_gan": ["stage1.gan_weight=0.0"],
}
# joint: 5 RL : 1 distillation (spec 2.5); rl_only: RL after distillation with nothing else trained
# (post-training LPO); all_noise: joint, RL at every transition (spec 2.5: high noise only is better)
STAGE2_RUNS = {"joint": [], "rl_only": ["stage2.distill=false"],
               "all_noise": ["stage2.rl_transitions=[[999,749],[749,499],[499,249]]"]}
THRESHOLD_FACTORS = (2.0, 1.5)


def summarise(finals: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over seeds; modes covered as the minimum (the worst seed)."""
    out = {k: sum(f[k] for f in finals) / len(finals) for k in ("sw2", "reward", "reward_mode_mass")}
    out["sw2_max"] = max(f["sw2"] for f in finals)
    out["modes_covered_min"] = min(f["modes_covered"] for f in finals)
    return out


def run_geometry(name: str, base: list[str], args: argparse.Namespace, ablations: list[str], stage2: bool) -> dict:
    """Teacher, undistilled student, the stage-1 runs (and ablations, stage 2) on one mixture."""
    parts = build_gmm_parts(load_config("gmm2d", base), args.cache)
    gmm = parts.extras["gmm"]
    ev, final_ev = make_eval_set(gmm, args.eval_samples), make_eval_set(gmm, args.final_samples, seed=999)
    floor = sliced_w2(stratified_truth(gmm.means, gmm.weights, gmm.std, args.final_samples, 5), final_ev.real,
                      generator=torch.Generator().manual_seed(final_ev.seed))
    teacher = {n: score(sample_teacher(parts.teacher, parts.schedule, e.z, 50, {}, {}), parts, e)
               for n, e in (("curve", ev), ("final", final_ev))}
    # the same sampler from the true x_999 marginal instead of N(0, I): what is left of the
    # teacher's SW2 without the terminal-SNR gap of SD's schedule (alpha_999 = 0.068)
    true_start = parts.schedule.add_noise(stratified_truth(gmm.means, gmm.weights, gmm.std, args.final_samples, 7),
                                          final_ev.z, timesteps_tensor(999, args.final_samples, "cpu"))
    teacher["from_true_x999"] = score(sample_teacher(parts.teacher, parts.schedule, true_start, 50, {}, {}), parts,
                                      final_ev)
    undistilled = evaluate_student(parts.generator, parts, load_config("gmm2d", base), final_ev)
    thresholds = {str(f): f * teacher["curve"]["sw2"] for f in THRESHOLD_FACTORS}
    out: dict = {"overrides": base, "sw2_floor": floor, "teacher_50_step": teacher, "undistilled_4_step": undistilled,
                 "sw2_thresholds": thresholds, "stage1": {}, "stage2": {}}
    runs = {**{r: STAGE1_RUNS[r] for r in args.runs}, **{a: ABLATIONS[a] for a in ablations}}
    flash_parts = {}
    for run, extra in runs.items():
        per_seed = []
        for seed in args.seeds:
            cfg = load_config("gmm2d", base + extra + [f"seed={seed}"])
            run_parts = trainable_copy(parts, cfg)
            t0 = time.time()
            curve = run_stage1(cfg, run_parts, ev, args.eval_every)
            final = evaluate_student(run_parts.generator, run_parts, cfg, final_ev)
            per_seed.append({"seed": seed, "curve": curve, "final": final, "seconds": time.time() - t0,
                             "updates_to_threshold": {k: first_below(curve, v) for k, v in thresholds.items()}})
            if run == "flash":
                flash_parts[seed] = run_parts
            print(f"{name} {run} seed {seed}: SW2 {final['sw2']:.3f} (teacher {teacher['final']['sw2']:.3f}) "
                  f"{time.time() - t0:.0f} s", flush=True)
        out["stage1"][run] = {"overrides": extra, "runs": per_seed, "final": summarise([r["final"] for r in per_seed])}
    for run, extra in (STAGE2_RUNS.items() if stage2 else ()):
        per_seed = []
        for seed in args.seeds:
            cfg = load_config("gmm2d", base + extra + [f"seed={seed}"])
            run_parts = trainable_copy(flash_parts[seed], cfg)
            t0 = time.time()
            curve = run_stage2(cfg, run_parts, ev, args.eval_every)
            start = evaluate_student(flash_parts[seed].generator, run_parts, cfg, final_ev)
            final = evaluate_student(run_parts.generator, run_parts, cfg, final_ev)
            per_seed.append({"seed": seed, "curve": curve, "start": start, "final": final, "seconds": time.time() - t0,
                             "reward_gain": final["reward"] - start["reward"]})
            print(f"{name} stage 2 {run} seed {seed}: reward {final['reward']:.1f} {time.time() - t0:.0f} s", flush=True)
        out["stage2"][run] = {"overrides": extra, "runs": per_seed, "final": summarise([r["final"] for r in per_seed]),
                              "start": summarise([r["start"] for r in per_seed]),
                              "reward_gain": sum(r["reward_gain"] for r in per_seed) / len(per_seed)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every run (key=value)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    ap.add_argument("--teacher", default="mlp", choices=["mlp", "exact"], help="model.gmm.teacher of every run")
    ap.add_argument("--runs", nargs="*", default=list(STAGE1_RUNS), choices=list(STAGE1_RUNS),
                    help="stage-1 runs on every geometry (stage 2 needs flash)")
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                    help="ablations on the first geometry (none: --ablations with no names)")
    ap.add_argument("--stage2", action=argparse.BooleanOptionalAction, default=True,
                    help="stage 2 on the first geometry")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=4096, help="points per curve point (a power of two)")
    ap.add_argument("--final-samples", type=int, default=16384, help="points for the final scores")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "cache")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    args = ap.parse_args(argv)
    if args.stage2 and "flash" not in args.runs:
        ap.error("stage 2 starts from the flash run: add flash to --runs or pass --no-stage2")
    torch.set_num_threads(1)  # tiny MLPs: more threads only contend (20x slower on a loaded 2-core box)
    quick = ["stage1.iterations=10", "stage2.iterations=6"] if args.quick else []
    started = time.time()
    common = [f"model.gmm.teacher={args.teacher}"] + args.overrides + quick
    results: dict = {"config": common, "seeds": args.seeds, "final_samples": args.final_samples,
                     "geometries": {}}
    for i, name in enumerate(args.geometries):
        first = i == 0
        results["geometries"][name] = run_geometry(name, GEOMETRIES[name] + common, args,
                                                   ablations=args.ablations if first else [],
                                                   stage2=first and args.stage2)
    results["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    table = format_table(results)
    args.out.with_suffix(".md").write_text("```\n" + table + "\n```\n")
    print(table)
    return results


def _median(values: list[int | None]) -> str:
    """Median with 'never' counted as infinite."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    mid = ordered[len(ordered) // 2]
    return "never" if mid is None else str(mid)


def format_table(r: dict) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"gmm2d benchmark ({' '.join(r['config'])}), {len(r['seeds'])} seeds, {r['seconds']:.0f} s. "
        f"SW2 on {r['final_samples']} "
        "stratified points (mean, worst seed); generator updates to reach 2x / 1.5x the teacher's SW2 "
        "(median over seeds)")
    head = f"{'run':<24}{'upd->thr':>15}{'SW2':>7}{'worst':>7}{'modes':>6}{'reward':>9}{'mass@m0':>8}"
    for name, g in r["geometries"].items():
        t, u = g["teacher_50_step"]["final"], g["undistilled_4_step"]
        factors = list(g["sw2_thresholds"])
        mixture = [o for o in g["overrides"] if o not in r["config"]]
        add(f"\n{name}: {' '.join(mixture) or 'the preset mixture'}; floor (two truth sets) "
            f"{g['sw2_floor']:.3f}")
        add(head + "\n" + "-" * len(head))
        add(f"{'teacher 50-step':<24}{'':>15}{t['sw2']:>7.3f}{'':>7}{t['modes_covered']:>6}{t['reward']:>9.1f}"
            f"{t['reward_mode_mass']:>8.3f}")
        m = g["teacher_50_step"]["from_true_x999"]
        add(f"{'teacher, true x_999':<24}{'':>15}{m['sw2']:>7.3f}{'':>7}{m['modes_covered']:>6}{m['reward']:>9.1f}"
            f"{m['reward_mode_mass']:>8.3f}")
        add(f"{'4-step, no distill':<24}{'':>15}{u['sw2']:>7.3f}{'':>7}{u['modes_covered']:>6}{u['reward']:>9.1f}"
            f"{u['reward_mode_mass']:>8.3f}")
        for run_name, run in g["stage1"].items():
            f = run["final"]
            upd = " / ".join(_median([x["updates_to_threshold"][k] for x in run["runs"]]) for k in factors)
            add(f"{'s1 ' + run_name:<24}{upd:>15}{f['sw2']:>7.3f}{f['sw2_max']:>7.3f}{f['modes_covered_min']:>6}"
                f"{f['reward']:>9.1f}{f['reward_mode_mass']:>8.3f}")
        for run_name, run in g["stage2"].items():
            f = run["final"]
            add(f"{'s2 ' + run_name:<24}{'reward +' + format(run['reward_gain'], '.1f'):>15}{f['sw2']:>7.3f}"
                f"{f['sw2_max']:>7.3f}{f['modes_covered_min']:>6}{f['reward']:>9.1f}{f['reward_mode_mass']:>8.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
