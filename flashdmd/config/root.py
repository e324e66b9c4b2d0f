"""The root of the config tree, and the one ``validate`` that checks all of it.

``validate`` reports, all at once and one line each, every leaf outside its field's limits
(rules.py), every violated rule of a section (its ``validate`` method) and every violated
cross-section rule (cross.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from flashdmd.config.apps import EvalConfig, ExportConfig, SampleConfig
from flashdmd.config.cross import validate_cross
from flashdmd.config.data import DataConfig
from flashdmd.config.engine import EngineConfig, HealthConfig
from flashdmd.config.errors import ConfigError
from flashdmd.config.model import ModelConfig
from flashdmd.config.rules import Rules, Scope, field_problems, setting
from flashdmd.config.run import CheckpointConfig, LaunchConfig, TrackingConfig
from flashdmd.config.stages import Stage1Config, Stage2Config
from flashdmd.config.synth import SynthConfig

NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-=@")


@dataclass
class Config:
    name: str = setting("", max_len=128)  # run name; "" -> "<preset>-<job>"; the run directory is <run_root>/<name>
    seed: int = setting(0, ge=0)
    run_root: str = setting("runs", min_len=1)
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
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self, rules: Scope) -> None:
        rules.check(set(self.name) <= NAME_CHARS and self.name not in (".", ".."), "name",
                    "must be a plain directory name (no '/'): letters, digits and . _ + - = @")

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


def _section_rules(obj: object, rules: Rules, prefix: str) -> None:
    """Each section's own ``validate``, then its subsections', depth first."""
    if hasattr(obj, "validate"):
        obj.validate(rules.scope(prefix, prefix or "root"))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _section_rules(value, rules, f"{prefix}.{f.name}" if prefix else f.name)


def check_rules(cfg: Config, origins: dict[str, str] | None = None) -> Rules:
    """Every section and cross-section rule checked on ``cfg``; the result lists each rule's id and every violation."""
    rules = Rules(cfg, origins)
    _section_rules(cfg, rules, "")
    validate_cross(cfg, rules.scope("", "cross"))
    return rules


def validate(cfg: Config, origins: dict[str, str] | None = None) -> Config:
    """Check every field's limits and every rule; raise one ConfigError listing all violations."""
    rules = check_rules(cfg, origins)
    problems = field_problems(cfg, origins or {}) + [message for _, message in rules.failed]
    if problems:
        raise ConfigError(problems, [rule for rule, _ in rules.failed])
    return cfg
