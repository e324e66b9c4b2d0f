"""The gmm2d preset's teacher and 4-step distillation on the benchmark's three mixtures (bench/gmm_distill.py).

Each geometry pretrains the preset's MLP teacher and trains the preset's stage 1 once (module
fixture, about a minute on an idle core), read against its own 50-step teacher on the same
low-discrepancy points. What holds is asserted; what does not is a strict expected failure with
the measured figures, so that a change that makes it pass shows. Measured (teacher, and the same
sampler on the exact denoiser / undistilled / student SW2; share of teacher samples within 3 std of
a mean): ring8 0.069, 0.040 / 0.270 / 0.167 (2.41x); 0.948, sharp5 0.552, 0.559 / 1.024 / 0.793
(1.44x); 0.975, wide12 0.117, 0.064 / 0.277 / 0.186 (1.59x); 0.940. The benchmark's figures over
seeds: bench/results/gmm_distill.md.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from bench.gmm_distill import GEOMETRIES, evaluate_student, make_eval_set, run_stage1, score, trainable_copy
from flashdmd.config import load_config
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.nets.gmm2d import ExactGMMDenoiser, build_gmm_parts

pytestmark = pytest.mark.slow
NUM_POINTS = 4096
# (test, geometry) -> why it fails, measured with the preset at seed 0 on NUM_POINTS points
EXPECTED_FAILURES: dict[tuple[str, str], str] = {
    ("teacher", "ring8"): "ring8: teacher SW2 0.069 vs 0.040 for the exact denoiser's 50-step sampler (1.73x)",
    ("within_2x", "ring8"): "ring8: student SW2 0.167 vs teacher 0.069 (2.41x; undistilled 0.270): too broad modes",
    ("teacher", "wide12"): "wide12: teacher SW2 0.117 vs 0.064 for the exact denoiser's 50-step sampler (1.84x)",
}


def measure(name: str, cache: str) -> dict:
    """Teacher, exact-denoiser sampler, undistilled and distilled student of one geometry."""
    torch.set_num_threads(1)  # tiny MLPs: extra threads only contend
    cfg = load_config("gmm2d", GEOMETRIES[name])
    parts = build_gmm_parts(cfg, Path(cache))
    gmm = parts.extras["gmm"]
    ev = make_eval_set(gmm, NUM_POINTS)
    samples = sample_teacher(parts.teacher, parts.schedule, ev.z, 50, {}, {})
    teacher = score(samples, parts, ev)
    exact = score(sample_teacher(ExactGMMDenoiser(gmm, parts.schedule), parts.schedule, ev.z, 50, {}, {}), parts, ev)
    near = (torch.cdist(samples, gmm.means).min(dim=1).values < 3 * gmm.std).float().mean().item()
    run = trainable_copy(parts, cfg)
    curve = run_stage1(cfg, run, ev, eval_every=cfg.stage1.iterations)
    final = evaluate_student(run.generator, run, cfg, ev)
    print(f"{name}: teacher SW2 {teacher['sw2']:.3f} (exact denoiser, same sampler: {exact['sw2']:.3f}), "
          f"{near:.3f} of its samples within 3 std of a mean; undistilled {curve[0]['sw2']:.3f}, "
          f"student {final['sw2']:.3f} ({final['sw2'] / teacher['sw2']:.2f}x), modes {final['modes_covered']}", flush=True)
    return {"name": name, "teacher": teacher, "exact": exact, "near": near, "start": curve[0], "final": final,
            "modes": gmm.num_modes}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    """Every geometry at once, one single-threaded process each on two workers: the geometries are
    independent and the suite runs one test at a time on a 2-core machine."""
    cache = str(tmp_path_factory.getbasetemp() / "gmm2d-teacher")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(GEOMETRIES, pool.map(measure, GEOMETRIES, [cache] * len(GEOMETRIES))))


@pytest.fixture(params=list(GEOMETRIES))
def distilled(request, measured) -> dict:
    return measured[request.param]


def expect(request: pytest.FixtureRequest, test: str, geometry: str) -> None:
    if (test, geometry) in EXPECTED_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=EXPECTED_FAILURES[test, geometry]))


def test_teacher_samples_sit_at_the_modes(request, distilled):
    """Nine in ten of the pretrained teacher's 50-step samples within 3 std of a mean (98.9 % for
    the truth), however narrow the configured modes."""
    expect(request, "at_modes", distilled["name"])
    assert distilled["near"] >= 0.9


def test_teacher_within_1_5x_of_the_exact_denoisers_sampler(request, distilled):
    """The teacher's SW2 within 1.5x of the same 50-step sampler run on the mixture's exact
    denoiser (that sampler's floor: SD's schedule, 50 steps, a start at N(0, I))."""
    expect(request, "teacher", distilled["name"])
    assert distilled["teacher"]["sw2"] <= 1.5 * distilled["exact"]["sw2"]


def test_student_keeps_every_mode(request, distilled):
    expect(request, "modes", distilled["name"])
    assert distilled["final"]["modes_covered"] == distilled["modes"]


def test_distillation_improves_the_undistilled_student(request, distilled):
    """At least 10 % below the undistilled 4-step SW2."""
    expect(request, "improves", distilled["name"])
    assert distilled["final"]["sw2"] <= 0.9 * distilled["start"]["sw2"]


def test_student_within_2x_of_the_50_step_teacher(request, distilled):
    expect(request, "within_2x", distilled["name"])
    assert distilled["final"]["sw2"] <= 2.0 * distilled["teacher"]["sw2"]
