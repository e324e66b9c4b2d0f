"""Build image + caption WebDataset shards (format: flashdmd/data/format.py).

Sources:
- an image folder with caption sidecars: ``x.jpg`` + ``x.txt`` (or ``x.json`` with a ``caption``),
  searched recursively;
- a manifest: CSV, JSONL or parquet with an image path column (``path``, ``image`` or ``file``;
  relative paths are taken from the manifest's folder) and a ``caption`` (or ``text``) column.

    python data_tools/make_shards.py IMAGES_OR_MANIFEST OUT_DIR [--maxcount 1000] [--maxsize 1e9]
                                     [--prefix train] [--workers 4]

Images already in jpg/png/webp are stored byte for byte; other formats are re-encoded to png.
Samples whose image does not open or that have no caption are skipped and reported. Reading and
checking runs in ``--workers`` processes; writing is sequential, so shards and keys are
deterministic (key = zero-padded index of the sample in the sorted source).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webdataset import ShardWriter  # noqa: E402

READ_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
IMAGE_SUFFIXES = set(READ_AS_IS) | {".bmp", ".gif", ".tif", ".tiff"}


def folder_items(folder: Path) -> list[tuple[str, str | None]]:
    """(image path, caption or None) for every image under ``folder``, sorted; captions from sidecars."""
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = None
        if path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        elif path.with_suffix(".json").is_file():
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            caption = meta.get("caption") if isinstance(meta, dict) else None
        items.append((str(path), caption))
    return items


def manifest_items(manifest: Path) -> list[tuple[str, str | None]]:
    """(image path, caption) rows of a CSV / JSONL / parquet manifest."""
    import pandas as pd

    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
    if manifest.suffix not in readers:
        raise SystemExit(f"{manifest}: manifests must be .csv, .jsonl or .parquet")
    table = readers[manifest.suffix](manifest)
    path_col = next((c for c in ("path", "image", "file") if c in table.columns), None)
    caption_col = next((c for c in ("caption", "text") if c in table.columns), None)
    if path_col is None or caption_col is None:
        raise SystemExit(f"{manifest}: needs a path/image/file column and a caption/text column, has {list(table.columns)}")
    items = []
    for path, caption in zip(table[path_col], table[caption_col]):
        full = Path(str(path)) if Path(str(path)).is_absolute() else manifest.parent / str(path)
        items.append((str(full), caption if isinstance(caption, str) else None))
    return items


def load_sample(item: tuple[int, str, str | None]) -> dict[str, Any] | tuple[str, str, str]:
    """A shard sample dict, or (reason, source, detail) when the item must be skipped."""
    index, path, caption = item
    if not caption or not caption.strip():
        return ("missing_caption", path, "no caption sidecar or column")
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            ext = READ_AS_IS.get(Path(path).suffix.lower())
            if ext is None:
                buffer = io.BytesIO()
                img.convert("RGB").save(buffer, format="PNG")
                data, ext = buffer.getvalue(), "png"
    except Exception as err:  # unreadable file or undecodable image: skip it, report why
        return ("corrupt_image", path, repr(err))
    meta = {"width": width, "height": height, "source": path, "caption": caption.strip()}
    return {"__key__": f"{index:08d}", ext: data, "txt": caption.strip(), "json": meta}


def write_shards(samples: Iterable[dict[str, Any]], out: Path, prefix: str = "shard", maxcount: int = 1000,
                 maxsize: float = 1e9) -> list[str]:
    """Write sample dicts (webdataset layout: ``__key__`` + extension -> value) into numbered shards."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    writer = ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0,
                         post=written.append)
    with writer:
        for sample in samples:
            writer.write(sample)
    return written


def make_shards(source: Path, out: Path, prefix: str = "shard", maxcount: int = 1000, maxsize: float = 1e9,
                workers: int = 1, progress: bool = True) -> tuple[list[str], Counter]:
    """Shards from a folder or manifest; returns (shard paths, skipped samples per reason)."""
    items = folder_items(source) if source.is_dir() else manifest_items(source)
    if not items:
        raise SystemExit(f"{source}: no images found")
    skipped: Counter = Counter()
    jobs = [(i, path, caption) for i, (path, caption) in enumerate(items)]

    def good(results: Iterable[Any]) -> Iterator[dict[str, Any]]:
        for result in tqdm(results, total=len(jobs), unit="img", disable=not progress):
            if isinstance(result, tuple):
                skipped[result[0]] += 1
                print(f"skipping {result[1]}: {result[0]} ({result[2]})", file=sys.stderr)
            else:
                yield result

    if workers > 1:
        with Pool(workers) as pool:
            shards = write_shards(good(pool.imap(load_sample, jobs, chunksize=16)), out, prefix, maxcount, maxsize)
    else:
        shards = write_shards(good(map(load_sample, jobs)), out, prefix, maxcount, maxsize)
    return shards, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="image folder with caption sidecars, or a .csv/.jsonl/.parquet manifest")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--workers", type=int, default=1, help="processes reading and checking images")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.source.exists():
        parser.error(f"{args.source} does not exist")
    shards, skipped = make_shards(args.source, args.out, args.prefix, args.maxcount, args.maxsize, args.workers,
                                  not args.no_progress)
    print(f"wrote {len(shards)} shards to {args.out}; skipped {sum(skipped.values())} {dict(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
