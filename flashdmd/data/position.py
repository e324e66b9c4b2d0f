"""Where one rank stands in its data stream: the state a checkpoint saves so a resumed run neither
replays nor skips data (DESIGN.md, "one checkpoint = ... per-rank data position").

The stream of a rank is endless and cut into epochs of ``data.epoch_length`` batches. Batch number
``g`` (counted over the whole run) comes from logical worker ``g % workers``; the position keeps,
per logical worker, how many shuffled raw samples that worker had used up to the last batch the
trainer consumed (``raw``). Two modes (``data.resampled``):

- deterministic (``resampled=false``): resuming fast-forwards every logical worker over ``raw[l]``
  raw samples without decoding them, so the resumed stream is exactly the uninterrupted one. This
  needs the same world size and worker count as before (checked).
- resampled (``resampled=true``): resuming bumps ``restart``, which is folded into every seed, so the
  resumed stream is a fresh draw rather than a replay of what was consumed (the webdataset
  maintainers' recommendation; research note anchors_jobsystem.md section 3). World size and worker
  count may change.

The position is a plain JSON-serialisable dict (``state_dict`` / ``from_state_dict``).

At another world size (a requeued job on fewer or more nodes), the old ranks' positions are
re-split (``resplit_streams``): new rank r takes over the counters of old ranks r, r + W', ...
(samples, bad items, items seen: totals are kept), every rank keeps the common batch count (so
epochs and the worker round-robin stay aligned), and the streams are fresh draws (``restart``
bumped, as at every resampled resume). Per-rank cursors cannot be carried to another split, and
with resampled shards there is no replay to be exact about; the deterministic mode would skip or
repeat up to a pass, so it refuses and names the fix.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from flashdmd.data.bad_samples import DataError

log = logging.getLogger("flashdmd.data")


@dataclass
class DataPosition:
    mode: str = "resampled"  # "resampled" | "deterministic"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # logical workers: max(1, data.workers)
    restart: int = 0  # incremented at every resume; folded into the seeds in resampled mode
    batches: int = 0  # batches this rank consumed over the whole run
    samples: int = 0  # samples this rank consumed over the whole run
    raw: list[int] = field(default_factory=list)  # per logical worker: shuffled raw samples used
    bad: dict[str, int] = field(default_factory=dict)  # bad items per reason, over the whole run
    seen: int = 0  # items read over the whole run (good + bad)

    def epoch(self, epoch_length: int) -> int:
        return self.batches // epoch_length

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataPosition:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise DataError(f"data position state has unknown keys {sorted(unknown)}; expected {sorted(names)}")
        pos = cls(**{k: v for k, v in state.items()})
        pos.raw = [int(r) for r in pos.raw]
        pos.bad = {str(k): int(v) for k, v in pos.bad.items()}
        return pos

    def resumed(self, mode: str, seed: int, rank: int, world_size: int, workers: int) -> DataPosition:
        """The position a new loader starts from when continuing from this saved one."""
        if self.rank != rank:
            raise DataError(f"data position belongs to rank {self.rank}, not rank {rank}: each rank resumes its own position")
        if mode != self.mode:
            raise DataError(f"data position was saved in {self.mode} mode but data.resampled selects {mode} mode")
        nxt = dataclasses.replace(self, restart=self.restart + 1, bad=dict(self.bad), raw=list(self.raw))
        if mode == "deterministic":
            if (self.world_size, self.workers, self.seed) != (world_size, workers, seed):
                raise DataError(
                    "an exact (deterministic) data resume needs the same world size, data.workers and seed: saved "
                    f"world_size={self.world_size} workers={self.workers} seed={self.seed}, now "
                    f"world_size={world_size} workers={workers} seed={seed}; set data.resampled=true to resume anyway"
                )
            return nxt
        nxt.seed, nxt.world_size, nxt.workers, nxt.raw = seed, world_size, workers, [0] * workers
        return nxt

    @classmethod
    def start(cls, mode: str, seed: int, rank: int, world_size: int, workers: int) -> DataPosition:
        return cls(mode=mode, seed=seed, rank=rank, world_size=world_size, workers=workers, raw=[0] * workers)


def resplit(saved: list[DataPosition], rank: int, world_size: int) -> DataPosition:
    """Rank ``rank``'s position among ``world_size`` ranks from every saved rank's position."""
    if not saved:
        raise DataError("no saved data positions to re-split")
    if any(pos.mode != "resampled" for pos in saved):
        raise DataError(
            f"the checkpoint's data positions were written by {len(saved)} ranks in deterministic mode; an exact "
            f"resume on {world_size} ranks is impossible (each rank's shard split changes). Resume on {len(saved)} "
            "ranks, or set data.resampled=true"
        )
    mine = saved[rank::world_size]
    bad: dict[str, int] = {}
    for pos in mine:
        for reason, n in pos.bad.items():
            bad[reason] = bad.get(reason, 0) + n
    first = saved[0]
    return DataPosition(
        mode=first.mode, seed=first.seed, rank=rank, world_size=world_size, workers=first.workers,
        restart=max(pos.restart for pos in saved), batches=max(pos.batches for pos in saved),
        samples=sum(pos.samples for pos in mine), raw=[0] * first.workers, bad=bad, seen=sum(pos.seen for pos in mine),
    )


def resplit_streams(states: list[dict[str, Any] | None], rank: int, world_size: int) -> dict[str, Any]:
    """Re-split a stream-name -> position state dict (one per saved rank) for ``rank`` of ``world_size``."""
    present = [s or {} for s in states]
    out = {}
    for stream in sorted({k for s in present for k in s}):
        pos = resplit([DataPosition.from_state_dict(s[stream]) for s in present], rank, world_size)
        out[stream] = pos.state_dict()
        if rank == 0:
            log.info("data stream %r: positions of %d ranks re-split for %d ranks; fresh resampled draws from "
                     "here (restart %d), sample counters carried over", stream, len(present), world_size, pos.restart)
    return out
