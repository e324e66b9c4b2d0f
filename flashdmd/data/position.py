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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flashdmd.data.bad_samples import DataError


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
