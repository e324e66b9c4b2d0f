"""flashdmd.apps.sample: weights found in run dirs, hand-overs and checkpoints; per-seed images that
equal ``sample_student`` and do not depend on batching; the sample job's files."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flashdmd.train.checkpoint import step_dir
from flashdmd.diffusion.rollout import randn, sample_student
from flashdmd.apps.sample import cli, default_source, find_student, load_student, main

pytest.register_assert_rewrite("student_world")  # it is also loaded as a plugin below
from student_world import PROMPTS

pytest_plugins = ["student_world"]  # the session-wide trained_run fixture, built once for all three files


def test_find_student_in_run_dirs_hand_overs_and_checkpoints(trained_run, tmp_path):
    cfg, run_dir = trained_run
    run = find_student(run_dir)
    assert (run.kind, run.step, run.folder, run.student_timesteps) == ("handoff", 2, run_dir / "final", [999, 749, 499, 249])
    assert find_student(run_dir / "final") == run
    first = find_student(step_dir(cfg.checkpoint_dir, 1))
    assert (first.kind, first.step, first.run_dir, first.family) == ("checkpoint", 1, run_dir, "tiny-sdxl")
    assert run.run_id and first.run_id == run.run_id

    # without a hand-over, a run dir means its newest valid checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    assert find_student(copy).folder == copy / "checkpoints" / "step-00000002"
    with pytest.raises(FileNotFoundError, match="no trained generator"):
        find_student(tmp_path / "nothing")
    (copy / "checkpoints" / "step-00000002" / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_student(copy / "checkpoints" / "step-00000002")


def test_per_seed_images_match_sample_student_and_ignore_batching(trained_run):
    cfg, run_dir = trained_run
    student = load_student(cfg, run_dir)
    prompts, seeds = PROMPTS[:3], [5, 6, 7]
    batched = student.latents(prompts, seeds)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        g = torch.Generator().manual_seed(seed)
        z = randn((1, *student.latent_shape), g)
        alone = sample_student(student.generator, student.schedule, z, student.timesteps, student.text([prompt]), g)
        assert torch.allclose(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))
    assert not torch.allclose(batched[0], batched[1])  # seeds (and prompts) matter

    # the final checkpoint holds the hand-over's weights; step 1 holds others (loaded into the same networks)
    student.load(find_student(step_dir(cfg.checkpoint_dir, 1)), cfg)
    assert student.source.step == 1
    assert not torch.allclose(student.latents(prompts, seeds), batched)
    student.load(find_student(step_dir(cfg.checkpoint_dir, 2)), cfg)
    assert torch.equal(student.latents(prompts, seeds), batched)


def test_a_hand_over_of_another_family_is_refused(trained_run):
    from flashdmd.config import load_config

    cfg, run_dir = trained_run
    other = load_config("tiny-sd15", [f"run_root={cfg.run_root}", f"model.cache_dir={cfg.model.cache_dir}"])
    with pytest.raises(ValueError, match="holds a tiny-sdxl generator but model.family=tiny-sd15"):
        load_student(other, run_dir)


def test_sample_job_writes_grid_files_and_seeds(trained_run, tmp_path):
    cfg, run_dir = trained_run
    cfg = copy.deepcopy(cfg)
    cfg.sample.prompts = PROMPTS[:2]
    cfg.sample.images_per_prompt = 2
    cfg.sample.seed = 100
    cfg.sample.batch_size = 3
    cfg.sample.out_dir = str(tmp_path / "a")
    out = main(cfg, "sample")
    record = json.loads((out / "samples.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in record["images"]] == [
        (PROMPTS[0], 100), (PROMPTS[0], 101), (PROMPTS[1], 102), (PROMPTS[1], 103)]
    assert record["step"] == 2 and record["timesteps"] == [999, 749, 499, 249]
    files = [np.asarray(Image.open(out / r["file"])) for r in record["images"]]
    assert files[0].shape == (64, 64, 3)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2 x 2 images of 64 px, 2 px padding
    assert np.array_equal(grid[2:66, 68:132], files[1])

    # the same seeds through the CLI (prompts as arguments, another batch size): the same pixels
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[0]}\n{PROMPTS[1]}\n")
    code = cli(["--config", "tiny-sdxl", "--source", str(run_dir), "--prompts-file", str(prompts_file),
                "--out", str(tmp_path / "b"), f"run_root={cfg.run_root}", f"model.cache_dir={cfg.model.cache_dir}",
                "sample.images_per_prompt=2", "sample.seed=100", "sample.batch_size=1"])
    assert code == 0
    again = [np.asarray(Image.open(tmp_path / "b" / r["file"])) for r in record["images"]]
    assert all(np.array_equal(a, b) for a, b in zip(files, again))


def test_sample_prompts_precedence(tmp_path):
    from flashdmd.config import load_config
    from flashdmd.apps.sample import sample_prompts

    cfg = load_config("tiny-sdxl", ["tracking.sample_prompts=[a cat, a dog]"])
    assert sample_prompts(cfg) == ["a cat", "a dog"]  # nothing set: the training run's grid prompts
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    cfg.sample.prompts_file = str(tmp_path / "p.txt")
    assert sample_prompts(cfg) == ["one", "two", "three"]
    cfg.sample.prompts = ["explicit"]
    assert sample_prompts(cfg) == ["explicit"]


def test_jobs_under_default_names_find_the_training_run(trained_run, tmp_path):
    cfg, run_dir = trained_run
    cfg = copy.deepcopy(cfg)
    cfg.run_root, cfg.name = str(tmp_path), "tiny-sdxl-sample"  # what jobs/submit.py names a sample job
    with pytest.raises(FileNotFoundError, match="tiny-sdxl-stage1"):
        default_source(cfg, "sample")
    (tmp_path / "tiny-sdxl-stage1").symlink_to(run_dir)
    assert default_source(cfg, "sample") == tmp_path / "tiny-sdxl-stage1"
    (tmp_path / "tiny-sdxl-stage2").mkdir()  # stage 2 started but holds no student yet
    assert default_source(cfg, "sample") == tmp_path / "tiny-sdxl-stage1"
    cfg.name = "tiny-sdxl-watch"
    assert default_source(cfg, "watch", need_student=False) == tmp_path / "tiny-sdxl-stage2"
