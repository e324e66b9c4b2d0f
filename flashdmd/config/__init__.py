"""The run configuration: one dataclass tree, loaded as defaults <- YAML preset <- key=value overrides.

This file is the single source of truth for every setting of a run (DESIGN.md, "config" layer).
Loading order:

1. the dataclass defaults below,
2. a YAML preset from ``jobs/configs/`` (or any YAML path); a preset may name a ``base`` preset,
   which is merged first, recursively,
3. dotted ``section.key=value`` overrides from the command line, coerced to the field's type.

Everything is validated before anything runs: unknown keys name the closest valid key, wrong
types name the key and the expected type, and cross-field rules (``validate``) report every
violated rule at once.  The resolved config dumps to YAML that loads back identically.

Values marked [INF] in comments are inferred defaults, not paper values; see
``../shared/research/flashdmd_spec.md`` section 6 for the reasoning behind each one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "jobs" / "configs"
DEFAULT_PRESET = "tiny-sdxl"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key, file or rule."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 64  # [INF] spec 6 #12: rank 64 on attention + MLP for SD3-Medium
    alpha: float = 64.0
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    )


@dataclass
class GMMConfig:
    """The exact 2-D toy world (DESIGN.md, toy world 1); ignored by image families."""

    num_modes: int = 8
    radius: float = 4.0  # modes on a circle unless ``means`` is given
    means: list[list[float]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # empty -> uniform
    std: float = 0.3
    reward_mode: int = 0  # stage-2 toy reward: closeness to this mode
    teacher_steps: int = 3000  # pretraining iterations of the teacher MLP
    hidden: int = 256


@dataclass
class ModelConfig:
    family: str = "tiny-sdxl"  # sd15 | sdxl | sd3 | tiny-sd15 | tiny-sdxl | tiny-sd3 | gmm2d
    teacher: str = ""  # local diffusers folder or hub id; "" -> the family's default
    revision: str = ""
    vae: str = ""  # "" -> the teacher's own VAE subfolder
    text_encoders: list[str] = field(default_factory=list)  # "" -> the teacher's subfolders
    use_t5: bool = False  # SD3 only; T5 is large and can be left out
    sam: str = ""  # SAM vision encoder for the Pixel-GAN discriminator (spec 1.8)
    sam_taps: list[int] = field(default_factory=list)  # [] -> 4 evenly spaced blocks [INF]
    reward_model: str = ""  # latent reward model (LRM) weights for stage 2 (spec 2.2)
    prediction_type: Literal["", "epsilon", "v_prediction", "flow"] = ""  # "" -> family default
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    cache_dir: str = ""  # where tiny presets write their save_pretrained folders; "" -> run_root
    lora: LoraConfig = field(default_factory=LoraConfig)
    gmm: GMMConfig = field(default_factory=GMMConfig)


@dataclass
class DataConfig:
    shards: str = ""  # WebDataset URLs: brace pattern, local paths or pipe: commands
    latent_shards: bool = False  # shards carry precomputed VAE latents (no image decoding)
    prompts: str = ""  # text/JSONL prompt list for generator inputs; "" -> shard captions
    resolution: int = 64
    batch_size: int = 2  # per rank
    real_batch_size: int = 0  # per rank, real images for the discriminator; 0 -> batch_size
    workers: int = 0
    shuffle_buffer: int = 100
    resampled: bool = True  # resampled shards with an epoch length: equal batches on every rank
    epoch_length: int = 1000  # batches per epoch per rank (both modes; equal on every rank)
    aspect_buckets: bool = False
    max_bad_fraction: float = 0.05  # abort when more than this fraction of samples is bad
    bad_check_after: int = 100  # the bad fraction is judged once this many samples were read (per worker)
    latent_shape: list[int] = field(default_factory=list)  # [C, h, w] of shard latents; [] -> C of the first, h = w = resolution / 8


@dataclass
class Stage1Config:
    """Timestep-aware distillation (spec section 1)."""

    mode: Literal["flash", "dmd2"] = "flash"  # dmd2 = the baseline: both losses on every step
    student_timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])  # spec 1.2
    dm_steps: list[int] = field(default_factory=list)  # [] -> SNR(t) <= 1 [INF] (spec 1.3; flashdmd/algo/split.py)
    gan_steps: list[int] = field(default_factory=list)  # [] -> SNR(t) > 1 [INF]
    gan_input: Literal["rollout_to_zero", "rollout_state"] = "rollout_to_zero"  # spec 1.4 step 4
    ttur: int = 1  # fake-score/D updates per generator update (spec 1.6)
    fake_ema: bool = True  # Algorithm 1 line 18 (spec 1.7)
    fake_ema_decay: float = 0.999  # [INF] spec 6 #2
    real_guidance_scale: float = 8.0  # [INF] spec 6 #9 (DMD2 SDXL value)
    fake_guidance_scale: float = 1.0
    dmd_noise_min: float = 0.02  # DMD re-noise range as a fraction of T [INF] spec 6 #6
    dmd_noise_max: float = 0.98
    dm_weight: float = 1.0
    gan_weight: float = 5e-3  # lambda_adv [INF] spec 6 #3
    gan_loss: Literal["hinge", "nonsaturating"] = "hinge"  # spec 1.8
    generator_lr: float = 1e-6  # [INF] spec 6 #1
    fake_lr: float = 1e-6
    disc_lr: float = 1e-5
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 500
    grad_clip: float = 10.0
    iterations: int = 1000  # total training steps (spec 6 #19: counted as DMD2 does)


@dataclass
class Stage2Config:
    """Joint preference RL with continuing distillation (spec section 2)."""

    init_from: str = ""  # stage-1 run directory, checkpoint step directory or export folder
    rl_transitions: list[list[int]] = field(default_factory=lambda: [[999, 749], [749, 499]])
    num_candidates: int = 4  # K (spec 2.3)
    beta: float = 500.0  # [INF] spec 6 #14 (LPO)
    ratio_clip: float = 0.1
    threshold: float = 0.6  # [INF] spec 6 #13; 0 = no filtering
    rl_per_dm: int = 5  # RL generator updates per distillation generator update (spec 2.5)
    distill: bool = True  # False = RL only (the reward-hacking baseline)
    rl_lr: float = 0.0  # 0 -> stage1.generator_lr
    rl_batch_size: int = 0  # prompts per RL update per rank; 0 -> data.batch_size
    iterations: int = 2000


@dataclass
class EngineConfig:
    kind: Literal["local", "fsdp", "deepspeed"] = "local"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute dtype; masters stay fp32
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    teacher_sharding: Literal["replicate", "zero3"] = "replicate"
    collective_timeout_s: int = 600


@dataclass
class HealthConfig:
    """Training health: non-finite steps and monitor bounds (flashdmd/train/guard.py, health.py)."""

    max_consecutive_nonfinite: int = 3  # this many non-finite steps in a row trigger on_nonfinite
    on_nonfinite: Literal["rollback", "stop"] = "rollback"  # back to the last valid checkpoint, or stop the run
    rollback_lr_factor: float = 0.5  # every learning rate is multiplied by this at each rollback
    max_rollbacks: int = 2  # past this many rollbacks the run stops
    monitors: bool = True  # health/* metrics at every tracking.log_every step
    monitor_batch: int = 8  # generator samples per monitor measurement
    fake_lag_max: float = 0.0  # warn above: fake-score denoising loss on fresh generator samples; 0 = no bound
    dm_grad_norm_max: float = 0.0  # warn above: generator gradient norm at a DM step; 0 = no bound
    d_logit_gap_max: float = 0.0  # warn above: |mean D(real) - mean D(fake)|; 0 = no bound
    latent_drift_max: float = 0.0  # warn above: |mean - mean_0| or |std / std_0 - 1| of generator samples; 0 = no bound
    diversity_min: float = 0.0  # stage 2, warn below: mean pairwise distance of samples for one prompt; 0 = no bound


@dataclass
class LaunchConfig:
    executor: Literal["auto", "slurm", "local"] = "auto"
    nodes: int = 1
    gpus_per_node: int = 1  # one task per GPU; on CPU the number of processes per node
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0 -> the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_minutes: int = 240
    signal_lead_s: int = 120  # Slurm sends USR1 this long before the time limit
    max_requeues: int = 3


@dataclass
class TrackingConfig:
    uri: str = ""  # "" -> MLflow's embedded SQLite store under the run root
    experiment: str = "flashdmd"
    run_name: str = ""  # "" -> the run's name
    tags: dict[str, str] = field(default_factory=dict)
    log_every: int = 10
    sample_every: int = 100
    sample_prompts: list[str] = field(
        default_factory=lambda: ["a photo of a cat", "a red car on a street", "a bowl of fruit"]
    )


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" -> <run_dir>/checkpoints
    every: int = 100
    keep_last: int = 3


@dataclass
class EvalConfig:
    prompts: str = ""  # text/JSONL prompt file
    num_images: int = 0  # 0 -> every prompt once
    metrics: list[str] = field(default_factory=lambda: ["clip_score"])
    reference_images: str = ""  # folder or shards for FID
    weights: dict[str, str] = field(default_factory=dict)  # metric -> local folder or hub id; absent -> its default
    every: int = 0  # watch job: evaluate checkpoints whose step is a multiple of N (0: every checkpoint it sees)
    seed: int = 10  # DMD2's COCO-10k seed (spec 6 #21)
    source: str = ""  # run dir, its final/ hand-over or a checkpoint step dir; "" -> the run dir
    out_dir: str = ""  # results (table, images) go to <out_dir>/step-<N>; "" -> <source run dir>/eval
    batch_size: int = 4  # images per generator call per rank
    method: str = ""  # the row name in the results table; "" -> "Flash-DMD <family> (step N)"
    save_images: bool = False  # also write every generated image under out_dir/images
    poll_s: float = 60.0  # watcher: seconds between looks at the checkpoint directory
    watch_timeout_s: float = 0.0  # watcher: stop after this long without a new checkpoint; 0 = until the run's hand-over
    teacher_steps: int = 0  # > 0: the eval job adds the teacher's row (this many DDIM/Euler steps); 0 = no teacher row
    teacher_guidance: float = 0.0  # the teacher row's CFG scale; 0 -> stage1.real_guidance_scale


@dataclass
class SampleConfig:
    """The sample job: a few prompts -> an image grid and one file per image, fixed seeds."""

    source: str = ""  # run dir, its final/ hand-over or a checkpoint step dir; "" -> the run dir
    prompts: list[str] = field(default_factory=list)  # prompts given directly
    prompts_file: str = ""  # text/JSONL prompt file (used when prompts is empty)
    images_per_prompt: int = 1
    seed: int = 0  # image i (prompt-major order) uses seed + i
    batch_size: int = 4
    out_dir: str = ""  # "" -> <source run dir>/samples/step-<N>


@dataclass
class ExportConfig:
    """The export job: a trained student -> a diffusers pipeline folder (flashdmd/apps/export.py)."""

    source: str = ""  # run dir, its final/ hand-over or a checkpoint step dir; "" -> the run dir
    out_dir: str = ""  # "" -> <source run dir>/export/step-<N>


@dataclass
class Config:
    name: str = ""  # run name; "" -> "<preset>-<job>"; the run directory is <run_root>/<name>
    seed: int = 0
    run_root: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    engine: EngineConfig = field(default_factory=EngineConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def world_size(self) -> int:
        return self.launch.nodes * self.launch.gpus_per_node

    @property
    def tracking_uri(self) -> str:
        """The MLflow store: the configured server, else MLflow's SQLite store under the run root."""
        return self.tracking.uri or f"sqlite:///{Path(self.run_root).resolve() / 'mlflow.db'}"


# --------------------------------------------------------------------------------------------
# Typed conversion of plain data (YAML or override strings) into the tree
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``where`` and the type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise bad
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept any spelling Python reads as a number
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{_join(where, close[0])}'?" if close else f"; valid keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{_join(where, key)}'{hint}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _merge_into(obj: Any, data: dict[str, Any], where: str = "") -> None:
    """Set the fields of dataclass instance ``obj`` from nested plain ``data``, with type checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = _fields(type(obj))
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), list(hints), where)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, _join(where, key))
        else:
            setattr(obj, key, _coerce(value, hints[key], _join(where, key)))


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), raw


def _value_for(raw: str, tp: Any) -> Any:
    """Override strings: YAML scalars/lists for typed fields, the raw text for strings."""
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` override in place."""
    path, raw = _parse_override(item)
    obj: Any = cfg
    where = ""
    for i, key in enumerate(path):
        hints = _fields(type(obj))
        if key not in hints:
            raise _unknown_key(key, list(hints), where)
        where = _join(where, key)
        if i == len(path) - 1:
            if dataclasses.is_dataclass(getattr(obj, key)):
                raise ConfigError(f"'{where}' is a section; set one of its keys, e.g. {where}.<key>=...")
            setattr(obj, key, _coerce(_value_for(raw, hints[key]), hints[key], where))
        else:
            obj = getattr(obj, key)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"'{where}' is a value, not a section; it has no key '{path[i + 1]}'")


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def preset_path(name_or_path: str, search_dir: Path = PRESET_DIR) -> Path:
    """Resolve a preset name (``sdxl-4step``) or a YAML path to a file, or explain what exists."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate
        raise ConfigError(f"config file '{name_or_path}' does not exist")
    found = search_dir / f"{name_or_path}.yaml"
    if found.is_file():
        return found
    names = sorted(p.stem for p in search_dir.glob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown preset '{name_or_path}'{hint} (presets in {search_dir}: {', '.join(names)})")


def _base_path(base: str, folder: Path) -> Path:
    """A base is looked up next to the preset naming it, then among the project's presets."""
    try:
        return preset_path(base, folder)
    except ConfigError:
        return preset_path(base, PRESET_DIR)


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The preset and its bases, base first."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base presets form a cycle: {' -> '.join(str(p) for p in seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    chain: list[tuple[Path, dict[str, Any]]] = []
    if base:
        base_path = _base_path(base, path.parent)
        chain = _load_yaml_chain(base_path, seen + (path.resolve(),))
    return chain + [(path, data)]


def load_config(
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | tuple[str, ...] = (),
    search_dir: Path = PRESET_DIR,
    check: bool = True,
) -> Config:
    """Defaults <- preset (and its bases) <- overrides, then validated.

    Raises ConfigError naming the file and key for YAML problems, the key for override problems
    and every violated rule for cross-field problems.
    """
    cfg = Config()
    for path, data in _load_yaml_chain(preset_path(preset, search_dir)):
        try:
            _merge_into(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for item in overrides:
        apply_override(cfg, item)
    if check:
        validate(cfg)
    return cfg


def default_run_name(preset: str, job: str) -> str:
    """``name`` when the config leaves it empty: the preset's name and the job, e.g. sdxl-4step-stage1."""
    return f"{Path(preset).stem}-{job}"


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge_into(cfg, data)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml(text: str) -> Config:
    return config_from_dict(yaml.safe_load(text) or {})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (for MLflow params and diffs)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key != "tags":
            out.update(flatten(value, _join(prefix, key)))
        else:
            out[_join(prefix, key)] = value
    return out


def diff(cfg: Config, reference: Config) -> dict[str, tuple[Any, Any]]:
    """Leaves whose value differs: key -> (reference value, value)."""
    a, b = flatten(to_dict(reference)), flatten(to_dict(cfg))
    return {k: (a.get(k), v) for k, v in b.items() if a.get(k) != v}


# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def _rules(cfg: Config) -> list[tuple[bool, str]]:
    """(holds, message) pairs; each message names the keys involved and the rule."""
    s1, s2, data, launch = cfg.stage1, cfg.stage2, cfg.data, cfg.launch
    steps = s1.student_timesteps
    transitions_ok = all(
        len(pair) == 2 and pair[0] in steps and pair[1] in steps and steps.index(pair[1]) == steps.index(pair[0]) + 1
        for pair in s2.rl_transitions
    )
    return [
        (len(steps) >= 1, "stage1.student_timesteps must not be empty"),
        (all(0 <= t <= 1000 for t in steps), "stage1.student_timesteps must lie in [0, 1000]"),
        (all(a > b for a, b in zip(steps, steps[1:])), "stage1.student_timesteps must be strictly decreasing"),
        (set(s1.dm_steps) <= set(steps), "stage1.dm_steps must be among stage1.student_timesteps"),
        (set(s1.gan_steps) <= set(steps), "stage1.gan_steps must be among stage1.student_timesteps (the GAN step is a student step)"),
        (
            s1.mode == "dmd2" or not set(s1.dm_steps) & set(s1.gan_steps),
            "stage1.dm_steps and stage1.gan_steps must be disjoint in flash mode (spec 1.3: never both losses on one output)",
        ),
        (s1.ttur >= 1, "stage1.ttur must be >= 1 (fake-score updates per generator update)"),
        (0.0 <= s1.fake_ema_decay < 1.0, "stage1.fake_ema_decay must satisfy 0 <= decay < 1"),
        (0.0 <= s1.dmd_noise_min < s1.dmd_noise_max <= 1.0, "stage1.dmd_noise_min < stage1.dmd_noise_max, both in [0, 1]"),
        (s1.real_guidance_scale >= 0, "stage1.real_guidance_scale must be >= 0"),
        (s1.dm_weight >= 0 and s1.gan_weight >= 0, "stage1.dm_weight and stage1.gan_weight must be >= 0"),
        (min(s1.generator_lr, s1.fake_lr, s1.disc_lr) > 0, "stage1.generator_lr, fake_lr and disc_lr must be > 0"),
        (len(s1.adam_betas) == 2 and all(0 <= b < 1 for b in s1.adam_betas), "stage1.adam_betas must be two values in [0, 1)"),
        (s1.warmup_steps >= 0 and s1.grad_clip > 0, "stage1.warmup_steps >= 0 and stage1.grad_clip > 0"),
        (s1.iterations >= 1 and s2.iterations >= 1, "stage1.iterations and stage2.iterations must be >= 1"),
        (s2.num_candidates >= 2, "stage2.num_candidates (K) must be >= 2 to form a win/lose pair"),
        (transitions_ok, "stage2.rl_transitions must be pairs [t, t_next] of consecutive stage1.student_timesteps"),
        (s2.beta > 0, "stage2.beta must be > 0"),
        (0 < s2.ratio_clip < 1, "stage2.ratio_clip must lie in (0, 1)"),
        (0 <= s2.threshold < 1, "stage2.threshold must lie in [0, 1)"),
        (s2.rl_per_dm >= 0 and s2.rl_lr >= 0 and s2.rl_batch_size >= 0, "stage2.rl_per_dm, rl_lr and rl_batch_size must be >= 0"),
        (s2.distill or s2.rl_per_dm >= 1, "stage2.distill=false (RL only) needs stage2.rl_per_dm >= 1"),
        (
            data.resolution >= 8 and data.resolution % 8 == 0
            and len(data.latent_shape) in (0, 3) and all(d >= 1 for d in data.latent_shape),
            "data.resolution must be a positive multiple of 8 and data.latent_shape [] or [C, h, w] with positive sizes",
        ),
        (data.batch_size >= 1 and data.real_batch_size >= 0, "data.batch_size must be >= 1 and data.real_batch_size >= 0"),
        (data.workers >= 0 and data.shuffle_buffer >= 0 and data.epoch_length >= 1, "data.workers, data.shuffle_buffer >= 0 and data.epoch_length >= 1"),
        (
            0 <= data.max_bad_fraction <= 1 and data.bad_check_after >= 1,
            "data.max_bad_fraction must lie in [0, 1] and data.bad_check_after must be >= 1",
        ),
        (not cfg.model.lora.enabled or cfg.model.lora.rank >= 1, "model.lora.rank must be >= 1 when model.lora.enabled"),
        (cfg.model.gmm.num_modes >= 1 and cfg.model.gmm.std > 0, "model.gmm.num_modes >= 1 and model.gmm.std > 0"),
        (
            not cfg.model.gmm.weights or len(cfg.model.gmm.weights) == (len(cfg.model.gmm.means) or cfg.model.gmm.num_modes),
            "model.gmm.weights must have one entry per mode",
        ),
        (all(len(m) == 2 for m in cfg.model.gmm.means), "model.gmm.means must be 2-D points [x, y]"),
        (0 <= cfg.model.gmm.reward_mode < (len(cfg.model.gmm.means) or cfg.model.gmm.num_modes), "model.gmm.reward_mode must index a mode"),
        (launch.nodes >= 1 and launch.gpus_per_node >= 1, "launch.nodes and launch.gpus_per_node must be >= 1"),
        (launch.cpus_per_task >= 1 and launch.mem_gb >= 0, "launch.cpus_per_task >= 1 and launch.mem_gb >= 0"),
        (launch.time_minutes >= 1, "launch.time_minutes must be >= 1"),
        (0 <= launch.signal_lead_s < launch.time_minutes * 60, "launch.signal_lead_s must be >= 0 and shorter than launch.time_minutes"),
        (launch.max_requeues >= 0, "launch.max_requeues must be >= 0"),
        (cfg.engine.collective_timeout_s >= 1, "engine.collective_timeout_s must be >= 1"),
        (cfg.engine.kind != "local" or not (cfg.engine.offload_optimizer or cfg.engine.offload_params), "engine.offload_* needs engine.kind deepspeed or fsdp"),
        (cfg.health.max_consecutive_nonfinite >= 1 and cfg.health.max_rollbacks >= 0,
         "health.max_consecutive_nonfinite must be >= 1 and health.max_rollbacks >= 0"),
        (0 < cfg.health.rollback_lr_factor < 1, "health.rollback_lr_factor must lie in (0, 1)"),
        (
            cfg.health.monitor_batch >= 2 and min(cfg.health.fake_lag_max, cfg.health.dm_grad_norm_max, cfg.health.d_logit_gap_max,
                                                  cfg.health.latent_drift_max, cfg.health.diversity_min) >= 0,
            "health.monitor_batch must be >= 2 and the health bounds (*_max, diversity_min) >= 0 (0 = no bound)",
        ),
        (cfg.tracking.log_every >= 1 and cfg.tracking.sample_every >= 0, "tracking.log_every >= 1 and tracking.sample_every >= 0"),
        (cfg.checkpoint.every >= 1 and cfg.checkpoint.keep_last >= 1, "checkpoint.every and checkpoint.keep_last must be >= 1"),
        (
            cfg.eval.num_images >= 0 and cfg.eval.every >= 0 and cfg.eval.watch_timeout_s >= 0 and cfg.eval.poll_s > 0
            and min(cfg.eval.teacher_steps, cfg.eval.teacher_guidance) >= 0
            and min(cfg.eval.batch_size, cfg.sample.batch_size, cfg.sample.images_per_prompt) >= 1,
            "eval.num_images and eval.every must be >= 0 (and eval.watch_timeout_s, eval.teacher_steps, "
            "eval.teacher_guidance >= 0, eval.poll_s > 0, eval.batch_size, sample.batch_size and "
            "sample.images_per_prompt >= 1)",
        ),
        ("/" not in cfg.name and cfg.name not in (".", ".."), "name must be a plain directory name (no '/')"),
    ]


def validate(cfg: Config) -> Config:
    """Check every cross-field rule; raise one ConfigError listing all violations."""
    violations = [message for holds, message in _rules(cfg) if not holds]
    if violations:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(violations))
    return cfg
