"""Configs a new user writes: the bad ones seen in the wild are refused naming the key and the fix,
the good ones (the README's own override syntax included) are accepted."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from flashdmd.config import Config, ConfigError, apply_override, load_config
from flashdmd.config.apps import Metric
from flashdmd.config.model import FAMILIES, STEP_RANGE, Family
from flashdmd.eval.metrics import REGISTRY
from flashdmd.nets.families import FAMILIES as NET_FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def refused(preset: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset, list(overrides))
    return str(err.value)


@pytest.mark.parametrize("override", ["stage1.generator_lr=nan", "stage1.fake_lr=inf", "stage1.disc_lr=-inf",
                                      "stage2.rl_lr=.nan", "health.dm_grad_norm_max=inf", "health.diversity_min=nan",
                                      "eval.poll_s=1e400"])
def test_nan_and_inf_are_refused(override: str):
    key = override.split("=")[0]
    assert f"{key} must be a finite number" in refused("tiny-sdxl", override)


def test_a_long_run_name_is_refused():
    assert "name must have at most 128 characters" in refused("tiny-sdxl", "name=" + "x" * 5000)
    assert "tracking.run_name must have at most 250 characters" in refused("tiny-sdxl", "tracking.run_name=" + "x" * 300)


def test_family_is_a_closed_set_matching_the_registry():
    msg = refused("tiny-sdxl", "model.family=sdxll")
    assert "model.family: expected one of" in msg and "'sdxl'" in msg
    assert set(Family.__args__) == set(FAMILIES) == {*NET_FAMILIES, "gmm2d"}
    for name, family in NET_FAMILIES.items():  # the config's schedule table agrees with the networks layer
        assert family.schedule().kind == FAMILIES[name][0] and len(family.text_folders) == FAMILIES[name][1]
        assert set(family.student_timesteps) <= set(range(STEP_RANGE[FAMILIES[name][0]][0],
                                                          STEP_RANGE[FAMILIES[name][0]][1] + 1))


def test_student_steps_follow_the_family_schedule():
    vp = refused("tiny-sdxl", "stage1.student_timesteps=[1000,749,499,249]", "stage2.rl_transitions=[[1000,749]]",
                 "stage1.dm_steps=[1000,749,499]")
    assert "stage1.student_timesteps must lie in [0, 999] for model.family=tiny-sdxl" in vp
    flow = refused("tiny-sd3", "stage1.student_timesteps=[999,0]", "stage1.dm_steps=[999]", "stage1.gan_steps=[0]",
                   "stage2.rl_transitions=[[999,0]]")
    assert "must lie in [1, 1000] for model.family=tiny-sd3" in flow
    assert load_config("tiny-sd3").stage1.student_timesteps[0] == 1000  # the flow schedule's t = 1000 sigma


def test_every_step_gets_exactly_the_losses_its_mode_implies():
    assert "gives no student step the DM loss" in refused("tiny-sdxl", "stage1.dm_steps=[]",
                                                          "stage1.gan_steps=[999,749,499,249]")
    assert "must cover every student step" in refused("tiny-sdxl", "stage1.dm_steps=[999]", "stage1.gan_steps=[249]")
    assert "must be disjoint in flash mode" in refused("tiny-sdxl", "stage1.dm_steps=[999,749,499,249]")
    one_list = load_config("tiny-sdxl", ["stage1.dm_steps=[]", "stage1.gan_steps=[249]"])
    assert one_list.stage1.gan_steps == [249]  # the DM steps are the complement


def test_stage2_transitions_must_not_be_empty():
    assert "stage2.rl_transitions must not be empty" in refused("tiny-sdxl", "stage2.rl_transitions=[]")
    assert "must be pairs [t, t_next]" in refused("tiny-sdxl", "stage2.rl_transitions=[[999]]")


def test_lora_needs_target_modules_and_a_positive_alpha():
    assert "model.lora.target_modules must not be empty" in refused("tiny-sd3", "model.lora.target_modules=[]")
    assert "model.lora.alpha must be > 0" in refused("tiny-sd3", "model.lora.alpha=-4")
    assert "model.lora.target_modules[0] must not be empty" in refused("tiny-sd3", "model.lora.target_modules=['']")


def test_metric_names_are_a_closed_set_matching_the_registry():
    msg = refused("tiny-sdxl", "eval.metrics=[clip_score,fidd]")
    assert "eval.metrics[1]: expected one of" in msg
    assert set(Metric.__args__) == set(REGISTRY)
    assert "eval.weights (a key): expected one of" in refused("tiny-sdxl", "eval.weights.clip_scor=/w")


@pytest.mark.parametrize("overrides,fragment", [
    (["engine.teacher_sharding=zero3"], "engine.teacher_sharding must be replicate with engine.kind=local"),
    (["engine.offload_params=true"], "needs engine.kind deepspeed or fsdp"),
    (["launch.executor=local", "launch.nodes=4"], "launch.nodes > 1 needs launch.executor=slurm"),
    (["launch.executor=local", "launch.qos=high"], "launch.qos is only read by launch.executor=slurm"),
    (["model.use_t5=true"], "model.use_t5 applies to SD3 only"),
    (["data.latent_shape=[4,8,8]"], "set data.latent_shards=true"),
    (["health.monitors=false", "health.latent_drift_max=2"], "health.latent_drift_max is only read with health.monitors=true"),
    (["eval.weights.fid=/w"], "eval.weights.fid is only read when eval.metrics lists that metric"),
])
def test_options_the_choice_ignores_name_the_option_that_makes_them_meaningful(overrides: list[str], fragment: str):
    assert fragment in refused("tiny-sdxl", *overrides)


def test_options_the_toy_ignores():
    assert "data.shards is not read by model.family=gmm2d" in refused("gmm2d", "data.shards=/d/x.tar")
    assert "model.sam is not read by model.family=gmm2d" in refused("gmm2d", "model.sam=facebook/sam-vit-base")
    assert "model.gmm is only read by model.family=gmm2d" in refused("tiny-sdxl", "model.gmm.num_modes=3")


def test_a_key_in_the_wrong_section_points_at_its_section():
    msg = refused("tiny-sdxl", "stage1.batch_size=4")
    assert "unknown config key 'stage1.batch_size'; 'batch_size' is in 'data'" in msg
    assert "did you mean 'data.batch_size'?" in msg
    assert "did you mean 'stage1.ttur'" in refused("tiny-sdxl", "stage1.tturr=2")  # a typo still gets the closest key
    assert "'ttur' is in 'stage1'" in refused("tiny-sdxl", "ttur=2")


def test_mapping_valued_keys_take_one_entry_per_override():
    cfg = load_config("tiny-sdxl", ["eval.weights.clip_score=/weights/clip", "eval.metrics=[clip_score,fid]",
                                    "eval.weights.fid=org/fid", "tracking.tags.team=vision", "tracking.tags.site=a=b"])
    assert cfg.eval.weights == {"clip_score": "/weights/clip", "fid": "org/fid"}
    assert cfg.tracking.tags == {"team": "vision", "site": "a=b"}
    assert "is a mapping; set one entry" in refused("tiny-sdxl", "tracking.tags.a.b=1")


def test_every_override_in_the_readme_parses():
    """Each `section.key=value` of README.md, placeholders filled in, is accepted by the override parser."""
    examples = set(re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9<>]+)+=[^`]*)`", (ROOT / "README.md").read_text()))
    examples |= set(re.findall(r"\s([a-z_0-9]+(?:\.[a-z_0-9]+)+=\S+)", (ROOT / "README.md").read_text()))
    examples -= {"section.key=value", "stage1.tturr=2"}  # the syntax itself, and the README's typo demonstration
    assert any(e.startswith("eval.weights.<metric>") for e in examples)
    for example in examples:
        filled = example.replace("<metric>", "clip_score").replace("[...]", "[a photo]").strip("'")
        filled = re.sub(r"<[^>]*>", "/some/path", filled)
        apply_override(Config(), filled)


def test_a_sibling_base_and_a_one_override_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "team.yaml").write_text("base: sdxl-4step\ntracking:\n  experiment: team\n")
    (tmp_path / "mine.yaml").write_text("base: ./team.yaml\nstage1:\n  iterations: 50\n")
    monkeypatch.chdir(ROOT)
    cfg = load_config(str(tmp_path / "mine.yaml"))
    assert (cfg.tracking.experiment, cfg.stage1.iterations, cfg.model.family) == ("team", 50, "sdxl")
