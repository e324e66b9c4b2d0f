"""Generic loading of the config tree: defaults <- YAML preset (and its bases) <- key=value overrides.

Plain data (YAML, override strings) is converted leaf by leaf to each field's declared type;
every unknown key, wrong type and out-of-range value in every file and override is reported at
once, each line naming where it came from. An unknown key names the closest valid key, or the
section that has a key of that name. Overrides reach every leaf, entries of mapping-valued
fields included (``eval.weights.clip_score=/weights/clip``, ``tracking.tags.team=vision``).
The resolved config dumps to YAML that loads back identically (``to_yaml`` / ``from_yaml``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from flashdmd.config.errors import ConfigError
from flashdmd.config.presets import DEFAULT_PRESET, PRESET_DIR, load_chain, parse_yaml, preset_path
from flashdmd.config.root import Config, validate
from flashdmd.config.rules import fields_of

COMMAND_LINE = "the command line"


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
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + "..."
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {shown} ({type(value).__name__})")
    if origin is Literal:
        if isinstance(value, (list, dict)) or value not in typing.get_args(tp):
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
        return {_coerce(k, key_tp, f"{where} (a key)"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
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


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _homes(name: str, obj: Any = None, prefix: str = "") -> list[str]:
    """Every full key of the tree whose last part is ``name`` (a key given in the wrong section)."""
    obj = Config() if obj is None else obj
    found = []
    for field_name in fields_of(type(obj)):
        value = getattr(obj, field_name)
        if field_name == name:
            found.append(_join(prefix, field_name))
        if dataclasses.is_dataclass(value):
            found += _homes(name, value, _join(prefix, field_name))
    return found


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    homes = [h for h in _homes(key) if h != _join(where, key)]
    if homes:
        hint = f"; '{key}' is in {' and '.join(repr(h.rsplit('.', 1)[0] if '.' in h else 'the top level') for h in homes)}" \
               f": did you mean '{homes[0]}'?"
    else:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"; did you mean '{_join(where, close[0])}'?" if close else f"; valid keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{_join(where, key)}'{hint}")


def _merge_into(obj: Any, data: Any, origin: str, origins: dict[str, str], errors: list[str], where: str = "") -> None:
    """Set the fields of dataclass instance ``obj`` from nested plain ``data``; collect every problem."""
    if not isinstance(data, dict):
        errors.append(f"{origin}: {where or 'config'}: expected a mapping (key: value), got {data!r}")
        return
    hints = fields_of(type(obj))
    for key, value in data.items():
        if key not in hints:
            errors.append(f"{origin}: {_unknown_key(str(key), list(hints), where)}")
            continue
        full, current = _join(where, key), getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, origin, origins, errors, full)
            continue
        try:
            setattr(obj, key, _coerce(value, hints[key][0], full))
            origins[full] = origin
        except ConfigError as err:
            errors.append(f"{origin}: {err}")


def _value_for(raw: str, tp: Any) -> Any:
    """Override strings: YAML scalars/lists for typed fields, the raw text for strings."""
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return raw
    try:
        return parse_yaml(raw)
    except (yaml.YAMLError, RecursionError):
        return raw


def apply_override(cfg: Config, item: str, origins: dict[str, str] | None = None) -> None:
    """Apply one ``section.key=value`` (or ``section.mapping.entry=value``) override in place."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    path = dotted.strip().split(".")
    origins = {} if origins is None else origins
    obj: Any = cfg
    where = ""
    for i, key in enumerate(path):
        hints = fields_of(type(obj))
        if key not in hints:
            raise _unknown_key(key, list(hints), where)
        where, tp, current, rest = _join(where, key), hints[key][0], getattr(obj, key), path[i + 1:]
        if dataclasses.is_dataclass(current):
            if not rest:
                raise ConfigError(f"'{where}' is a section; set one of its keys, e.g. {where}.<key>=...")
            obj = current
            continue
        if typing.get_origin(tp) is dict and len(rest) == 1:  # one entry of a mapping-valued field
            key_tp, val_tp = typing.get_args(tp)
            entry = _coerce(rest[0], key_tp, f"{where} (a key)")
            setattr(obj, key, {**current, entry: _coerce(_value_for(raw, val_tp), val_tp, f"{where}.{entry}")})
            origins[f"{where}.{entry}"] = COMMAND_LINE
            return
        if rest:
            kind = f"a mapping; set one entry with {where}.<name>=..." if typing.get_origin(tp) is dict else "a value"
            raise ConfigError(f"'{where}' is {kind}, not a section; it has no key '{'.'.join(rest)}'")
        setattr(obj, key, _coerce(_value_for(raw, tp), tp, where))
        origins[where] = COMMAND_LINE


def load_config(
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | tuple[str, ...] = (),
    search_dir: Path = PRESET_DIR,
    check: bool = True,
) -> Config:
    """Defaults <- preset (and its bases) <- overrides, then validated.

    Raises one ConfigError listing every problem, each naming the file (or the command line),
    the key, the value and the rule.
    """
    cfg, origins, errors = Config(), {}, []
    for label, data in load_chain(preset_path(preset, search_dir), search_dir):
        _merge_into(cfg, data, label, origins, errors)
    for item in overrides:
        try:
            apply_override(cfg, item, origins)
        except ConfigError as err:
            errors.append(f"{COMMAND_LINE}: {err}")
    if errors:
        raise ConfigError(errors)
    return validate(cfg, origins) if check else cfg


def default_run_name(preset: str, job: str) -> str:
    """``name`` when the config leaves it empty: the preset's name and the job, e.g. sdxl-4step-stage1."""
    return f"{Path(preset).stem}-{job}"


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg, errors = Config(), []
    _merge_into(cfg, data, "config", {}, errors)
    if errors:
        raise ConfigError(errors)
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
