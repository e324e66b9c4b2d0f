"""The run configuration: one dataclass tree, loaded as defaults <- YAML preset <- key=value overrides.

This package is the single source of truth for every setting of a run (DESIGN.md, "config"
layer). Where things are:

- one file per group of sections (model.py, data.py, stages.py, engine.py, run.py, apps.py),
  each dataclass with its fields' limits (``setting(..., ge=...)``) and its own ``validate``;
- root.py: the root ``Config`` and ``validate`` (every limit and rule, all violations at once);
- cross.py: the few rules that relate fields of different sections;
- rules.py: how limits and rules are declared and checked; errors.py: ``ConfigError``;
- presets.py: finding and strictly reading preset YAML files and their ``base:`` chains;
- loader.py: the generic load <- YAML <- overrides, dump, flatten and diff;
- sources.py: the one rule for "is this a hub id or a local path"; cli.py: the module CLIs' part.

Values marked [INF] in comments are inferred defaults, not paper values; see
``../shared/research/flashdmd_spec.md`` section 6 for the reasoning behind each one.
"""
from flashdmd.config.apps import EvalConfig, ExportConfig, SampleConfig
from flashdmd.config.data import DataConfig
from flashdmd.config.engine import EngineConfig, HealthConfig
from flashdmd.config.errors import ConfigError
from flashdmd.config.loader import (
    apply_override,
    config_from_dict,
    default_run_name,
    diff,
    flatten,
    from_yaml,
    load_config,
    to_dict,
    to_yaml,
)
from flashdmd.config.model import GMMConfig, LoraConfig, ModelConfig
from flashdmd.config.presets import DEFAULT_PRESET, PRESET_DIR, REPO_ROOT, preset_path
from flashdmd.config.root import Config, check_rules, validate
from flashdmd.config.run import CheckpointConfig, LaunchConfig, TrackingConfig
from flashdmd.config.stages import Stage1Config, Stage2Config

__all__ = [
    "DEFAULT_PRESET", "PRESET_DIR", "REPO_ROOT", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "EngineConfig", "EvalConfig", "ExportConfig", "GMMConfig", "HealthConfig", "LaunchConfig", "LoraConfig",
    "ModelConfig", "SampleConfig", "Stage1Config", "Stage2Config", "TrackingConfig", "apply_override",
    "check_rules", "config_from_dict", "default_run_name", "diff", "flatten", "from_yaml", "load_config",
    "preset_path", "to_dict", "to_yaml", "validate",
]
