"""The DM/GAN split of student steps (spec 1.3, 6 #11) and the seeds of control flow."""
from __future__ import annotations

import pytest

from flashdmd.algo.rng import control_rng, derive_seed, noise_generator
from flashdmd.algo.split import split_steps
from flashdmd.config import Stage1Config, load_config
from flashdmd.diffusion.schedules import FlowSchedule, VPSchedule

SDXL = VPSchedule("scaled_linear", 0.00085, 0.012, 1000, "epsilon")


def test_sdxl_4step_split_is_the_papers():
    cfg = load_config("sdxl-4step").stage1
    assert split_steps(cfg, SDXL) == ([999, 749, 499], [249])  # [FD-rev]: DM at 999/749/499, GAN at 249


def test_sdxl_8step_preset_split_is_the_documented_one():
    cfg = load_config("sdxl-8step").stage1
    assert split_steps(cfg, SDXL) == ([999, 874, 749, 624, 499], [374, 249, 124])  # spec 6 #11


def test_snr_rule_without_lists():
    cfg = load_config("sdxl-8step", ["stage1.dm_steps=[]", "stage1.gan_steps=[]"]).stage1
    # SNR(374) = 0.875 <= 1 -> DM; SNR(249) = 2.08 -> GAN
    assert split_steps(cfg, SDXL) == ([999, 874, 749, 624, 499, 374], [249, 124])
    sd3 = load_config("sd3-medium-4step", ["stage1.dm_steps=[]", "stage1.gan_steps=[]"]).stage1
    assert sd3.student_timesteps == [1000, 750, 500, 250]
    assert split_steps(sd3, FlowSchedule()) == ([1000, 750, 500], [250])  # sigma 0.5 has SNR exactly 1


def test_one_list_implies_the_other_and_dmd2_uses_every_step():
    cfg = load_config("sdxl-4step", ["stage1.gan_steps=[249]", "stage1.dm_steps=[]"]).stage1
    assert split_steps(cfg, SDXL) == ([999, 749, 499], [249])
    cfg = load_config("sdxl-4step", ["stage1.dm_steps=[999]", "stage1.gan_steps=[]"]).stage1
    assert split_steps(cfg, SDXL) == ([999], [749, 499, 249])
    cfg = load_config("sdxl-4step", ["stage1.mode=dmd2", "engine.kind=local", "engine.teacher_sharding=replicate"]).stage1
    assert split_steps(cfg, SDXL) == ([999, 749, 499, 249], [999, 749, 499, 249])


def test_no_dm_step_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="stage1.dm_steps"):  # the config refuses it at load
        load_config("sdxl-4step", ["stage1.gan_steps=[999, 749, 499, 249]", "stage1.dm_steps=[]"])
    cfg = Stage1Config(gan_steps=[999, 749, 499, 249])  # built in code: the split refuses it too
    with pytest.raises(ValueError, match="stage1.dm_steps"):
        split_steps(cfg, SDXL)


def test_control_rng_is_rank_independent_and_noise_is_rank_dependent():
    assert derive_seed(3, 7, "x") == derive_seed(3, 7, "x") != derive_seed(3, 8, "x")
    assert [control_rng(0, 5).random() for _ in range(2)] == [control_rng(0, 5).random()] * 2
    a = noise_generator(0, 5, rank=0).initial_seed()
    assert a == noise_generator(0, 5, rank=0).initial_seed() != noise_generator(0, 5, rank=1).initial_seed()
