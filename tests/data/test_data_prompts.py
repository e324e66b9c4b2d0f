"""Prompt lists (text, JSONL, prompt shards) and the prompt batch iterator: rank split and resume."""
from __future__ import annotations

import json

import pytest

from data_tools.make_shards import write_shards
from flashdmd.config import load_config
from flashdmd.data import DataError, DataPosition, build_prompt_loader, load_prompts

PROMPTS = [f"prompt number {i}" for i in range(23)]


def _cfg(*overrides: str):
    return load_config("tiny-sdxl", ["data.batch_size=3", "data.epoch_length=4", *overrides])


@pytest.fixture()
def txt(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:10]) + "\n\n  \n" + "\n".join(PROMPTS[10:]) + "\n")
    return str(path)


def test_load_prompts_from_text_jsonl_and_shards(tmp_path, txt):
    assert load_prompts(txt) == PROMPTS
    jsonl = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p} if i % 3 else ({"caption": p, "id": i} if i % 2 else p) for i, p in enumerate(PROMPTS)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_prompts(str(jsonl)) == PROMPTS
    shards = write_shards(
        [{"__key__": f"{i:04d}", "txt": p} if i % 2 else {"__key__": f"{i:04d}", "json": {"caption": p}} for i, p in enumerate(PROMPTS)],
        tmp_path / "shards", "prompts", maxcount=10,
    )
    assert len(shards) == 3
    assert load_prompts(str(tmp_path / "shards" / "prompts-{000000..000002}.tar")) == PROMPTS


def test_load_prompts_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_prompts(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="holds no prompts"):
        load_prompts(str(empty))


def test_deterministic_prompt_batches_split_ranks_and_resume_exactly(txt):
    cfg = _cfg("data.resampled=false")
    # 23 prompts, 2 ranks -> 11 per rank per pass; one epoch of 4 batches x 3 = 12 crosses a pass
    ranks = [[p for batch in build_prompt_loader(cfg, r, 2, path=txt) for p in batch] for r in range(2)]
    assert all(len(r) == 12 for r in ranks)
    first_pass = [set(r[:11]) for r in ranks]
    assert not first_pass[0] & first_pass[1] and len(first_pass[0] | first_pass[1]) == 22
    reference = build_prompt_loader(cfg, 1, 2, path=txt)
    expected = [b for _ in range(2) for b in reference]
    loader = build_prompt_loader(cfg, 1, 2, path=txt)
    it = iter(loader)
    head = [next(it), next(it), next(it)]
    saved = DataPosition.from_state_dict(json.loads(json.dumps(loader.position.state_dict())))
    resumed = build_prompt_loader(cfg, 1, 2, saved, path=txt)
    tail = list(resumed) + list(resumed)
    assert head + tail == expected
    assert all(len(b) == 3 for b in expected)


def test_resampled_prompt_batches_do_not_replay_after_resume(txt):
    cfg = _cfg("data.resampled=true")
    loader = build_prompt_loader(cfg, 0, 1, path=txt)
    consumed = list(loader)
    resumed = build_prompt_loader(cfg, 0, 1, loader.position, path=txt)
    after = list(resumed)
    assert len(after) == 4 and after != consumed and resumed.position.restart == 1


def test_prompt_source_defaults_to_data_prompts(txt):
    loader = build_prompt_loader(_cfg(f"data.prompts={txt}", "data.resampled=false"), 0, 1, batch_size=5)
    batch = next(iter(loader))
    assert len(batch) == 5 and set(batch) <= set(PROMPTS)
