"""100 mutated variants of the presets (wrong types, unknown keys, out-of-range
values, inconsistent timesteps, missing paths, broken files) each get a clear error naming the
thing to fix before anything is submitted, and none a traceback."""
from __future__ import annotations

from collections import Counter

import pytest
import scenarios

from flashdmd.config import ConfigError, load_config
from flashdmd.apps.preflight import preflight_all, preflight_problems


def test_hundred_mutated_configs_fail_clearly_before_submission(tmp_path):
    row, results = scenarios.bad_configs(tmp_path)
    assert len(results) == 100
    assert len({(r["config"], tuple(r["overrides"])) for r in results}) == 100  # all distinct
    categories = Counter(r["category"] for r in results)
    assert set(categories) == {"wrong type", "unknown key", "out of range", "inconsistent timesteps", "missing path", "bad file"}
    assert all(n >= 6 for n in categories.values()), categories
    assert {r["config"] for r in results} >= set(scenarios.PRESETS[1:])  # every preset is mutated
    tracebacks = [r for r in results if r["caught_by"] in ("TRACEBACK", "nothing")]
    assert not tracebacks, tracebacks[:3]
    unclear = [r for r in results if not r["clear"]]
    assert not unclear, unclear[:3]
    assert not row.data_lost


def test_preflight_passes_existing_inputs_and_names_missing_ones(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a-000000.tar").write_bytes(b"")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    cfg = load_config("tiny-sdxl", [f"data.shards={shards}/a-{{000000..000000}}.tar", f"model.teacher={teacher}"])
    assert preflight_problems(cfg, "stage1") == []
    assert preflight_problems(cfg, "export") == []
    hub = load_config("sdxl-4step", [f"data.shards={shards}"])
    assert preflight_problems(hub, "stage1") == []  # a hub id is not probed; a shard directory is expanded
    missing = load_config("tiny-sdxl", [f"data.shards={tmp_path}/none-{{0..1}}.tar", "stage2.init_from=/nope"])
    problems = preflight_problems(missing, "stage2")
    assert len(problems) == 2 and "none of its 2 shard files exist" in problems[0] and "stage2.init_from='/nope'" in problems[1]


def test_preflight_of_a_pipeline_waits_for_stage1_output(tmp_path):
    shards = tmp_path / "s-000000.tar"
    shards.write_bytes(b"")
    stage1 = load_config("tiny-sdxl", [f"data.shards={shards}"])
    stage2 = load_config("tiny-sdxl", [f"data.shards={shards}", f"stage2.init_from={tmp_path}/not-yet"])
    preflight_all([("stage1", stage1), ("stage2", stage2)])  # stage 1 writes init_from
    with pytest.raises(ConfigError, match="stage2.init_from="):
        preflight_all([("stage2", stage2)])
