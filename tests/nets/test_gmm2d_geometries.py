"""The gmm2d preset's 4-step distillation on the benchmark's three mixtures (bench/gmm_distill.py).

Each geometry pretrains the preset's MLP teacher and trains the preset's stage 1 once (module
fixture, ~20 s on an idle core), read against its own 50-step teacher on the same
low-discrepancy points. What holds is asserted; what does not is a strict expected failure with
the measured figures, so that a change that makes it pass shows. Measured (teacher / undistilled /
student SW2): ring8 0.097 / 0.242 / 0.205, sharp5 0.317 / 0.778 / 0.995 (a light mode lost),
wide12 0.317 / 0.387 / 0.354; the benchmark's figures over seeds: bench/results/gmm_distill_mlp.md.
"""
from __future__ import annotations

import pytest
import torch

from bench.gmm_distill import GEOMETRIES, evaluate_student, make_eval_set, run_stage1, score, trainable_copy
from flashdmd.config import load_config
from flashdmd.diffusion.sampler import sample_teacher
from flashdmd.nets.gmm2d import build_gmm_parts

pytestmark = pytest.mark.slow
NUM_POINTS = 4096
# (test, geometry) -> why it fails, measured with the preset at seed 0 on NUM_POINTS points
EXPECTED_FAILURES: dict[tuple[str, str], str] = {
    ("within_2x", "ring8"): "ring8: student SW2 0.205 vs teacher 0.097 (2.12x; undistilled 0.242)",
    ("modes", "sharp5"): "sharp5: the MLP teacher resolves std 0.08 modes poorly (SW2 0.317) and the student "
                         "drops a light mode (4 of 5)",
    ("improves", "sharp5"): "sharp5: stage 1 moves the student away from its start (SW2 0.778 -> 0.995)",
    ("within_2x", "sharp5"): "sharp5: student SW2 0.995 vs teacher 0.317 (3.14x)",
    ("improves", "wide12"): "wide12: the undistilled student is already 1.22x the teacher (0.387 vs 0.317); "
                            "stage 1 gains 8.5 % (-> 0.354, 1.12x), not 10 %",
}


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def distilled(request, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: extra threads only contend on a loaded machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    cfg = load_config("gmm2d", GEOMETRIES[request.param])
    parts = build_gmm_parts(cfg, tmp_path_factory.getbasetemp() / "gmm2d-teacher")
    ev = make_eval_set(parts.extras["gmm"], NUM_POINTS)
    teacher = score(sample_teacher(parts.teacher, parts.schedule, ev.z, 50, {}, {}), parts, ev)
    run = trainable_copy(parts, cfg)
    curve = run_stage1(cfg, run, ev, eval_every=cfg.stage1.iterations)
    final = evaluate_student(run.generator, run, cfg, ev)
    print(f"{request.param}: teacher SW2 {teacher['sw2']:.3f}, undistilled {curve[0]['sw2']:.3f}, "
          f"student {final['sw2']:.3f} ({final['sw2'] / teacher['sw2']:.2f}x), modes {final['modes_covered']}")
    return {"name": request.param, "teacher": teacher, "start": curve[0], "final": final,
            "modes": parts.extras["gmm"].num_modes}


def expect(request: pytest.FixtureRequest, test: str, geometry: str) -> None:
    if (test, geometry) in EXPECTED_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=EXPECTED_FAILURES[test, geometry]))


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
