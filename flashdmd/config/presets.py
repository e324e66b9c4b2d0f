"""Finding and reading preset YAML files, and following their ``base:`` chains.

A file is read strictly and never raises anything but ConfigError naming the file: bytes that
are not UTF-8, an unreadable file or a folder, invalid YAML, a key given twice in one mapping
(YAML would silently keep the last one), a document that is not a mapping, and a ``base:`` that
is not a string. A ``base`` is resolved relative to the file that names it (``sibling.yaml``,
``./sibling.yaml``, ``../x/y.yaml``) or, for a bare name, looked up next to that file and then
among the project's presets; an error in a base says which chain of files led to it.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from flashdmd.config.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "jobs" / "configs"
DEFAULT_PRESET = "tiny-sdxl"
SUFFIXES = (".yaml", ".yml")


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed: 20x faster
    """yaml's safe loader that refuses a key given twice in one mapping."""


def _strict_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first[key] + 1}); YAML would keep "
                    "only the last one, so remove one of them", key_node.start_mark)
            first[key] = key_node.start_mark.line
        except TypeError:
            break  # an unhashable key: the safe constructor's own check below names it
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


MAX_DEPTH = 100  # flow collections nested deeper than this are refused before parsing: libyaml's
# parser recurses in C and crashes the process on a few ten thousand levels


def _flow_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def parse_yaml(text: str) -> Any:
    """One YAML document, duplicate keys refused; raises yaml.YAMLError or RecursionError."""
    if _flow_depth(text) > MAX_DEPTH:
        raise yaml.YAMLError(f"brackets nested more than {MAX_DEPTH} levels deep")
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- a safe loader subclass


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(err, "problem", None) or str(err)
    return where + " ".join(f"{getattr(err, 'context', None) or ''} {problem}".split())


def read_yaml(path: Path, label: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path``; errors start with ``label`` (the file and its chain)."""
    if path.is_dir():
        raise ConfigError(f"{label}: is a folder, not a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{label}: cannot read it ({err.strerror or type(err).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "save the file as UTF-8") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{label}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{label}: not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping at the top level (section: {{key: value}}), "
                          f"got a {type(data).__name__}")
    return data


def _preset_names(search_dir: Path) -> list[str]:
    return sorted(p.stem for p in search_dir.glob("*.yaml"))


def preset_path(name_or_path: str, search_dir: Path = PRESET_DIR, folder: Path | None = None) -> Path:
    """A preset name (``sdxl-4step``) or a YAML path as a file, or a ConfigError saying what exists.

    ``folder``: the folder of the file naming it as its base; paths are relative to it, and a
    bare name is looked up there before ``search_dir`` and the project's presets."""
    if Path(name_or_path).suffix in SUFFIXES or "/" in name_or_path:
        path = Path(name_or_path).expanduser()
        path = folder / path if folder is not None and not path.is_absolute() else path
        if path.is_file():
            return path
        raise ConfigError(f"config file '{path}' {'is a folder' if path.is_dir() else 'does not exist'}")
    for where in dict.fromkeys(([folder] if folder is not None else []) + [search_dir, PRESET_DIR]):
        if (where / f"{name_or_path}.yaml").is_file():
            return where / f"{name_or_path}.yaml"
    names = _preset_names(search_dir)
    close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown preset '{name_or_path}'{hint} (presets in {search_dir}: {', '.join(names)})")


def _label(chain: tuple[Path, ...]) -> str:
    """A file, and when it is a base the files that led to it: 'b.yaml (base of a.yaml -> m.yaml)'."""
    if len(chain) == 1:
        return str(chain[0])
    return f"{chain[-1]} (base of {' -> '.join(str(p) for p in chain[:-1])})"


def load_chain(path: Path, search_dir: Path = PRESET_DIR,
               chain: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(label, data) of the preset and its bases, base first."""
    chain = chain + (path,)
    if path.resolve() in {p.resolve() for p in chain[:-1]}:
        raise ConfigError(f"base presets form a cycle: {' -> '.join(str(p) for p in chain)}")
    label = _label(chain)
    data = read_yaml(path, label)
    if "base" not in data:
        return [(label, data)]
    base = data.pop("base")
    if base is None:
        return [(label, data)]
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{label}: base must be a preset name or a YAML path (a non-empty string), "
                          f"got {base!r} ({type(base).__name__})")
    try:
        base_path = preset_path(base.strip(), search_dir, path.parent)
    except ConfigError as err:
        raise ConfigError(f"{label}: base '{base}': {err}") from None
    return load_chain(base_path, search_dir, chain) + [(label, data)]
