"""Preset files: every way a YAML file can be broken gives one ConfigError naming the file (never
a traceback), and bases are found relative to the file that names them."""
from __future__ import annotations

from pathlib import Path

import pytest

from flashdmd.config import ConfigError, load_config


def refused(path: Path | str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(str(path), list(overrides))
    return str(err.value)


def test_bytes_that_are_not_utf8(tmp_path: Path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    msg = refused(bad)
    assert msg.startswith(str(bad)) and "not UTF-8" in msg and "0xe9" in msg


def test_utf8_with_a_byte_order_mark_is_read(tmp_path: Path):
    good = tmp_path / "bom.yaml"
    good.write_bytes("\ufeffbase: tiny-sdxl\nstage1:\n  ttur: 2\n".encode())
    assert load_config(str(good)).stage1.ttur == 2


def test_unreadable_file_and_folder(tmp_path: Path):
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)  # reading it fails with ELOOP, an OSError
    msg = refused(loop)
    assert str(loop) in msg and ("cannot read" in msg or "does not exist" in msg)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert "is a folder" in refused(folder)


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path: Path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("base: tiny-sdxl\nstage1:\n  ttur: 2\n  iterations: 5\n  ttur: 3\n")
    msg = refused(dup)
    assert str(dup) in msg and "duplicate key 'ttur'" in msg and "line 3" in msg and "line 5" in msg
    top = tmp_path / "top.yaml"
    top.write_text("stage1: {ttur: 2}\nstage1: {ttur: 3}\n")
    assert "duplicate key 'stage1'" in refused(top)


@pytest.mark.parametrize("text,fragment", [
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("just a string\n", "expected a mapping at the top level"),
    ("stage1: [1, 2\n", "not valid YAML"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
    ("stage1: 3\n", "stage1: expected a mapping"),
    ("stage1: " + "[" * 100000 + "]" * 100000 + "\n", "nested more than 100 levels deep"),  # libyaml would crash
    ("base: 3\n", "base must be a preset name or a YAML path"),
    ("base: [tiny-sdxl]\n", "base must be a preset name or a YAML path"),
    ("base: ''\n", "base must be a preset name or a YAML path"),
    ("? [a, b]\n: 1\n", "not valid YAML"),
], ids=["list", "string", "unclosed", "two-documents", "section-not-mapping", "deep", "base-int", "base-list",
        "base-empty", "unhashable-key"])
def test_broken_documents(tmp_path: Path, text: str, fragment: str):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    msg = refused(bad)
    assert str(bad) in msg and fragment in msg, msg
    assert "\n" not in msg  # one line


@pytest.mark.parametrize("base", ["sibling.yaml", "./sibling.yaml", "sibling"])
def test_base_is_relative_to_the_referring_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "sibling.yaml").write_text("base: tiny-sdxl\nstage1:\n  iterations: 7\n")
    (folder / "child.yaml").write_text(f"base: {base}\nstage1:\n  ttur: 3\n")
    monkeypatch.chdir(tmp_path)  # not the files' folder
    cfg = load_config(str(folder / "child.yaml"))
    assert (cfg.stage1.iterations, cfg.stage1.ttur, cfg.model.family) == (7, 3, "tiny-sdxl")


def test_base_in_a_parent_folder(tmp_path: Path):
    (tmp_path / "shared.yaml").write_text("base: gmm2d\nseed: 5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text("base: ../shared.yaml\n")
    assert load_config(str(tmp_path / "sub" / "run.yaml")).seed == 5


def test_errors_in_a_base_name_the_chain(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("stage1:\n  ttur: fast\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    msg = refused(tmp_path / "a.yaml")
    assert f"{tmp_path / 'c.yaml'} (base of {tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'})" in msg
    assert "stage1.ttur: expected int" in msg


def test_unknown_base_names_the_referring_file(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("base: sdxl-4stp\n")
    msg = refused(tmp_path / "a.yaml")
    assert msg.startswith(f"{tmp_path / 'a.yaml'}: base 'sdxl-4stp'") and "did you mean 'sdxl-4step'" in msg
    (tmp_path / "b.yaml").write_text("base: missing.yaml\n")
    msg = refused(tmp_path / "b.yaml")
    assert str(tmp_path / "b.yaml") in msg and f"'{tmp_path / 'missing.yaml'}' does not exist" in msg


def test_a_cycle_is_shown_as_the_chain(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    msg = refused(tmp_path / "a.yaml")
    assert f"cycle: {tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}" in msg


def test_rule_and_limit_errors_name_the_file_of_the_value(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("base: tiny-sdxl\nstage1:\n  generator_lr: .nan\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nstage2:\n  beta: -1\n")
    msg = refused(tmp_path / "run.yaml")
    assert f"stage1.generator_lr must be a finite number; got nan from {tmp_path / 'base.yaml'} (base of" in msg
    assert f"stage2.beta must be > 0; got -1.0 from {tmp_path / 'run.yaml'}" in msg


def test_every_problem_of_every_file_at_once(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("base: tiny-sdxl\nstage1:\n  ttur: x\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\ndata:\n  batch_sise: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "run.yaml"), ["engine.kind=ddp"])
    assert len(err.value.problems) == 3
    assert [p.split(": ")[0] for p in err.value.problems][2] == "the command line"
