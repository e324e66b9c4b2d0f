"""Export a trained student as a complete diffusers pipeline folder.

``export_pipeline(cfg, source, out_dir)`` writes what ``DiffusionPipeline.from_pretrained`` loads:
the teacher's text encoders, tokenizers and VAE (as the run loaded them, replacements included),
the distilled UNet / transformer (``flashdmd.engine.diffusers_weights.export_full_weights``: full weights, LoRA
fused), a scheduler that reproduces the student's sampler, ``README.md`` (a model card with the
training config, step, timesteps and the latest evaluation) and ``flashdmd_export.json``.

The student sampler (spec 1.2, ``flashdmd.diffusion.rollout.sample_student``) predicts x0 at each
student timestep and re-noises it to the next with fresh noise:

* VP (SD1.5/SDXL): diffusers' ``LCMScheduler`` is that sampler. Its boundary condition
  ``c_skip x_t + c_out x0`` is made the identity by a huge ``timestep_scaling`` (c_skip < 1e-12),
  ``original_inference_steps = n`` makes ``set_timesteps(n)`` give T/n-spaced steps from T-1
  (999, 749, 499, 249 for n = 4), and the betas are the teacher's (checked against flashdmd's
  schedule).
* Flow (SD3): ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling`` (x0 from the
  velocity, re-noised with fresh noise: the same update), ``shift = 1`` because the student's
  timesteps are given directly in t (spec 1.2 option (a); the teacher's shift 3 shapes only its
  own grid), and ``shift_terminal`` = the last student sigma, which stretches
  ``set_timesteps(n)``'s grid to exactly 1 .. sigma_last in equal steps (1, .75, .5, .25).

Both draw the re-noising noise in the sampler's order, so the same seed gives the same images
(tests/apps/test_export.py): from the call's ``generator`` for SD1.5/SDXL; StableDiffusion3Pipeline
does not pass its ``generator`` to the scheduler, so there the noise comes from torch's global RNG
(``torch.manual_seed(s)`` and no generator reproduce flashdmd's sampler with seed s; the card says so).
When ``set_timesteps(n)`` cannot give the student's timesteps (not evenly spaced, or not starting
at the top), the folder still holds the right scheduler class, and the model card and export log
say that the call must pass ``timesteps=[...]`` (VP) or ``sigmas=[...]`` (flow).

Departures: an SD3 student trained without T5 (``model.use_t5=false``) saw zeros in the T5 slot;
StableDiffusion3Pipeline will not load without a ``text_encoder_3``, so the export ships a
one-layer T5 whose output is exactly zero (``null_t5``). Tiny SD3 presets encode that slot as 8
tokens, so their pipeline must be called with ``max_sequence_length=8`` (real SD3: the pipeline's
default 256); both are written into the card. Weights come from a run's hand-over or a step directory of any
engine (``flashdmd.apps.sample.find_student``, read by ``flashdmd.engine.checkpoint_reader``): the
generator's EMA when the source has one, else its raw weights (``--weights ema|raw``, spec 6 #20),
said in the card and ``flashdmd_export.json``; an EMA export defaults to ``<run>/export/step-N-ema``.

Options (``export.*``): ``dtype`` casts every network of the pipeline (fp16/bf16 halve the folder;
the distilled weights are fp32 masters otherwise), ``variant`` names the files the way
``from_pretrained(variant=...)`` expects, ``base_model`` fills the card's metadata. Diffusers'
LCM and flow-match scheduler configs have no field for explicit timesteps, so the exact grid is
made by their own parameters where it can be (above) and is otherwise passed in the call.
The model card opens with the Hugging Face metadata header (library_name, pipeline_tag,
base_model, tags) and shows how to reproduce flashdmd's image for a seed, with ``latents=``.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from flashdmd.apps.cli import app_parser, exit_code, on_ranks, parse_app_args
from flashdmd.config import Config, to_dict
from flashdmd.diffusion.schedules import Schedule
from flashdmd.infra.distributed import DistContext
from flashdmd.engine.base import OptimSpec
from flashdmd.engine.local import LocalEngine
from flashdmd.engine.diffusers_weights import export_full_weights, find_diffusers_model
from flashdmd.engine.state_io import umask_modes
from flashdmd.apps.sample import Student, add_weights_flag, default_source, find_student, load_student

log = logging.getLogger("flashdmd.apps.export")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TIMESTEP_SCALING = 1e7  # LCM c_skip = 0.25 / ((t * scaling)^2 + 0.25) < 1e-14 for t >= 1: x0 passes unchanged
EXPORT_META = "flashdmd_export.json"
# spec 6 #20 [INF]: the raw weights are the paper-comparable ones, the EMA is reported beside them
WEIGHT_NOTES = {"ema": "the generator's EMA (stage1.generator_ema_decay)",
                "raw": "the generator's raw weights (no EMA)"}


def student_scheduler(schedule: Schedule, timesteps: Sequence[int | float],
                      teacher_config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(diffusers scheduler, call facts): facts hold ``exact`` and the extra pipeline kwargs if not exact."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    n, T = len(timesteps), schedule.num_train_timesteps
    if schedule.kind == "vp":
        scheduler = LCMScheduler(
            num_train_timesteps=T, beta_start=float(teacher_config.get("beta_start", 0.00085)),
            beta_end=float(teacher_config.get("beta_end", 0.012)), beta_schedule=schedule.beta_schedule,
            prediction_type=schedule.prediction, original_inference_steps=n, timestep_scaling=TIMESTEP_SCALING,
            clip_sample=False, thresholding=False, set_alpha_to_one=True, rescale_betas_zero_snr=False)
        mismatch = (scheduler.alphas_cumprod.double() - schedule.alphas_cumprod).abs().max().item()
        if mismatch > 1e-6:
            raise ValueError(f"the teacher's scheduler config {teacher_config} gives other betas than flashdmd's "
                             f"{schedule!r} (max |abar difference| {mismatch:.2g}); export cannot match the student")
        scheduler.set_timesteps(n)
        got = [int(t) for t in scheduler.timesteps]
        exact = got == [int(t) for t in timesteps]
        extra = {} if exact else {"timesteps": [int(t) for t in timesteps]}
        return scheduler, {"exact": exact, "set_timesteps_gives": got, "call_kwargs": extra}
    sigmas = [float(t) / T for t in timesteps]
    kwargs = {"num_train_timesteps": T, "shift": 1.0, "stochastic_sampling": True}
    scheduler = FlowMatchEulerDiscreteScheduler(**kwargs, shift_terminal=sigmas[-1] if n > 1 else None)
    scheduler.set_timesteps(n)
    got = [float(s) for s in scheduler.sigmas[:-1]]
    exact = len(got) == n and max(abs(a - b) for a, b in zip(got, sigmas)) < 1e-5
    if not exact:  # passed sigmas must not be stretched: no shift_terminal
        scheduler = FlowMatchEulerDiscreteScheduler(**kwargs)
    extra = {} if exact else {"sigmas": sigmas}
    return scheduler, {"exact": exact, "set_timesteps_gives": [round(s * T, 4) for s in got], "call_kwargs": extra}


def call_kwargs(student: Student, facts: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a pipeline call needs to reproduce the student (guidance off)."""
    kwargs: dict[str, Any] = {"num_inference_steps": student.nfe, "guidance_scale": 1.0, **facts["call_kwargs"]}
    text = student.text
    if student.extras["family_spec"].kind == "sd3" and text.t5 is None and text.t5_length != 256:
        kwargs["max_sequence_length"] = text.t5_length
    if student.extras["family_spec"].kind != "sd15":
        kwargs["height"] = kwargs["width"] = text.resolution
    return kwargs


def null_t5(width: int) -> tuple[Any, Any]:
    """A placeholder T5 encoder whose output is exactly zero (its final RMS norm has weight 0).

    A student trained with ``model.use_t5=false`` saw zeros in the T5 slot (flashdmd.nets.text);
    StableDiffusion3Pipeline cannot load without a text_encoder_3 unless the caller passes
    ``text_encoder_3=None``, so the export ships this one-layer stand-in: same zeros, no 9 GB T5.
    """
    from transformers import T5Config, T5EncoderModel

    from flashdmd.nets.tiny import tiny_t5

    _, tokenizer = tiny_t5()  # a local character vocabulary; the ids do not matter to a zero output
    tokenizer.model_max_length = 256
    model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=8, num_layers=1,
                                    num_heads=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model.eval(), tokenizer


def _components(student: Student, denoiser: Any, scheduler: Any) -> dict[str, Any]:
    family = student.extras["family_spec"]
    text = student.text
    encoders, tokenizers = list(text.encoders), list(text.tokenizers)
    vae = student.decoder.vae
    common = {"vae": vae, "scheduler": scheduler, "text_encoder": encoders[0], "tokenizer": tokenizers[0]}
    if family.kind == "sd15":
        return {**common, "unet": denoiser, "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}
    common |= {"text_encoder_2": encoders[1], "tokenizer_2": tokenizers[1]}
    if family.kind == "sdxl":
        return {**common, "unet": denoiser, "force_zeros_for_empty_prompt": text.force_zeros}
    t5, t5_tokenizer = (text.t5, text.t5_tokenizer) if text.t5 is not None else null_t5(text.joint_dim)
    return {**common, "transformer": denoiser, "text_encoder_3": t5, "tokenizer_3": t5_tokenizer}


def _latest_eval(run_dir: Path) -> dict[str, Any] | None:
    """The newest ``results.json`` that ``flashdmd.apps.evaluate`` wrote for this run, if any."""
    found = sorted((run_dir / "eval").glob("step-*/results.json"))
    return json.loads(found[-1].read_text()) if found else None


def card_header(cfg: Config, student: Student) -> list[str]:
    """The Hugging Face model-card metadata block (YAML front matter)."""
    family = student.extras["family_spec"]
    base = cfg.export.base_model or cfg.model.teacher or family.default_teacher or ""
    tags = ["flashdmd", "flash-dmd", "distillation", "few-step", "text-to-image", family.pipeline_class]
    return ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
            *([f"base_model: {json.dumps(base)}"] if base else []),
            "tags:", *(f"- {t}" for t in tags), "---", ""]


def reproduce_lines(student: Student, args: str) -> list[str]:
    """How to get flashdmd's own image for seed s from the pipeline, with explicit ``latents=``."""
    shape = (1, *student.latent_shape)
    if student.extras["family_spec"].kind == "sd3":
        return ["To reproduce flashdmd's image for seed `s` (`flashdmd.apps.sample` draws the initial noise and every "
                "re-noising from one generator per image; StableDiffusion3Pipeline re-noises from torch's global RNG):",
                "", "```python", "torch.manual_seed(s)", f"latents = torch.randn({shape})",
                f"image = pipe(PROMPT, {args}, latents=latents).images[0]", "```", ""]
    return ["To reproduce flashdmd's image for seed `s` (`flashdmd.apps.sample` draws the initial noise and every "
            "re-noising from one generator per image; LCM pipelines re-noise from the call's generator):",
            "", "```python", "g = torch.Generator().manual_seed(s)", f"latents = torch.randn({shape}, generator=g)",
            f"image = pipe(PROMPT, {args}, latents=latents, generator=g).images[0]", "```", ""]


def model_card(cfg: Config, student: Student, facts: dict[str, Any], kwargs: dict[str, Any]) -> str:
    family = student.extras["family_spec"]
    src = student.source
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    variant = f", variant={cfg.export.variant!r}" if cfg.export.variant else ""
    if cfg.export.dtype != "fp32":
        variant += f", torch_dtype=torch.{str(DTYPES[cfg.export.dtype]).removeprefix('torch.')}"
    lines = [
        *card_header(cfg, student),
        f"# Flash-DMD {family.name}, {student.nfe}-step student",
        "",
        (f"Distilled with flashdmd (Flash-DMD stage {'2' if cfg.stage2.init_from else '1'}) from the "
         f"{family.pipeline_class} teacher `{cfg.model.teacher or family.default_teacher or 'tiny preset'}`."),
        "",
        f"- training step: {src.step} ({src.kind} `{src.folder}`)",
        f"- weights: {cfg.export.dtype}" + (f" (variant `{cfg.export.variant}`)" if cfg.export.variant else "")
        + f", {WEIGHT_NOTES[src.weights]}",
        f"- MLflow run: {src.run_id or '-'}",
        f"- student timesteps: {student.timesteps} (NFE {student.nfe}); guidance off (no CFG, spec 1.2)",
        f"- scheduler: {facts['scheduler']} ({facts['note']})",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        f"pipe = DiffusionPipeline.from_pretrained(FOLDER{variant})",
        *([ "torch.manual_seed(0)", f"image = pipe(PROMPT, {args}).images[0]"] if family.kind == "sd3" else
          [f"image = pipe(PROMPT, {args}, generator=torch.Generator().manual_seed(0)).images[0]"]),
        "```",
        "",
    ]
    lines += reproduce_lines(student, args)
    if family.kind == "sd3":
        lines += [("**Note:** StableDiffusion3Pipeline does not hand `generator` to the scheduler's step, so the "
                  "re-noising between steps draws from torch's global RNG: seed it with `torch.manual_seed` (and pass "
                  "no generator) to reproduce an image; with seed s this gives flashdmd's sampler's image for seed s."),
                  ""]
    if not facts["exact"]:
        lines += [(f"**Note:** `num_inference_steps={student.nfe}` alone does not reproduce the student's timesteps "
                  f"(the scheduler gives {facts['set_timesteps_gives']}); pass {facts['call_kwargs']} as above."), ""]
    if family.kind == "sd3" and student.text.t5 is None:
        lines += ["**Note:** trained without T5 (`model.use_t5=false`: the T5 slot holds zeros). `text_encoder_3` is "
                  "a one-layer placeholder whose output is exactly zero, so the pipeline sees what the student saw."
                  + (f" This tiny preset's T5 slot has {kwargs['max_sequence_length']} tokens: pass "
                     "max_sequence_length as above." if "max_sequence_length" in kwargs else ""), ""]
    results = _latest_eval(src.run_dir)
    lines += ["## Metrics", ""]
    if results:
        lines += [f"Evaluation at step {results['step']} on `{results['prompts']}` ({results['num_images']} images):",
                  "", results["table"]]
    else:
        lines += ["Not evaluated yet (`python jobs/submit.py eval`).", ""]
    saved = src.run_dir / "config.yaml"  # the run's own resolved config, as training wrote it
    config_text = saved.read_text() if saved.is_file() else yaml.safe_dump(to_dict(cfg), sort_keys=False)
    lines += ["## Training config", "", f"From `{saved if saved.is_file() else 'the export config'}`:", "",
              "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def export_pipeline(cfg: Config, source: str | Path, out_dir: str | Path, weights: str = "") -> Path:
    """Write the student of ``source`` (run dir, ``final/`` or step dir) as a diffusers pipeline folder;
    ``weights``: the generator's ema or raw tensors ("" -> ema when the source has them)."""
    import diffusers

    out = Path(out_dir)
    student = load_student(cfg, source, "cpu", weights)
    family = student.extras["family_spec"]
    engine = LocalEngine("cpu")
    engine.setup({"generator": student.generator}, {"generator": OptimSpec(lr=1e-8)}, {})
    staging = out.parent / f".{out.name}.generator"
    export_full_weights(engine, "generator", staging)
    _, model = find_diffusers_model(student.generator)
    denoiser = type(model).from_pretrained(staging)
    shutil.rmtree(staging)

    teacher_sched = Path(student.extras["teacher_dir"]) / "scheduler" / "scheduler_config.json"
    teacher_config = json.loads(teacher_sched.read_text()) if teacher_sched.is_file() else {}
    scheduler, facts = student_scheduler(student.schedule, student.timesteps, teacher_config)
    facts["scheduler"] = type(scheduler).__name__
    facts["note"] = ("num_inference_steps reproduces the student's timesteps" if facts["exact"] else
                     f"the pipeline call must pass {facts['call_kwargs']} to reproduce the student's timesteps")
    if not facts["exact"]:
        log.warning("export: %s.set_timesteps(%d) gives %s, not the student's %s; the model card tells callers to "
                    "pass %s", facts["scheduler"], student.nfe, facts["set_timesteps_gives"], student.timesteps,
                    facts["call_kwargs"])
    pipe = getattr(diffusers, family.pipeline_class)(**_components(student, denoiser, scheduler))
    pipe.to(DTYPES[cfg.export.dtype])
    pipe.save_pretrained(out, safe_serialization=True, variant=cfg.export.variant or None)
    kwargs = call_kwargs(student, facts)
    (out / "README.md").write_text(model_card(cfg, student, facts, kwargs))
    (out / EXPORT_META).write_text(json.dumps({
        "family": family.name, "step": student.source.step, "source": str(student.source.folder),
        "student_timesteps": student.timesteps, "scheduler": facts["scheduler"], "exact": facts["exact"],
        "set_timesteps_gives": facts["set_timesteps_gives"], "call_kwargs": kwargs, "dtype": cfg.export.dtype,
        "variant": cfg.export.variant, "weights": student.source.weights}, indent=1))
    umask_modes(out)
    log.info("exported %s (step %d) to %s: %s", family.name, student.source.step, out, facts["note"])
    return out


def default_out_dir(cfg: Config, source: str | Path, weights: str = "") -> Path:
    src = find_student(source, weights)
    return src.run_dir / "export" / (f"step-{src.step:08d}" + ("-ema" if src.weights == "ema" else ""))


def main(cfg: Config, job: str = "export", weights: str = "") -> Path | None:
    """Launcher entry: rank 0 exports ``export.source`` (or the training run, ``sampling.default_source``)
    to ``export.out_dir`` (or ``<run>/export/step-N``)."""
    def body(ctx: DistContext) -> Path | None:
        if not ctx.is_main:
            return None
        source = cfg.export.source or default_source(cfg, job)
        return export_pipeline(cfg, source, cfg.export.out_dir or default_out_dir(cfg, source, weights), weights)

    return on_ranks(cfg, body)


def cli(argv: list[str] | None = None) -> int:
    parser = app_parser("export", "Export a trained student as a diffusers pipeline folder.")
    parser.add_argument("--source", default="", help="run dir, final/ folder or checkpoint step dir")
    parser.add_argument("--out", default="", help="output folder (default <run>/export/step-N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="", help="saved weights' dtype (export.dtype)")
    parser.add_argument("--variant", default="", help="file-name variant, e.g. fp16 (export.variant)")
    add_weights_flag(parser)
    args, cfg = parse_app_args(parser, argv)
    cfg.export.source = args.source or cfg.export.source
    cfg.export.out_dir = args.out or cfg.export.out_dir
    cfg.export.dtype = args.dtype or cfg.export.dtype
    cfg.export.variant = args.variant or cfg.export.variant
    return exit_code("export", lambda: main(cfg, "export", args.weights), lambda out: f"pipeline in {out}")


if __name__ == "__main__":
    sys.exit(cli())
