"""How a config field states its own limits, and how every limit and rule is checked.

Two kinds of checks, both reported together, one line each:

- per field: ``setting(default, ge=..., lt=..., max_len=..., item=...)`` declares a field's
  range beside it; ``field_problems`` checks every leaf of the tree against its declaration plus
  the limits every field has (floats finite, numbers and texts of sane size), so NaN, inf, a
  5000-character name or a batch of 10**12 never reach a run;
- per section and across sections: each section's ``validate(rules)`` calls ``rules.check(holds,
  keys, rule)`` for each rule that relates several fields. Every rule is checked unconditionally
  (a condition goes into ``holds``), so the set of rule ids is the same for every config and the
  test suite can check that each one has a case that violates it.

A message names the keys, the rule, the fix (where not obvious) and where each value came from
(a YAML file, the command line or the defaults).
"""
from __future__ import annotations

import copy
import functools
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

MAX_INT = 2**31 - 1  # no count, size or step of a run is larger
MAX_FLOAT = 1e15  # no rate, scale, bound or duration is larger in magnitude
MAX_TEXT = 4096  # PATH_MAX: the longest path or URL a field may hold
MAX_ITEMS = 4096


@dataclass(frozen=True)
class Bound:
    """A field's limits: numbers in [ge|gt, le|lt], texts/lists of min_len..max_len, list items by ``item``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int = 0
    max_len: int | None = None
    item: Bound | None = None
    why: str = ""


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, min_len: int = 0, max_len: int | None = None, item: Bound | None = None,
            why: str = "") -> Any:
    """A dataclass field with its limits; list and dict defaults are copied for each instance."""
    meta = {"bound": Bound(ge, gt, le, lt, min_len, max_len, item, why)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def fields_of(cls: type) -> dict[str, tuple[Any, Bound]]:
    """name -> (type, bound) of a config dataclass (cached: resolving the hints is slow)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("bound", Bound())) for f in dataclasses.fields(cls)}


def get(root: Any, key: str) -> Any:
    """The value of dotted ``key`` in the tree ``root``."""
    value = root
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def origin_of(origins: dict[str, str], key: str) -> str:
    """Where the value of ``key`` (or the section/mapping holding it) was set; the defaults when nowhere."""
    parts = key.split("[")[0].split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return origins[".".join(parts[:n])]
    return "the defaults"


def _number_problem(value: float, bound: Bound) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    sides = (("ge", ">=", lambda b: value < b), ("gt", ">", lambda b: value <= b),
             ("le", "<=", lambda b: value > b), ("lt", "<", lambda b: value >= b))
    wrong = [f"{sign} {getattr(bound, name):g}" for name, sign, bad in sides
             if getattr(bound, name) is not None and bad(getattr(bound, name))]
    if wrong:
        return "must be " + " and ".join(wrong)
    limit = MAX_INT if isinstance(value, int) else MAX_FLOAT
    return f"must be at most {limit:g} in magnitude" if abs(value) > limit else ""


def value_problem(value: Any, bound: Bound) -> str:
    """What is wrong with one leaf value under ``bound`` ("" when nothing)."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, (int, float)):
        return _number_problem(value, bound)
    if isinstance(value, (str, list, dict)):
        size, unit = len(value), "characters" if isinstance(value, str) else "entries"
        longest = bound.max_len or (MAX_TEXT if isinstance(value, str) else MAX_ITEMS)
        if size < bound.min_len:
            return "must not be empty" if bound.min_len == 1 else f"must have at least {bound.min_len} {unit}"
        if size > longest:
            return f"must have at most {longest} {unit} (got {size})"
    return ""


def _leaf_problems(value: Any, bound: Bound, key: str) -> list[tuple[str, str, Any]]:
    """(key, problem, value) for a leaf and, for lists and mappings, each of its entries."""
    found = [(key, problem, value)] if (problem := value_problem(value, bound)) else []
    if isinstance(value, list):
        for i, entry in enumerate(value):
            found += _leaf_problems(entry, bound.item or Bound(), f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, entry in value.items():
            found += _leaf_problems(entry, bound.item or Bound(), f"{key}.{name}")
    return found


def field_problems(obj: Any, origins: dict[str, str], prefix: str = "") -> list[str]:
    """Every leaf of dataclass tree ``obj`` checked against its field's limits, one message each."""
    messages = []
    for name, (_, bound) in fields_of(type(obj)).items():
        key, value = f"{prefix}{name}", getattr(obj, name)
        if dataclasses.is_dataclass(value):
            messages += field_problems(value, origins, f"{key}.")
            continue
        for where, problem, bad in _leaf_problems(value, bound, key):
            why = f" ({bound.why})" if bound.why and where == key else ""
            messages.append(f"{where} {problem}{why}; got {_short(bad)} from {origin_of(origins, key)}")
    return messages


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


class Rules:
    """Checks of rules that relate fields; collects each rule's id and every violation."""

    def __init__(self, root: Any, origins: dict[str, str] | None = None) -> None:
        self.root, self.origins = root, origins or {}
        self.ids: list[str] = []
        self.failed: list[tuple[str, str]] = []  # (rule id, message)

    def scope(self, prefix: str, name: str = "") -> Scope:
        """Checks of the section at ``prefix``; rule ids read ``<name or prefix>#<n>``."""
        return Scope(self, prefix, name or prefix)


class Scope:
    """``Rules`` seen from one section: keys are relative to ``prefix`` ("" for cross-section rules)."""

    def __init__(self, rules: Rules, prefix: str, name: str) -> None:
        self.rules, self.prefix, self.name, self.count = rules, prefix, name, 0

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def check(self, holds: bool, keys: str | tuple[str, ...], rule: str, fix: str = "") -> None:
        """Record the rule; when it does not hold, a message naming ``keys`` (the first leads the rule)."""
        self.count += 1
        rule_id = f"{self.name}#{self.count}"
        self.rules.ids.append(rule_id)
        if holds:
            return
        names = [self.key(k) for k in ((keys,) if isinstance(keys, str) else keys)]
        got = ", ".join(f"{k}={_short(get(self.rules.root, k))} from {origin_of(self.rules.origins, k)}" for k in names)
        self.rules.failed.append((rule_id, f"{names[0]} {rule}{f' ({fix})' if fix else ''}; got {got}"))
