"""The generator EMA for evaluation and export (spec 6 #20; the update is spec 1.7's Eq. 11).

- Local engine: after k generator updates the EMA equals psi_k = d psi_{k-1} + (1 - d) theta_k
  computed here from the raw weight history in float64, starting at the initial weights; a
  refused (non-finite) update leaves the EMA exactly as it was and enters no history.
- Resume: a step directory holds network ``generator_ema`` (the reader and consolidate see it);
  save at K, fresh engine with scrambled weights, load, continue to N: the EMA is bitwise the
  uninterrupted one. A checkpoint without the EMA restarts it at the resumed weights.
- FSDP2 and ZeRO-3 on 2 gloo ranks (each rank's shard of the EMA updated locally) equal the local
  engine on the global batch (the toy world's losses are means of equal shards, so 2 ranks and
  one process take the same steps); a checkpoint they write resumes on 1 rank to the same EMA.
- Export/sample: the hand-over carries ``generator_ema``; the exported UNet is exactly the EMA
  (default) or the raw weights (``weights="raw"``), and the card and export meta say which.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_world import global_batch, make_engine, run_ranks, setup_engine, shard

from flashdmd.engine.checkpoint_reader import CheckpointReader
from flashdmd.engine.local import LocalEngine
from flashdmd.train.checkpoint import latest_valid, load_checkpoint, save_checkpoint

DECAY = 0.6  # far from 1, so every update shows in the EMA


def generator_step(engine, step: int, poison: bool = False) -> dict[str, float]:
    """One generator update on this rank's share of the step's global batch; ``poison`` makes the loss NaN."""
    b = shard(global_batch(step), engine.rank, engine.world_size)
    out = engine["generator"](b["z"], torch.full((b["z"].shape[0],), 999.0), {})
    loss = F.mse_loss(out, b["real"])
    engine.backward("generator", loss * float("nan") if poison else loss)
    return engine.step("generator")


def raw(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.modules["generator"].named_parameters()}


def test_local_ema_is_the_hand_computed_average_and_ignores_skipped_steps() -> None:
    engine = setup_engine(LocalEngine("cpu"))
    engine.track_ema("generator", DECAY)
    history = [raw(engine)]
    for step in range(5):
        before = engine.ema_full_state_dict("generator")
        stats = generator_step(engine, step, poison=step == 2)
        if step == 2:
            assert stats.get("skipped") == 1.0
            after = engine.ema_full_state_dict("generator")
            assert all(torch.equal(before[k], after[k]) for k in before), "a refused update moved the EMA"
            assert all(torch.equal(history[-1][k], v) for k, v in raw(engine).items())
            continue
        history.append(raw(engine))
    expected = {k: v.double() for k, v in history[0].items()}
    for weights in history[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k].double() for k in expected}
    ema = engine.ema_full_state_dict("generator")
    assert ema.keys() == expected.keys()
    assert max((ema[k].double() - expected[k]).abs().max().item() for k in ema) < 1e-6
    # the EMA lags: after 4 updates it differs from the raw weights by more than float noise
    assert max((ema[k] - history[-1][k]).abs().max().item() for k in ema) > 1e-4


def ema_run(kind: str, n: int, save_at: int = 0, ckpt_dir: str = "", resume: bool = False) -> dict[str, torch.Tensor]:
    """Generator updates 0..n-1 under ``kind`` with the EMA kept; ``resume``: scrambled weights, then the
    newest checkpoint of ``ckpt_dir``. Returns the full EMA and raw weights (rank 0)."""
    engine = setup_engine(make_engine(kind), scramble=resume)
    engine.track_ema("generator", DECAY)
    first = load_checkpoint(engine, latest_valid(ckpt_dir)).step if resume else 0
    for step in range(first, n):
        generator_step(engine, step)
        if save_at and step + 1 == save_at:
            save_checkpoint(engine, ckpt_dir, save_at, trainer={"mlflow_run_id": "run-1"})
    out = {f"ema.{k}": v for k, v in engine.ema_full_state_dict("generator").items()}
    out.update({f"w.{k}": v for k, v in engine.full_state_dict("generator").items()})
    return out


def test_local_resume_restores_the_ema_exactly_and_the_reader_sees_it(tmp_path: Path) -> None:
    from flashdmd.apps.consolidate import consolidate

    straight = ema_run("local", 4, save_at=2, ckpt_dir=str(tmp_path))
    step = latest_valid(tmp_path)
    reader = CheckpointReader(step)
    assert "generator_ema" in reader.networks() and reader.map("generator_ema")["layout"] == "full"
    saved = reader.state_dict("generator_ema")
    partial = ema_run("local", 2)
    assert all(torch.equal(saved[k], partial[f"ema.{k}"]) for k in saved)
    files = consolidate(step, tmp_path / "out", ["generator_ema"])
    assert [f.name for f in files] == ["generator_ema.safetensors"]

    resumed = ema_run("local", 4, ckpt_dir=str(tmp_path), resume=True)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "resume differs from the uninterrupted run"


def test_checkpoint_without_ema_restarts_it_at_the_resumed_weights(tmp_path: Path, caplog) -> None:
    engine = setup_engine(LocalEngine("cpu"))
    generator_step(engine, 0)
    save_checkpoint(engine, tmp_path, 1)
    fresh = setup_engine(LocalEngine("cpu"), scramble=True)
    fresh.track_ema("generator", DECAY)
    with caplog.at_level("WARNING", "flashdmd.engine"):
        load_checkpoint(fresh, latest_valid(tmp_path))
    assert "has no generator_ema" in caplog.text
    ema, weights = fresh.ema_full_state_dict("generator"), raw(fresh)
    assert all(torch.equal(ema[k], weights[k]) for k in ema)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_sharded_ema_equals_local_and_resumes_on_one_rank(kind: str, tmp_path: Path) -> None:
    local = ema_run("local", 4)
    ckpt = tmp_path / "ckpt"
    sharded = run_ranks(2, ema_run, kind, 4, 2, str(ckpt), tmp=tmp_path)
    ema = {k: v for k, v in sharded.items() if k.startswith("ema.")}
    assert ema.keys() == {k for k in local if k.startswith("ema.")}
    worst = max((ema[k] - local[k]).abs().max().item() for k in ema)
    assert worst <= 1e-5, f"{kind} EMA vs local: {worst:.3g}"
    assert CheckpointReader(latest_valid(ckpt)).map("generator_ema")["world_size"] == 2

    resumed = run_ranks(1, ema_run, kind, 4, 0, str(ckpt), True, tmp=tmp_path)
    worst = max((resumed[k] - sharded[k]).abs().max().item() for k in ema)
    assert worst <= 1e-6, f"{kind}: resumed on 1 rank vs uninterrupted on 2: {worst:.3g}"


@pytest.mark.slow
def test_handoff_export_takes_the_ema_unless_raw_is_asked(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from student_world import run_config

    from flashdmd.apps.export import EXPORT_META, export_pipeline
    from flashdmd.apps.sample import find_student
    from flashdmd.engine.base import OptimSpec
    from flashdmd.engine.diffusers_weights import find_diffusers_model
    from flashdmd.nets.registry import build_parts
    from flashdmd.train.handoff import write_handoff

    cfg = run_config(tmp_path, "model.lora.enabled=false")
    parts = build_parts(cfg, tmp_path / "cache")
    engine = LocalEngine("cpu")
    engine.setup({"generator": parts.generator}, {"generator": OptimSpec(lr=1e-2, warmup_steps=0)}, {})
    engine.track_ema("generator", DECAY)
    params = [p for p in parts.generator.parameters() if p.requires_grad]
    engine.backward("generator", sum(p.square().sum() for p in params))  # moves every tensor, no forward needed
    assert "skipped" not in engine.step("generator")
    prefix, _ = find_diffusers_model(parts.generator)
    ema = engine.ema_full_state_dict("generator")
    weights = {k: v for k, v in engine.full_state_dict("generator").items() if k in ema}  # the trainable ones
    write_handoff(engine, {"generator": parts.generator}, cfg, 1, None)

    assert find_student(cfg.run_dir).weights == "ema"
    assert find_student(cfg.run_dir, "raw").weights == "raw"
    for choice, expected in (("", ema), ("raw", weights)):
        out = export_pipeline(cfg, cfg.run_dir, tmp_path / f"export-{choice or 'default'}", choice)
        unet = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
        assert unet.keys() == {k[len(prefix):] for k in expected}
        assert all(torch.equal(unet[k], expected[prefix + k].float()) for k in unet)
        meta = json.loads((out / EXPORT_META).read_text())
        assert meta["weights"] == (choice or "ema")
        card = (out / "README.md").read_text()
        assert ("generator's EMA" in card) == (choice == "")
    assert not all(torch.equal(ema[k], weights[k]) for k in ema)


def test_asking_for_ema_where_there_is_none_names_the_fix(tmp_path: Path) -> None:
    from student_world import synthetic_handoff

    from flashdmd.apps.sample import find_student

    cfg, run_dir = synthetic_handoff(tmp_path, "tiny-sdxl")
    assert find_student(run_dir).weights == "raw"
    with pytest.raises(FileNotFoundError, match="--weights raw"):
        find_student(run_dir, "ema")


def test_rl_iteration_without_kept_pairs_leaves_the_ema(tmp_path: Path) -> None:
    from stage2_world import SMALL, RankReward, gmm_batch, stage2_setup

    from flashdmd.config import load_config
    from flashdmd.nets.gmm2d import build_gmm_parts

    probe = build_gmm_parts(load_config("gmm2d", SMALL), tmp_path)  # only its reward is read
    engine = LocalEngine("cpu")
    _, parts, s2 = stage2_setup(engine, str(tmp_path), ["stage2.distill=false"], reward=RankReward(probe.reward, set()))
    engine.track_ema("generator", DECAY)
    before = engine.ema_full_state_dict("generator")
    metrics = s2.step(0, gmm_batch(parts))
    assert metrics["rl_no_pairs"] == 1.0
    after = engine.ema_full_state_dict("generator")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_training_run_hands_over_and_resumes_the_ema(tmp_path: Path) -> None:
    """gmm2d through the training entry point: the hand-over's EMA is the last checkpoint's, a run
    resumed from step 3 ends with the bitwise same EMA, and stage 2 starts from it."""
    import shutil

    from safetensors.torch import load_file

    from flashdmd.config import load_config
    from flashdmd.train.main import main

    def cfg(name: str, *extra: str):
        return load_config("gmm2d", [
            f"run_root={tmp_path}", f"name={name}", f"model.cache_dir={tmp_path / 'cache'}",
            "model.gmm.teacher_steps=30", "data.batch_size=16", "stage1.iterations=6", "stage2.iterations=2",
            "checkpoint.every=3", "tracking.sample_every=0", "stage1.generator_lr=1e-2", "stage1.generator_ema=true",
            f"stage1.generator_ema_decay={DECAY}", *extra])

    s1 = cfg("s1")
    final = main(s1, "stage1")
    ema = load_file(str(final / "generator_ema.safetensors"))
    assert ema and ema.keys() <= set(load_file(str(final / "generator.safetensors")))
    saved = CheckpointReader(s1.checkpoint_dir / "step-00000006").state_dict("generator_ema")
    assert all(torch.equal(ema[k], saved[k]) for k in ema)
    assert "generator_ema" in json.loads((final / "handoff.json").read_text())["networks"]

    shutil.rmtree(s1.checkpoint_dir / "step-00000006")
    shutil.rmtree(final)
    again = load_file(str(main(cfg("s1"), "stage1") / "generator_ema.safetensors"))
    assert all(torch.equal(ema[k], again[k]) for k in ema), "resumed EMA differs from the uninterrupted one"

    # stage 2 continues stage 1's EMA: against a run from the same hand-over without it (restarting
    # at the raw weights), training is identical and the EMAs differ by exactly d^u (ema1 - raw1)
    bare = tmp_path / "bare" / "final"
    shutil.copytree(s1.run_dir / "final", bare)
    (bare / "generator_ema.safetensors").unlink()
    meta = json.loads((bare / "handoff.json").read_text())
    (bare / "handoff.json").write_text(json.dumps(meta | {"networks": ["discriminator", "fake_score", "generator"]}))
    runs = {}
    for name, source in (("s2", s1.run_dir), ("s2-bare", bare)):
        run = cfg(name, f"stage2.init_from={source}", "stage2.rl_per_dm=1")
        runs[name] = load_file(str(main(run, "stage2") / "generator_ema.safetensors"))
        updates = json.loads((run.checkpoint_dir / "step-00000002" / "trainer.json").read_text())["updates"]
    raw = load_file(str(s1.run_dir / "final" / "generator.safetensors"))
    shrink = DECAY ** updates.get("generator", 0)
    for k in ema:
        torch.testing.assert_close(runs["s2"][k] - runs["s2-bare"][k], shrink * (ema[k] - raw[k]), atol=1e-6, rtol=1e-4)
    assert max((ema[k] - raw[k]).abs().max().item() for k in ema) > 1e-3  # the comparison is not vacuous
