"""Pre-submission checks of what a job will read, so a bad job fails before it is queued (and in
``--dry-run``), not on the cluster an hour later.

``validate`` (flashdmd/config/root.py) checks types, ranges and rules; this module checks the
file system and the things only a job knows: local model folders (teacher, VAE, text encoders,
SAM, LRM, metric weights) exist, are folders and hold the components the family loads; the
training shards (``flashdmd.data.check_shards``); prompt files and FID references; for a
stage-2 job, that ``stage2.init_from`` is set, holds a finished stage-1 hand-over and that
hand-over fits this config (family, student timesteps, LoRA), that the student has an RL
transition and a real family has its reward model; and in flash mode with neither step list,
that the SNR rule (spec 1.3) gives some step the DM loss. Whether a value is a hub id or a
local path is decided by flashdmd/config/sources.py, the rule the model loader uses too; hub
ids and remote or ``pipe:`` URLs are not probed (there may be no network where jobs are
submitted). ``preflight`` raises one ConfigError listing every problem, one line each.
"""
from __future__ import annotations

import json
from pathlib import Path

from flashdmd.config import Config, ConfigError
from flashdmd.config.sources import is_local_path, local_path

TRAINING_JOBS = ("stage1", "stage2", "pipeline")


def _path_problem(key: str, value: str, what: str, folder: bool | None) -> str | None:
    """None when ``value`` names an existing path of the right kind (``folder``: True, False or None = either)."""
    path = local_path(value)
    if not path.exists():
        return f"{key}={value!r}: {what} does not exist"
    if folder is True and not path.is_dir():
        return f"{key}={value!r}: is a file, but {what} must be a folder"
    if folder is False and path.is_dir():
        return f"{key}={value!r}: is a folder, but {what} must be a file"
    return None


def _model_problems(cfg: Config) -> list[str | None]:
    """Local model folders: present, folders, with the components the family loads (hub ids are not probed)."""
    model = cfg.model
    problems: list[str | None] = []
    sources = [("model.teacher", model.teacher, ""), ("model.vae", model.vae, "config.json"),
               ("model.sam", model.sam, "config.json"), ("model.reward_model", model.reward_model, "unet"),
               *((f"model.text_encoders[{i}]", v, "config.json") for i, v in enumerate(model.text_encoders)),
               *((f"eval.weights.{m}", v, "") for m, v in cfg.eval.weights.items())]
    for key, value, needs in sources:
        if not value or not is_local_path(value):
            continue
        problem = _path_problem(key, value, "this local model folder", folder=True)
        if problem is None and needs and not (local_path(value) / needs).exists():
            problem = f"{key}={value!r}: the folder has no {needs}; expected the component's from_pretrained folder"
        problems.append(problem)
    if model.teacher and is_local_path(model.teacher) and local_path(model.teacher).is_dir():
        problems.append(_teacher_layout(cfg))
    return problems


def _teacher_layout(cfg: Config) -> str | None:
    """A local teacher folder is the family's diffusers pipeline, with the subfolders this config reads."""
    from flashdmd.nets.families import get_family
    from flashdmd.nets.load import LayoutError, check_pipeline_folder

    family = get_family(cfg.model.family)
    need = [family.denoiser_folder] + ([] if cfg.model.vae else ["vae"])
    if not cfg.model.text_encoders:
        need += [*family.text_folders]
    need += [f.replace("text_encoder", "tokenizer") for f in family.text_folders]
    need += ["text_encoder_3", "tokenizer_3"] if cfg.model.use_t5 else []
    try:
        check_pipeline_folder(local_path(cfg.model.teacher), family, need)
    except LayoutError as err:
        return str(err)
    return None


def _split_problem(cfg: Config) -> str | None:
    """Flash mode with neither step list: the SNR rule of algo/split.py must give some step the DM loss."""
    s1 = cfg.stage1
    if s1.mode != "flash" or s1.dm_steps or s1.gan_steps:
        return None
    from flashdmd.algo.split import split_steps

    if cfg.model.family == "gmm2d":
        from flashdmd.nets.gmm2d import gmm_schedule

        schedule = gmm_schedule(cfg)
    else:
        from flashdmd.nets.families import get_family

        schedule = get_family(cfg.model.family).schedule(cfg.model.prediction_type)
    try:
        split_steps(s1, schedule)
    except ValueError as err:
        return str(err)
    return None


def _stage2_problems(cfg: Config, init_from_pending: bool) -> list[str | None]:
    """What stage 2 needs beyond stage 1: a stage-1 hand-over that fits, an RL transition, a reward model."""
    s2, family = cfg.stage2, cfg.model.family
    problems: list[str | None] = []
    if len(cfg.stage1.student_timesteps) < 2:
        problems.append(f"stage1.student_timesteps={cfg.stage1.student_timesteps}: stage 2 needs a student of 2 or "
                        "more steps (an RL transition t -> t_next, spec 2.3)")
    if family in ("sd15", "sdxl", "sd3") and not cfg.model.reward_model:
        problems.append(f"model.reward_model is empty: stage 2 of model.family={family} needs the latent reward "
                        "model's weights (spec 2.2); set model.reward_model to its folder or hub id")
    if init_from_pending:
        return problems
    if not s2.init_from:
        problems.append("stage2.init_from is empty: stage 2 starts from a finished stage-1 run (spec 2.1); set "
                        "stage2.init_from=<stage-1 run directory>, or submit the 'pipeline' job")
        return problems
    from flashdmd.train.handoff import META, find_handoff

    try:
        folder = find_handoff(s2.init_from)
    except FileNotFoundError as err:
        return problems + [str(err)]
    problems.append(_handoff_fit(cfg, folder / META))
    return problems


def _handoff_fit(cfg: Config, meta_path: Path) -> str | None:
    """The stage-1 hand-over was written by a run this config can continue (flashdmd/train/handoff.py)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        return f"stage2.init_from={cfg.stage2.init_from!r}: unreadable {meta_path.name} ({err})"
    mine = {"family": cfg.model.family, "student_timesteps": cfg.stage1.student_timesteps,
            "lora": cfg.model.lora.enabled}
    keys = {"family": "model.family", "student_timesteps": "stage1.student_timesteps", "lora": "model.lora.enabled"}
    differ = [f"{keys[k]}={v!r} but stage 1 ran with {meta[k]!r}" for k, v in mine.items() if k in meta and meta[k] != v]
    if differ:
        return f"stage2.init_from={cfg.stage2.init_from!r} does not fit this config: " + "; ".join(differ)
    return None


def _data_problems(cfg: Config) -> list[str | None]:
    from flashdmd.data import DataError, check_shards

    problems: list[str | None] = []
    try:
        check_shards(cfg)
    except DataError as err:
        problems.append(str(err))
    prompts = cfg.data.prompts
    if prompts and ":" not in prompts.split("/", 1)[0] and not any(c in prompts for c in "{*?"):
        problems.append(_path_problem("data.prompts", prompts, "the prompt file", folder=None))
    return problems


def preflight_problems(cfg: Config, job: str, init_from_pending: bool = False) -> list[str]:
    """Every problem of ``job`` under ``cfg`` that the config alone cannot show, one message each.

    ``init_from_pending``: stage 2 of a pipeline, whose ``stage2.init_from`` stage 1 has yet to write."""
    problems = _model_problems(cfg)
    if job in TRAINING_JOBS:
        problems.append(_split_problem(cfg))
        if cfg.model.family != "gmm2d":
            problems += _data_problems(cfg)
    if job == "stage2":
        problems += _stage2_problems(cfg, init_from_pending)
    if job == "synth" and not cfg.synth.prompts:
        problems.append("synth.prompts is empty: the synth job needs a text/JSONL prompt file or prompt shards")
    for key, value, folder in (("eval.prompts", cfg.eval.prompts, False),
                               ("eval.reference_images", cfg.eval.reference_images, None),
                               ("sample.prompts_file", cfg.sample.prompts_file, False),
                               ("synth.prompts", cfg.synth.prompts, None),
                               ("synth.pipeline", cfg.synth.pipeline, True),
                               ("synth.filter_weights", cfg.synth.filter_weights, None)):
        if value and is_local_path(value) and not any(c in value for c in "{*?"):
            what = {False: "this file", True: "this local folder", None: "this path"}[folder]
            problems.append(_path_problem(key, value, what, folder))
    return [p for p in problems if p]


def preflight(cfg: Config, job: str) -> None:
    """Raise ConfigError listing every problem of ``job``; call before submitting it."""
    preflight_all([(job, cfg)])


def preflight_all(configs: list[tuple[str, Config]]) -> None:
    """``preflight`` for the (job, config) list of jobs/submit.py, stage 2 of a pipeline after its stage 1."""
    problems = []
    for i, (job, cfg) in enumerate(configs):
        pending = job == "stage2" and any(earlier == "stage1" for earlier, _ in configs[:i])
        problems += [f"{job}: {p}" if len(configs) > 1 else p for p in preflight_problems(cfg, job, pending)]
    if problems:
        raise ConfigError(problems, title="the job would fail")
