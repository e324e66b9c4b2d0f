"""flashdmd.apps.export: the exported diffusers pipeline reproduces flashdmd's own few-step
sampler (``sample_student``) for the same initial noise and generator seed, loaded through
``DiffusionPipeline.from_pretrained`` and called with ``num_inference_steps`` = student steps,
guidance off."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flashdmd.diffusion.rollout import randn, sample_student
from flashdmd.diffusion.schedules import FlowSchedule, VPSchedule
from flashdmd.apps.export import EXPORT_META, cli, export_pipeline, student_scheduler
from flashdmd.apps.sample import Student, load_student

pytest.register_assert_rewrite("student_world")  # it is also loaded as a plugin below
from student_world import PROMPTS, synthetic_handoff

pytest_plugins = ["student_world"]  # the session-wide trained_run fixture, built once for all three files


def pipeline_vs_sampler(out: Path, student: Student, prompts: list[str], seed: int = 3) -> tuple[torch.Tensor, ...]:
    """(pipeline latents, sampler latents, pipeline images, sampler images) for the same noise."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    kwargs = json.loads((out / EXPORT_META).read_text())["call_kwargs"]
    shape = (len(prompts), *student.latent_shape)

    g = torch.Generator().manual_seed(seed)
    z = randn(shape, g)
    x0 = sample_student(student.generator, student.schedule, z, student.timesteps, student.text(prompts), g)
    ours = ((student.decoder(x0).clamp(-1, 1) + 1) / 2)

    def call(output_type: str) -> torch.Tensor:
        if student.family.endswith("sd3"):  # SD3's pipeline re-noises from the global RNG (see the module doc)
            torch.manual_seed(seed)
            return pipe(prompts, output_type=output_type, **kwargs).images
        g = torch.Generator().manual_seed(seed)
        z = randn(shape, g)
        return pipe(prompts, latents=z, generator=g, output_type=output_type, **kwargs).images

    return call("latent"), x0, call("pt"), ours


def test_tiny_sdxl_export_matches_the_student_sampler(trained_run, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    cfg, run_dir = trained_run
    out = export_pipeline(cfg, run_dir, tmp_path / "pipe")
    meta = json.loads((out / EXPORT_META).read_text())
    # the pipeline needs nothing but the student's step count and guidance off
    assert meta["exact"] and meta["call_kwargs"] == {"num_inference_steps": 4, "guidance_scale": 1.0, "height": 64, "width": 64}
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]

    student = load_student(cfg, run_dir)
    pipe_lat, ours_lat, pipe_img, ours_img = pipeline_vs_sampler(out, student, PROMPTS[:2])
    scale = ours_lat.abs().max()
    assert (pipe_lat - ours_lat).abs().max() <= 1e-5 * scale
    assert (pipe_img - ours_img).abs().max() < 1e-4
    assert ours_img.std() > 0.01  # not a blank image that would match anything

    # the UNet is the trained generator (hand-over weights), not the teacher
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    handed = load_file(str(run_dir / "final" / "generator.safetensors"))
    exported = unet.state_dict()
    assert all(torch.equal(exported[k.removeprefix("model.")], v) for k, v in handed.items())
    teacher = StableDiffusionXLPipeline.from_pretrained(student.extras["teacher_dir"]).unet.state_dict()
    assert any(not torch.equal(teacher[k], v) for k, v in exported.items())
    scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]

    card = (out / "README.md").read_text()
    assert "training step: 2" in card and "[999, 749, 499, 249]" in card and "## Training config" in card
    assert "family: tiny-sdxl" in card


def test_tiny_sd3_lora_export_matches_the_student_sampler(tmp_path):
    """SD3 with LoRA (the paper's SD3 setting): adapters fused into the exported transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg, run_dir = synthetic_handoff(tmp_path, "tiny-sd3", "model.lora.enabled=true", "model.lora.rank=4")
    handed = list(load_file(str(run_dir / "final" / "generator.safetensors")))
    assert [k for k in handed if "lora" not in k] == ["model.pos_embed.pos_embed"]  # adapters and a buffer
    out = export_pipeline(cfg, run_dir, tmp_path / "pipe")
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["exact"] and meta["call_kwargs"]["num_inference_steps"] == 4
    assert meta["call_kwargs"]["max_sequence_length"] == 8  # tiny preset without T5: 8 zero tokens
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == pytest.approx([1000, 750, 500, 250], abs=1e-3)
    pipe_lat, ours_lat, pipe_img, ours_img = pipeline_vs_sampler(out, load_student(cfg, run_dir), PROMPTS[:2])
    assert (pipe_lat - ours_lat).abs().max() <= 1e-4 * ours_lat.abs().max()
    assert (pipe_img - ours_img).abs().max() < 1e-3
    card = (out / "README.md").read_text()
    assert "max_sequence_length" in card and "torch.manual_seed(0)" in card
    fused = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert not any("lora" in k for k in fused)  # a plain model: adapters fused
    teacher_dir = load_student(cfg, run_dir).extras["teacher_dir"]
    teacher = load_file(str(next((teacher_dir / "transformer").glob("*.safetensors"))))
    key = "transformer_blocks.0.attn.to_q.weight"
    assert (fused[key] - teacher[key]).abs().max() > 1e-3  # the adapters changed the weights


@pytest.mark.slow
def test_uneven_timesteps_are_flagged_and_reproduced_with_explicit_timesteps(tmp_path, caplog):
    """tiny-sd15 with 999, 600, 300, 100: set_timesteps(4) cannot give them; card and log say so, and
    the call with the card's ``timesteps=`` reproduces the sampler."""
    steps = ["stage1.student_timesteps=[999,600,300,100]", "stage1.dm_steps=[999,600,300]", "stage1.gan_steps=[100]",
             "stage2.rl_transitions=[[999,600]]"]
    cfg, run_dir = synthetic_handoff(tmp_path, "tiny-sd15", *steps)
    with caplog.at_level(logging.WARNING, logger="flashdmd.apps.export"):
        out = export_pipeline(cfg, run_dir, tmp_path / "pipe")
    assert any("not the student's [999, 600, 300, 100]" in r.getMessage() for r in caplog.records)
    meta = json.loads((out / EXPORT_META).read_text())
    assert not meta["exact"] and meta["call_kwargs"]["timesteps"] == [999, 600, 300, 100]
    assert "does not reproduce the student's timesteps" in (out / "README.md").read_text()
    pipe_lat, ours_lat, pipe_img, ours_img = pipeline_vs_sampler(out, load_student(cfg, run_dir), PROMPTS[:1])
    assert (pipe_lat - ours_lat).abs().max() <= 1e-5 * ours_lat.abs().max()
    assert (pipe_img - ours_img).abs().max() < 1e-4


def test_student_scheduler_grids():
    vp = VPSchedule(prediction="v_prediction")
    sched, facts = student_scheduler(vp, [999, 874, 749, 624, 499, 374, 249, 124], {})
    assert facts["exact"] and sched.config.prediction_type == "v_prediction"
    assert torch.allclose(sched.alphas_cumprod.double(), vp.alphas_cumprod, atol=1e-7)
    _, facts = student_scheduler(FlowSchedule(), [1000, 800, 400], {})
    assert not facts["exact"] and facts["call_kwargs"] == {"sigmas": [1.0, 0.8, 0.4]}
    sched, facts = student_scheduler(FlowSchedule(), [1000, 500], {})
    assert facts["exact"] and sched.config.shift == 1.0 and sched.config.stochastic_sampling
    with pytest.raises(ValueError, match="other betas"):
        student_scheduler(vp, [999, 499], {"beta_start": 0.0001, "beta_end": 0.02})


def test_export_cli(trained_run, tmp_path, capsys):
    cfg, run_dir = trained_run
    common = ["--config", "tiny-sdxl", f"run_root={cfg.run_root}", f"model.cache_dir={cfg.model.cache_dir}"]
    assert cli([*common, "--source", str(run_dir / "checkpoints" / "step-00000001"), "--out", str(tmp_path / "p")]) == 0
    meta = json.loads((tmp_path / "p" / EXPORT_META).read_text())
    assert meta["step"] == 1 and meta["source"].endswith("step-00000001")
    card = (tmp_path / "p" / "README.md").read_text()
    assert f"From `{run_dir / 'config.yaml'}`" in card and "iterations: 2" in card
    assert cli([*common, "--source", str(tmp_path / "nothing")]) == 2
    assert "no trained generator" in capsys.readouterr().err


def test_half_precision_variant_and_model_card_header(trained_run, tmp_path):
    """export.dtype / export.variant write fp16 files under diffusers' variant names, loadable with
    from_pretrained(variant=...); the card opens with the Hugging Face metadata block and shows the
    seed-for-seed recipe with latents= of the student's latent shape."""
    import yaml
    from diffusers import UNet2DConditionModel

    cfg, run_dir = trained_run
    common = ["--config", "tiny-sdxl", f"run_root={cfg.run_root}", f"model.cache_dir={cfg.model.cache_dir}",
              "export.base_model=stabilityai/stable-diffusion-xl-base-1.0"]
    out = tmp_path / "p16"
    assert cli([*common, "--source", str(run_dir), "--out", str(out), "--dtype", "fp16", "--variant", "fp16"]) == 0
    weights = out / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    assert weights.is_file() and not (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert {t.dtype for t in load_file(str(weights)).values()} == {torch.float16}
    unet = UNet2DConditionModel.from_pretrained(out / "unet", variant="fp16", torch_dtype=torch.float16)
    handed = load_file(str(run_dir / "final" / "generator.safetensors"))
    exported = unet.state_dict()
    assert all(torch.equal(exported[k.removeprefix("model.")], v.half()) for k, v in handed.items())

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "text-to-image"
    assert header["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"flashdmd", "text-to-image", "StableDiffusionXLPipeline"} <= set(header["tags"])
    student = load_student(cfg, run_dir)
    assert f"latents = torch.randn({(1, *student.latent_shape)}, generator=g)" in card
    assert "variant='fp16'" in card and "torch_dtype=torch.float16" in card
    assert json.loads((out / EXPORT_META).read_text())["dtype"] == "fp16"
