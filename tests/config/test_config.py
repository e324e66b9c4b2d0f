"""Config tree: precedence, inheritance, round trip, and every section and cross-section rule."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flashdmd.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    check_rules,
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
        "sdxl-4step",
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


NO_STEPS = ["stage1.dm_steps=[]", "stage1.gan_steps=[]", "stage2.rl_transitions=[]"]

# One case per rule: (preset, overrides, a fragment of the expected message). Limits of single
# fields (ranges, finiteness, sizes) are declared beside each field and tested in test_limits.py.
RULE_CASES = [
    ("tiny-sdxl", ["name=a/b"], "plain directory name"),
    ("tiny-sdxl", ["model.prediction_type=flow"], "model.prediction_type must be one of"),
    ("tiny-sdxl", ["model.use_t5=true"], "model.use_t5 applies to SD3 only"),
    ("sdxl-4step", ["model.text_encoders=[/a]"], "must list 2 folder(s)"),
    ("tiny-sdxl", ["model.teacher=/x"], "must be empty for tiny families"),
    ("gmm2d", ["model.teacher=/x"], "model.teacher is not read by model.family=gmm2d"),
    ("tiny-sdxl", ["model.gmm.std=1.0"], "model.gmm is only read by model.family=gmm2d"),
    ("gmm2d", ["model.lora.enabled=true"], "needs an image family"),
    ("gmm2d", ["model.gmm.weights=[1.0,2.0]"], "one entry per mode"),
    ("gmm2d", ["model.gmm.num_modes=2", "model.gmm.weights=[0,0]"], "positive sum"),
    ("gmm2d", ["model.gmm.means=[[1,2,3]]"], "2-D points"),
    ("gmm2d", ["model.gmm.reward_mode=8"], "model.gmm.reward_mode must index a mode"),
    ("tiny-sdxl", ["data.resolution=30"], "multiple of 8"),
    ("tiny-sdxl", ["data.latent_shards=true", "data.latent_shape=[4,8]"], "must be [] or [C, h, w]"),
    ("tiny-sdxl", ["data.latent_shape=[4,8,8]"], "is only read from latent shards"),
    ("tiny-sdxl", ["stage1.student_timesteps=[249,999]", *NO_STEPS], "strictly decreasing"),
    ("tiny-sdxl", ["stage1.dm_steps=[998]"], "dm_steps must be among"),
    ("tiny-sdxl", ["stage1.gan_steps=[250]"], "gan_steps must be among"),
    ("tiny-sdxl", ["stage1.dm_steps=[999,249]"], "must be disjoint"),
    ("tiny-sdxl", ["stage1.dm_steps=[999,749]"], "must cover every student step"),
    ("tiny-sdxl", ["stage1.dm_steps=[]", "stage1.gan_steps=[999,749,499,249]"], "gives no student step the DM loss"),
    ("tiny-sdxl", ["stage1.dmd_noise_min=0.9", "stage1.dmd_noise_max=0.1"], "must be < stage1.dmd_noise_max"),
    ("tiny-sdxl", ["stage1.generator_ema=true"], "of the initial weights in the generator EMA"),
    ("tiny-sdxl", ["stage2.distill=false", "stage2.rl_per_dm=0"], "RL only"),
    ("tiny-sdxl", ["engine.offload_optimizer=true"], "engine.offload_optimizer needs engine.kind deepspeed or fsdp"),
    ("tiny-sdxl", ["engine.offload_params=true"], "engine.offload_params needs engine.kind deepspeed or fsdp"),
    ("tiny-sdxl", ["engine.teacher_sharding=zero3"], "must be replicate with engine.kind=local"),
    ("tiny-sdxl", ["health.monitors=false", "health.fake_lag_max=1"], "health.fake_lag_max is only read with"),
    ("tiny-sdxl", ["launch.time_minutes=1", "launch.signal_lead_s=120"], "signal_lead_s must be shorter"),
    ("tiny-sdxl", ["launch.nodes=4"], "launch.nodes > 1 needs launch.executor=slurm"),
    ("tiny-sdxl", ["launch.partition=gpu"], "launch.partition is only read by launch.executor=slurm"),
    ("tiny-sdxl", [f"tracking.tags.{'k' * 251}=v"], "keys must have 1 to 250 characters"),
    ("tiny-sdxl", ["eval.metrics=[fid,fid]"], "must not list a metric twice"),
    ("tiny-sdxl", ["eval.weights.fid=/w"], "eval.weights.fid is only read when eval.metrics lists"),
    ("tiny-sdxl", ["eval.teacher_guidance=3"], "is only read with eval.teacher_steps > 0"),
    ("tiny-sdxl", ["sample.prompts=[a]", "sample.prompts_file=p.txt"], "is only read when sample.prompts is empty"),
    ("tiny-sdxl", ["synth.filter_threshold=0.3"], "is only read when synth.filter_metric names a score"),
    ("tiny-sdxl", ["stage1.student_timesteps=[1999,249]", *NO_STEPS], "must lie in [0, 999]"),
    ("tiny-sd3", ["stage1.student_timesteps=[1000,0]", *NO_STEPS], "must lie in [1, 1000]"),
    ("tiny-sdxl", ["stage2.rl_transitions=[[999,499]]"], "consecutive stage1.student_timesteps"),
    ("tiny-sdxl", ["stage2.rl_transitions=[]"], "stage2.rl_transitions must not be empty"),
    ("gmm2d", ["data.shards=x.tar"], "data.shards is not read by model.family=gmm2d"),
    ("tiny-sdxl", ["stage1.mode=dmd2", "engine.kind=fsdp"], "must not be dmd2 with a sharded engine"),
]


def _violated(preset: str, overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(preset, overrides)
    return err.value


@pytest.mark.parametrize("preset,overrides,fragment", RULE_CASES)
def test_each_rule(preset, overrides, fragment):
    err = _violated(preset, overrides)
    assert fragment in str(err)
    assert err.rules, "a rule case must violate a rule, not only a field's limits"


def test_every_rule_has_a_case():
    """Every rule id (section#n, cross#n) is violated by at least one case; ids are the same for every preset."""
    ids = check_rules(Config()).ids
    assert len(ids) == len(set(ids))
    assert all(check_rules(load_config(p)).ids == ids for p in PRESETS)
    covered = {rule for preset, overrides, _ in RULE_CASES for rule in _violated(preset, overrides).rules}
    assert set(ids) <= covered, sorted(set(ids) - covered)
    assert len(RULE_CASES) >= len(ids)


def test_rule_messages_name_the_file_key_and_value(tmp_path: Path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: tiny-sdxl\nstage1:\n  dm_steps: [998]\n")
    err = _violated(str(mine), [])
    line = next(p for p in err.problems if "dm_steps must be among" in p)
    assert f"stage1.dm_steps=[998] from {mine}" in line and "stage1.student_timesteps=[999, 749, 499, 249] from" in line
    err = _violated("tiny-sdxl", ["stage1.ttur=0"])
    assert err.problems == ["stage1.ttur must be >= 1 (fake-score/D updates per generator update, spec 1.6); got 0 "
                            "from the command line"]


def test_all_violations_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sdxl", ["stage1.ttur=0", "stage2.num_candidates=1", "stage1.fake_ema_decay=2",
                                  "stage1.dm_steps=[998]", "stage1.ttur=x", "stage2.beta=y"])
    assert [p.split(":")[1].split()[0] for p in err.value.problems] == ["stage1.ttur", "stage2.beta"]  # types first
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sdxl", ["stage1.ttur=0", "stage2.num_candidates=1", "stage1.fake_ema_decay=2",
                                  "stage1.dm_steps=[998]"])
    msg = str(err.value)
    assert "ttur" in msg and "num_candidates" in msg and "fake_ema_decay" in msg and "dm_steps" in msg
    assert len(err.value.problems) == 5 and "\n" not in "".join(err.value.problems)  # one line each


def test_dmd2_mode_allows_overlapping_steps():
    cfg = load_config("tiny-sdxl", ["stage1.mode=dmd2", "stage1.dm_steps=[999,249]"])
    assert validate(cfg) is cfg


def test_defaults_are_valid_and_independent():
    a, b = Config(), Config()
    a.stage1.student_timesteps.append(1)
    assert b.stage1.student_timesteps == [999, 749, 499, 249]
    assert dataclasses.asdict(b) == dataclasses.asdict(Config())
