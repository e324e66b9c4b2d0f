"""Prompt lists for stage 2 (RL prompts) and evaluation, and a resumable prompt batch iterator.

``load_prompts`` reads plain text (one prompt a line), JSONL (``{"prompt": ...}`` or
``{"caption": ...}`` per line, or a JSON string per line) or prompt-only shards (captions of any
shard pattern, see flashdmd.data.format). Prompts are small, so they live in memory and the
iterator's position is exact arithmetic, with the semantics of the image loader
(flashdmd.data.position): deterministic mode splits a seeded permutation per pass between ranks
(every rank gets ``len(prompts) // world_size`` per pass, the rest of the pass is left out so ranks
stay equal) and resumes exactly; resampled mode draws with replacement and folds the restart count
into the seed.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from flashdmd.config import Config, ConfigError
from flashdmd.data.bad_samples import BadSamples, DataError
from flashdmd.data.format import caption_of
from flashdmd.data.position import DataPosition
from flashdmd.data.shards import expand_shards, read_shard


def _is_shard_pattern(path: str) -> bool:
    return "{" in path or "::" in path or path.startswith("pipe:") or ".tar" in path or Path(path).is_dir()


def _prompt_of_json_line(line: str, where: str) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}); JSONL prompt files hold one object per line") from None
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for name in ("prompt", "caption", "text"):
            if isinstance(item.get(name), str):
                return item[name]
    raise DataError(f"{where}: expected a string or an object with a 'prompt' or 'caption' field, got {line[:80]!r}")


def cycled_prompts(path: str, count: int, key: str) -> list[str]:
    """``count`` prompts of ``path`` (0: each prompt once), a shorter list cycled; ``key`` names the
    config key that sets ``path`` in the error when it is empty."""
    if not path:
        raise ConfigError(f"{key} is empty: give a text/JSONL prompt file (e.g. from data_tools/make_prompts.py) "
                        "or prompt shards")
    prompts = load_prompts(path)
    return [prompts[i % len(prompts)] for i in range(count or len(prompts))]


def load_prompts(path: str) -> list[str]:
    """Prompts of a text/JSONL file or of shard captions, stripped, empty ones dropped, order kept."""
    if not path:
        raise DataError("no prompt file given: set data.prompts (or eval.prompts) to a .txt/.jsonl file or shards")
    if _is_shard_pattern(path):
        bad = BadSamples(where=f"prompts {path}")
        prompts = []
        for url in expand_shards(path):
            for raw in read_shard(url, bad, lambda ext: ext in ("txt", "json")):
                try:
                    prompts.append(caption_of(raw.files))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    bad.bad("missing_caption", raw.key, raw.shard)
    else:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"prompt file {path} does not exist; make one with data_tools/make_prompts.py")
        lines = file.read_text(encoding="utf-8").splitlines()
        if file.suffix in (".jsonl", ".json"):
            prompts = [_prompt_of_json_line(line, f"{path}:{i + 1}") for i, line in enumerate(lines) if line.strip()]
        else:
            prompts = lines
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


class PromptLoader:
    """Endless batches (list[str] of ``batch_size``) of one rank; ``iter`` yields the rest of the epoch."""

    def __init__(self, prompts: list[str], batch_size: int, epoch_length: int, position: DataPosition):
        self.prompts, self.batch_size, self.epoch_length, self.position = prompts, batch_size, epoch_length, position
        self.per_pass = len(prompts) // position.world_size
        self._perm: tuple[int, list[int]] = (-1, [])
        restart = () if position.mode == "deterministic" else (position.restart,)
        self._rng = random.Random(":".join(map(str, ("prompts", position.seed, *restart, position.rank))))

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator[list[str]]:
        for _ in range(self.epoch_length - self.position.batches % self.epoch_length):
            start = self.position.samples
            batch = [self.prompts[self._index(start + i)] for i in range(self.batch_size)]
            self.position.batches += 1
            self.position.samples += self.batch_size
            yield batch

    def _index(self, sample: int) -> int:
        pos = self.position
        if pos.mode == "resampled":
            return self._rng.randrange(len(self.prompts))
        epoch, offset = divmod(sample, self.per_pass)
        if self._perm[0] != epoch:
            perm = list(range(len(self.prompts)))
            random.Random(f"prompts:{pos.seed}:{epoch}").shuffle(perm)  # one permutation shared by all ranks
            self._perm = (epoch, perm[pos.rank :: pos.world_size][: self.per_pass])
        return self._perm[1][offset]


def build_prompt_loader(
    cfg: Config,
    rank: int,
    world_size: int,
    position: DataPosition | None = None,
    path: str | None = None,
    batch_size: int | None = None,
) -> PromptLoader:
    """Prompt batches for ``rank``: from ``path``, else ``data.prompts``, else the captions of ``data.shards``."""
    source = path or cfg.data.prompts or cfg.data.shards
    prompts = load_prompts(source)
    mode = "resampled" if cfg.data.resampled else "deterministic"
    if len(prompts) < world_size:
        raise DataError(f"{source} holds {len(prompts)} prompts, fewer than the {world_size} ranks")
    if position is None:
        pos = DataPosition.start(mode, cfg.seed, rank, world_size, 1)
    else:
        pos = position.resumed(mode, cfg.seed, rank, world_size, 1)
    return PromptLoader(prompts, batch_size or cfg.data.batch_size, cfg.data.epoch_length, pos)
