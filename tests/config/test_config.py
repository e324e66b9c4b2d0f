"""Config tree: precedence, inheritance, round trip, and every validation rule."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flashdmd.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    _rules,
    from_yaml,
    load_config,
    to_yaml,
    validate,
)

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"sdxl-4step", "sdxl-8step", "sd15-4step", "sd3-medium-4step", "tiny-sdxl", "gmm2d"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_validates_and_round_trips(preset):
    cfg = load_config(preset)
    assert from_yaml(to_yaml(cfg)) == cfg


def test_override_precedence(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("stage1:\n  ttur: 2\n  iterations: 7\n")
    (tmp_path / "child.yaml").write_text("base: base\nstage1:\n  ttur: 3\n")
    cfg = load_config("child", ["stage1.ttur=4"], search_dir=tmp_path)
    assert cfg.stage1.ttur == 4  # override beats preset
    assert cfg.stage1.iterations == 7  # inherited from the base
    assert cfg.stage1.gan_weight == Config().stage1.gan_weight  # dataclass default
    assert load_config("child", search_dir=tmp_path).stage1.ttur == 3  # child beats base


def test_base_preset_inheritance_real_presets():
    cfg8, cfg4 = load_config("sdxl-8step"), load_config("sdxl-4step")
    assert cfg8.stage1.student_timesteps == [999, 874, 749, 624, 499, 374, 249, 124]
    assert cfg8.model.teacher == cfg4.model.teacher  # inherited


def test_base_cycle_is_an_error(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config("a", search_dir=tmp_path)


def test_override_type_coercion():
    cfg = load_config(
        "tiny-sdxl",
        [
            "stage1.fake_ema_decay=0.9",
            "stage1.fake_ema=false",
            "stage1.student_timesteps=[999,499]",
            "stage1.dm_steps=[999]",
            "stage1.gan_steps=[499]",
            "stage2.rl_transitions=[[999,499]]",
            "model.teacher=/some/path:with=equals",
            "stage1.generator_lr=1",
            "stage1.fake_lr=1e-4",
            "tracking.tags={team: vision}",
        ],
    )
    assert cfg.stage1.fake_ema_decay == 0.9 and cfg.stage1.fake_ema is False
    assert cfg.stage1.student_timesteps == [999, 499]
    assert cfg.model.teacher == "/some/path:with=equals"
    assert isinstance(cfg.stage1.generator_lr, float)
    assert cfg.stage1.fake_lr == 1e-4  # YAML reads "1e-4" as a string; floats accept it
    assert cfg.tracking.tags == {"team": "vision"}


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"stage1\.tturr.*did you mean 'stage1\.ttur'"):
        load_config("tiny-sdxl", ["stage1.tturr=2"])
    with pytest.raises(ConfigError, match=r"did you mean 'stage1'"):
        load_config("tiny-sdxl", ["stag1.ttur=2"])


def test_wrong_type_in_override_names_key_and_type():
    with pytest.raises(ConfigError, match=r"stage1\.fake_lr: expected float"):
        load_config("tiny-sdxl", ["stage1.fake_lr=fast"])
    with pytest.raises(ConfigError, match=r"stage1\.ttur: expected int"):
        load_config("tiny-sdxl", ["stage1.ttur=two"])
    with pytest.raises(ConfigError, match=r"engine\.kind: expected one of 'local', 'fsdp', 'deepspeed'"):
        load_config("tiny-sdxl", ["engine.kind=ddp"])


def test_wrong_type_in_yaml_names_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  ttur: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value) and "stage1.ttur" in str(err.value) and "expected int" in str(err.value)


def test_unknown_key_in_yaml_names_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  knd: fsdp\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*engine\.knd.*engine\.kind"):
        load_config(str(bad))


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sdxl-4step'"):
        load_config("sdxl-4stp")


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_section_override_is_an_error():
    with pytest.raises(ConfigError, match="is a section"):
        load_config("tiny-sdxl", ["stage1=3"])


# One case per rule: (overrides, a fragment of the expected message).
RULE_CASES = [
    (["stage1.student_timesteps=[]", "stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage2.rl_transitions=[]"], "must not be empty"),
    (["stage1.student_timesteps=[1999,249]", "stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage2.rl_transitions=[]"], "lie in [0, 1000]"),
    (["stage1.student_timesteps=[249,999]", "stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage2.rl_transitions=[]"], "strictly decreasing"),
    (["stage1.dm_steps=[998]"], "dm_steps must be among"),
    (["stage1.gan_steps=[250]"], "gan_steps must be among"),
    (["stage1.dm_steps=[999,249]"], "must be disjoint"),
    (["stage1.ttur=0"], "stage1.ttur must be >= 1"),
    (["stage1.fake_ema_decay=1.0"], "0 <= decay < 1"),
    (["stage1.dmd_noise_min=0.9", "stage1.dmd_noise_max=0.1"], "dmd_noise_min < stage1.dmd_noise_max"),
    (["stage1.real_guidance_scale=-1"], "real_guidance_scale"),
    (["stage1.gan_weight=-1"], "gan_weight must be >= 0"),
    (["stage1.fake_lr=0"], "fake_lr"),
    (["stage1.adam_betas=[0.9]"], "adam_betas"),
    (["stage1.grad_clip=0"], "grad_clip > 0"),
    (["stage2.iterations=0"], "iterations must be >= 1"),
    (["stage2.num_candidates=1"], "num_candidates (K) must be >= 2"),
    (["stage2.rl_transitions=[[999,499]]"], "consecutive stage1.student_timesteps"),
    (["stage2.beta=0"], "beta must be > 0"),
    (["stage2.ratio_clip=1.5"], "ratio_clip"),
    (["stage2.threshold=1.0"], "threshold"),
    (["stage2.rl_per_dm=-1"], "rl_per_dm"),
    (["stage2.distill=false", "stage2.rl_per_dm=0"], "RL only"),
    (["data.resolution=30"], "multiple of 8"),
    (["data.batch_size=0"], "data.batch_size must be >= 1"),
    (["data.epoch_length=0"], "epoch_length"),
    (["data.max_bad_fraction=2"], "max_bad_fraction"),
    (["model.lora.enabled=true", "model.lora.rank=0"], "lora.rank"),
    (["model.gmm.std=0"], "gmm.std > 0"),
    (["model.gmm.weights=[1.0,2.0]"], "one entry per mode"),
    (["model.gmm.means=[[1,2,3]]"], "2-D points"),
    (["model.gmm.reward_mode=8"], "reward_mode"),
    (["launch.nodes=0"], "launch.nodes"),
    (["launch.cpus_per_task=0"], "cpus_per_task"),
    (["launch.time_minutes=0", "launch.signal_lead_s=0"], "time_minutes must be >= 1"),
    (["launch.time_minutes=1", "launch.signal_lead_s=120"], "signal_lead_s"),
    (["launch.max_requeues=-1"], "max_requeues"),
    (["engine.collective_timeout_s=0"], "collective_timeout_s"),
    (["engine.offload_optimizer=true"], "offload"),
    (["health.max_consecutive_nonfinite=0"], "health.max_consecutive_nonfinite"),
    (["health.rollback_lr_factor=1.0"], "rollback_lr_factor"),
    (["health.fake_lag_max=-1"], "health bounds"),
    (["tracking.log_every=0"], "log_every"),
    (["checkpoint.keep_last=0"], "keep_last"),
    (["eval.every=-1"], "eval.every"),
    (["name=a/b"], "plain directory name"),
]


@pytest.mark.parametrize("overrides,fragment", RULE_CASES)
def test_each_rule(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sdxl", overrides)
    assert fragment in str(err.value)


def test_every_rule_has_a_case():
    assert len(RULE_CASES) >= len(_rules(Config()))


def test_all_violations_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sdxl", ["stage1.ttur=0", "stage2.num_candidates=1", "stage1.fake_ema_decay=2"])
    msg = str(err.value)
    assert "ttur" in msg and "num_candidates" in msg and "fake_ema_decay" in msg


def test_dmd2_mode_allows_overlapping_steps():
    cfg = load_config("tiny-sdxl", ["stage1.mode=dmd2", "stage1.dm_steps=[999,249]"])
    assert validate(cfg) is cfg


def test_defaults_are_valid_and_independent():
    a, b = Config(), Config()
    a.stage1.student_timesteps.append(1)
    assert b.stage1.student_timesteps == [999, 749, 499, 249]
    assert dataclasses.asdict(b) == dataclasses.asdict(Config())
