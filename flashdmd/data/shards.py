"""Shard URLs and tar reading: expand a pattern, check it before training, stream samples out of one tar.

The reader is a small tar grouper in the spirit of webdataset's ``tar_file_expander`` +
``group_by_keys`` (it uses webdataset's ``gopen`` for local paths, ``pipe:`` and http URLs). It is
our own because the bad-sample policy needs to know *which* shard and key failed and *why*: an
unopenable URL, a tar that ends inside a member (the samples before the cut are kept, the cut one is
dropped), or a non-tar file. webdataset's handlers only see the exception.
"""
from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from flashdmd.config import Config
from flashdmd.data.bad_samples import BadSamples, DataError
from flashdmd.data.format import split_member_name

log = logging.getLogger("flashdmd.data")


@dataclass
class RawSample:
    """One sample's members, undecoded: extension -> bytes."""

    key: str
    shard: str
    files: dict[str, bytes] = field(default_factory=dict)


def _is_local(url: str) -> bool:
    return ":" not in url.split("/", 1)[0] or url.startswith("file:")


def _is_glob(part: str) -> bool:
    return any(c in part for c in "*?[")


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns, ``::``-joined lists, a directory (its ``*.tar``), local globs (``runs/data/*.tar``,
    expanded and sorted, as a shell would) or ``pipe:`` URLs -> URL list.

    A glob that matches no file contributes nothing (``check_shards`` then names the pattern); a
    remote or ``pipe:`` URL is never globbed: ``*`` and ``?`` are legal in a URL or a command.
    """
    urls: list[str] = []
    for part in expand_urls(pattern) if pattern.strip() else []:
        part = part.strip()
        if part and _is_local(part) and _is_glob(part):
            prefix = "file:" if part.startswith("file:") else ""
            urls.extend(prefix + p for p in sorted(glob.glob(part.removeprefix("file:"))) if Path(p).is_file())
        elif part and _is_local(part) and Path(part).is_dir():
            urls.extend(sorted(str(p) for p in Path(part).glob("*.tar*")))
        elif part:
            urls.append(part)
    return urls


def check_shards(cfg: Config, pattern: str | None = None) -> list[str]:
    """The shard URLs of ``cfg.data.shards`` (or ``pattern``); fails before training if there are none.

    Raises DataError naming the pattern when it is empty, expands to nothing, or every local file it
    names is missing. Some missing local files are only warned about: at run time they count as
    ``unreadable_shard``. Remote and ``pipe:`` URLs are not probed.
    """
    pattern = cfg.data.shards if pattern is None else pattern
    if not pattern.strip():
        raise DataError("data.shards is empty: set it to the training shards, e.g. data.shards=/data/train-{000000..000099}.tar")
    urls = expand_shards(pattern)
    if not urls:
        raise DataError(
            f"data.shards={pattern!r} matches no shard file (an empty directory, or a glob that matches nothing?); "
            "build shards with data_tools/make_shards.py or fix the path"
        )
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not Path(u.removeprefix("file:")).is_file()]
    if local and len(missing) == len(local) == len(urls):
        raise DataError(
            f"data.shards={pattern!r}: none of its {len(urls)} shard files exist (first: {missing[0]}); "
            "build shards with data_tools/make_shards.py or fix the path"
        )
    if missing:
        log.warning("data.shards=%r: %d of %d shard files are missing (first: %s)", pattern, len(missing), len(urls), missing[0])
    return urls


def _rest_of(stream) -> int:
    """Bytes left after the header loop stopped. tarfile stops silently both at the end-of-archive
    zero blocks and at a plain end of file; only a complete tar has its second zero block (and
    usually record padding) left to read, so 0 here means the file was cut at a block boundary."""
    total = 0
    while chunk := stream.read(1 << 16):
        total += len(chunk)
    return total


def read_shard(url: str, bad: BadSamples, wanted: Callable[[str], bool] | None = None) -> Iterator[RawSample]:
    """Yield the samples of one tar shard; report an unreadable or truncated shard to ``bad``.

    ``wanted(ext)`` selects the members whose bytes are kept (the latent pipeline never keeps image
    bytes). Consecutive members with the same key form a sample, as in webdataset; a key that comes
    back after another one (a tar written in directory order) stops the shard as ``ungrouped_tar``.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as err:  # any failure to open (missing file, bad scheme) is the shard's fault
        bad.bad("unreadable_shard", "-", url, repr(err))
        return
    current: RawSample | None = None
    members = samples = 0
    done: set[str] = set()  # keys already started: a repeat means the tar is not grouped by sample
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                members += 1
                if not member.isreg():
                    continue
                key, ext = split_member_name(member.name.removeprefix("./"))
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                if current is not None and key != current.key:
                    samples += 1
                    yield current
                    current = None
                if current is None:
                    if key in done:
                        bad.bad("ungrouped_tar", key, url, "members of one sample are not adjacent; write the tar with `tar --sort=name`")
                        return
                    done.add(key)
                    current = RawSample(key=key, shard=url)
                if wanted is None or wanted(ext):
                    current.files[ext] = tar.extractfile(member).read()
            if members and not _rest_of(tar.fileobj):
                raise tarfile.ReadError("the tar ends without its end-of-archive blocks (cut at a block boundary)")
        if current is not None:
            samples += 1
            yield current
        elif samples == 0:
            # an empty tar is not an error to tarfile, but a stream of them would never yield a batch
            bad.bad("unreadable_shard", "-", url, "the tar holds no samples")
    except (tarfile.TarError, OSError, EOFError) as err:
        if members == 0:
            bad.bad("unreadable_shard", "-", url, repr(err))
        else:
            bad.bad("truncated_tar", current.key if current else "-", url, repr(err))
    finally:
        try:
            stream.close()
        except OSError:
            pass
