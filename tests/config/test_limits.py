"""Every leaf of every preset, mutated: wrong type, out of its declared range, NaN/inf, empty, huge.

Each mutation is refused with a ConfigError whose problems name the key (in process, through a
YAML file based on the preset), and a handful through ``jobs/submit.py --dry-run`` exit with 2
and no traceback. Valid edge cases (8-step and 1-step students, scientific notation, boundary
values, a YAML with one override) are accepted.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashdmd.config import PRESET_DIR, Config, ConfigError, load_config
from flashdmd.config.rules import MAX_INT, MAX_ITEMS, MAX_TEXT, Bound, fields_of

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def leaves(obj: Any = None, prefix: str = "") -> list[tuple[str, Any, Bound]]:
    """(dotted key, type, bound) of every leaf field of the tree."""
    obj = Config() if obj is None else obj
    out = []
    for name, (tp, bound) in fields_of(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", tp, bound))
    return out


LEAVES = leaves()


def _outside(tp: Any, bound: Bound) -> list[Any]:
    """Values just outside each declared side of ``bound``."""
    def step(v: float) -> float:
        return 1 if tp is int else max(1e-9, abs(v) * 1e-6)

    values = [bound.ge - step(bound.ge) if bound.ge is not None else None, bound.gt,
              bound.le + step(bound.le) if bound.le is not None else None, bound.lt]
    return [tp(v) for v in values if v is not None]


def mutations(tp: Any, bound: Bound) -> dict[str, list[Any]]:
    """Invalid values for a field of type ``tp``, by kind."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"wrong type": [["x"], "not-a-choice", 3]}
    if origin is list:
        (item,) = typing.get_args(tp)
        sample = {int: 1, float: 0.5, str: "x"}.get(item, [1, 2])
        if typing.get_origin(item) is Literal:
            sample = typing.get_args(item)[0]
        found = {"wrong type": ["x" if item is not str else 5, {"a": 1}],
                 "huge": [[sample] * (MAX_ITEMS + 1) if bound.max_len is None else [sample] * (bound.max_len + 1)]}
        if typing.get_origin(item) is Literal:
            found["wrong type"].append(["not-a-metric"])
        if item is float:
            found["nan/inf"] = [[math.nan], [math.inf]]
        if bound.min_len:
            found["empty"] = [[]]
        return found
    if origin is dict:
        key = "clip_score" if typing.get_args(tp)[0] is not str else "k"
        return {"wrong type": [["a"], "x"], "huge": [{key: "x" * (MAX_TEXT + 1 + 5000)}]}
    if tp is bool:
        return {"wrong type": ["maybe", 3, [True]]}
    if tp is str:
        found = {"wrong type": [[1], {"a": 1}, None], "huge": ["x" * ((bound.max_len or MAX_TEXT) + 1)]}
        if bound.min_len:
            found["empty"] = [""]
        return found
    found = {"wrong type": ["many", [1], None, True] + ([1.5] if tp is int else []),
             "huge": [10 ** 20] if tp is int else [1e300]}
    if _outside(tp, bound):
        found["out of range"] = _outside(tp, bound)
    if tp is float:
        found["nan/inf"] = [math.nan, math.inf, -math.inf]
    return found


def nested(key: str, value: Any) -> dict[str, Any]:
    data: Any = value
    for part in reversed(key.split(".")):
        data = {part: data}
    return data


WORK = Path(tempfile.mkdtemp(prefix="flashdmd-limits-"))


def load_mutated(preset: str, key: str, value: Any) -> list[str]:
    """The problems of ``preset`` with ``key`` set to ``value`` in a YAML file based on it ([] if accepted)."""
    path = WORK / "mutated.yaml"
    path.write_text(yaml.safe_dump({"base": preset, **nested(key, value)}))
    try:
        load_config(str(path))
    except ConfigError as err:
        return err.problems
    return []


CASES = [(key, kind, value) for key, tp, bound in LEAVES for kind, values in mutations(tp, bound).items()
         for value in values]


def test_every_leaf_has_every_applicable_mutation():
    kinds = {kind for _, kind, _ in CASES}
    assert kinds == {"wrong type", "out of range", "nan/inf", "empty", "huge"}
    assert {key for key, _, _ in CASES} == {key for key, _, _ in LEAVES}
    bounded = {key for key, tp, b in LEAVES if tp in (int, float) and (b.ge, b.gt, b.le, b.lt) != (None,) * 4}
    assert bounded == {key for key, kind, _ in CASES if kind == "out of range"}
    numbers = {key for key, tp, _ in LEAVES if tp in (int, float)}
    assert numbers <= bounded, f"numbers without a declared range: {sorted(numbers - bounded)}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preset=st.sampled_from(PRESETS), case=st.sampled_from(CASES))
def test_every_mutated_leaf_of_every_preset_is_refused_naming_the_key(preset: str, case: tuple[str, str, Any]):
    key, kind, value = case
    problems = load_mutated(preset, key, value)
    assert problems, f"{preset}: {key}={value!r} ({kind}) was accepted"
    assert any(key in p for p in problems), problems
    assert all("\n" not in p and "Traceback" not in p for p in problems)


def test_every_out_of_range_value_is_refused_on_the_default_preset():
    for key, kind, value in CASES:
        if kind in ("out of range", "nan/inf"):
            problems = load_mutated("tiny-sdxl", key, value)
            assert any(key in p for p in problems), (key, value, problems)


@pytest.mark.parametrize("key,value,fragment", [
    ("stage1.generator_lr", "nan", "stage1.generator_lr must be a finite number"),
    ("health.fake_lag_max", "inf", "health.fake_lag_max must be a finite number"),
    ("name", "x" * 5000, "name must have at most 128 characters"),
    ("model.family", "sdxll", "model.family: expected one of"),
    ("data.batch_size", str(MAX_INT + 1), "data.batch_size must be <= 65536"),
], ids=["nan-lr", "inf-bound", "long-name", "family-typo", "huge-batch"])
def test_a_few_mutations_through_submit_dry_run(tmp_path: Path, key: str, value: str, fragment: str):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "submit.py"), "stage1", "--config", "tiny-sdxl", "--dry-run",
                          f"run_root={tmp_path}", f"{key}={value}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert not out.stdout  # refused before any plan is printed


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_accepted(preset: str):
    assert load_config(preset).model.family


@pytest.mark.parametrize("overrides", [
    [],  # the 8-step preset itself
    ["stage1.dm_steps=[]", "stage1.gan_steps=[124]"],  # one list given: the other is its complement
    ["stage1.mode=dmd2", "engine.kind=local", "engine.teacher_sharding=replicate"],  # dmd2: no sharded engine
])
def test_eight_step_students(overrides: list[str]):
    cfg = load_config("sdxl-8step", overrides)
    assert len(cfg.stage1.student_timesteps) == 8


@pytest.mark.parametrize("preset,step", [("tiny-sdxl", 999), ("gmm2d", 999), ("tiny-sd3", 1000), ("sdxl-4step", 0)])
def test_one_step_students(preset: str, step: int):
    cfg = load_config(preset, [f"stage1.student_timesteps=[{step}]", "stage1.dm_steps=[]", "stage1.gan_steps=[]",
                               "stage2.rl_transitions=[]"])
    assert cfg.stage1.student_timesteps == [step]


def test_scientific_notation_floats(tmp_path: Path):
    sci = tmp_path / "sci.yaml"
    sci.write_text("base: tiny-sdxl\nstage1:\n  generator_lr: 1e-4\n  fake_lr: 1.0E-4\n  disc_lr: 5e-3\n"
                   "  gan_weight: 2.5e+1\nstage2:\n  beta: 5e2\n")
    cfg = load_config(str(sci), ["stage1.weight_decay=1e-2", "health.fake_lag_max=3E2"])
    assert (cfg.stage1.generator_lr, cfg.stage1.fake_lr, cfg.stage1.disc_lr) == (1e-4, 1e-4, 5e-3)
    assert (cfg.stage1.gan_weight, cfg.stage2.beta, cfg.stage1.weight_decay, cfg.health.fake_lag_max) == (25, 500, 0.01, 300)


def test_a_yaml_with_one_override(tmp_path: Path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: sdxl-4step\ndata:\n  batch_size: 4\n")
    cfg = load_config(str(mine), ["stage1.ttur=2"])
    assert (cfg.data.batch_size, cfg.stage1.ttur, cfg.model.family) == (4, 2, "sdxl")


def test_boundary_values_are_accepted():
    cfg = load_config("tiny-sdxl", ["stage1.ttur=100", "stage1.fake_ema_decay=0", "stage1.generator_lr=1",
                                    "stage2.threshold=0", "data.max_bad_fraction=1", "launch.signal_lead_s=0",
                                    "name=" + "n" * 128, "stage2.num_candidates=2", "health.monitor_batch=2"])
    assert cfg.stage1.ttur == 100 and len(cfg.name) == 128
