"""The bad-input policy: skip, count per reason, log with key and shard, abort past a fraction.

Every sample or shard the pipeline cannot use is reported to a ``BadSamples`` tally with one of
the ``REASONS`` below, the sample key and the shard URL. The tally logs the first few cases of
each reason at WARNING (then at DEBUG, so a broken dataset does not flood the job log) and keeps
the counts the trainer logs to MLflow (``loader.bad_counts()``).

Counts are per distinct bad item (shard, key, reason): the next epoch reading the same broken
sample again skips it silently (DEBUG) and counts neither it nor the read, so the counts say how
many samples are broken, not how often they were met, and the bad fraction is the dataset's.
(A resumed process starts a new tally: re-reads after a resume are counted once more.) With
``FLASHDMD_BAD_SAMPLES`` set to a file, each distinct bad item is appended to it as a JSON line
(reason, key, shard, detail, stream); the trainer sets it to ``<run_dir>/bad_samples.jsonl`` and
uploads the de-duplicated list (``recorded_bad_samples``) to MLflow.

The abort rule: once ``bad_check_after`` items (samples and unreadable shards) were read, a bad
fraction above ``data.max_bad_fraction`` raises ``DataError`` naming the commonest reason and
the last shard it came from. A stream that has read ``bad_check_after`` items without a single
good one aborts too, whatever the threshold, because it would otherwise spin forever.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("flashdmd.data")

REASONS = (
    "unreadable_shard",  # the URL cannot be opened or is not a tar file at all
    "truncated_tar",  # the tar ends inside a member; the samples before it are kept
    "ungrouped_tar",  # a sample's members are not adjacent (plain `tar` without --sort=name); rest of shard skipped
    "missing_image",  # no jpg/jpeg/png/webp member
    "corrupt_image",  # the image bytes do not decode
    "missing_caption",  # no txt member, no caption in the json, or an empty caption
    "missing_latent",  # latent shards: no latent.npy / latent.safetensors member
    "corrupt_latent",  # the latent bytes do not decode, or hold NaN/inf
    "wrong_latent_shape",  # the latent is not [C, h, w] of the configured shape
)

SHARD_REASONS = ("unreadable_shard", "truncated_tar", "ungrouped_tar")  # about a shard (or its rest), not one sample
_LOGGED_PER_REASON = 5
RECORD_ENV = "FLASHDMD_BAD_SAMPLES"  # a JSONL file receiving each distinct bad item (every process appends)


class DataError(RuntimeError):
    """The input data cannot be used; the message names the pattern, shard or reason to fix."""


@dataclass
class BadSamples:
    """Counts of bad items per reason and of all items read, for one stream (rank or worker)."""

    max_fraction: float = 1.0
    check_after: int = 100
    where: str = ""  # e.g. "rank 0 worker 1", prefixed to log lines and errors
    counts: Counter = field(default_factory=Counter)
    seen: int = 0  # items read: samples decoded or rejected, plus unreadable shards
    good: int = 0
    last_shard: dict[str, str] = field(default_factory=dict)
    active: bool = True  # False while a resumed stream fast-forwards over already counted items
    events: list[tuple[str, str, str, str]] | None = None  # if a list: (reason, key, shard, detail) of each bad item
    distinct: set[tuple[str, str, str]] = field(default_factory=set)  # (shard, key, reason) counted so far

    def ok(self) -> None:
        if self.active:
            self.seen += 1
            self.good += 1

    def bad(self, reason: str, key: str, shard: str, detail: object = "") -> None:
        """Record one bad item; raise DataError when the abort rule fires."""
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {REASONS}")
        if not self.active:
            return
        item = (shard, key, reason)
        if item in self.distinct:  # met again (the next epoch): skipped, counted once
            log.debug("%sskipping a known bad input again: %s in %s (%s)", self._prefix(), key, shard, reason)
            return
        self.distinct.add(item)
        self.seen += 1
        self.counts[reason] += 1
        self.last_shard[reason] = shard
        if self.events is not None:
            self.events.append((reason, key, shard, str(detail)))
        _record({"reason": reason, "key": key, "shard": shard, "detail": str(detail), "stream": self.where})
        level = logging.WARNING if self.counts[reason] <= _LOGGED_PER_REASON else logging.DEBUG
        log.log(level, "%sskipping bad input (%s): key=%s shard=%s %s", self._prefix(), reason, key, shard, detail)
        self.check()

    def check(self) -> None:
        if self.seen < self.check_after:
            return
        bad = sum(self.counts.values())
        if self.good == 0 or bad / self.seen > self.max_fraction:
            reason, n = self.counts.most_common(1)[0]
            rule = (
                "not one good item" if self.good == 0 else f"{bad / self.seen:.1%} > data.max_bad_fraction={self.max_fraction}"
            )
            raise DataError(
                f"{self._prefix()}{bad} of {self.seen} input items are bad ({rule}); "
                f"commonest reason '{reason}' ({n}x), last seen in shard {self.last_shard[reason]}; "
                f"all reasons: {dict(self.counts)}. Fix or remove the shards (data_tools/inspect_shards.py lists them)."
            )

    def _prefix(self) -> str:
        return f"[{self.where}] " if self.where else ""


def _record(item: dict[str, str]) -> None:
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as handle:  # one short line per write: appends of processes do not interleave
            handle.write(json.dumps(item) + "\n")


def recorded_bad_samples(path: str | Path) -> list[dict[str, Any]]:
    """The distinct bad items of a ``FLASHDMD_BAD_SAMPLES`` file, by shard and key."""
    items: dict[tuple[str, str, str], dict[str, Any]] = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            items.setdefault((item["shard"], item["key"], item["reason"]), item)
    return [items[k] for k in sorted(items)]
