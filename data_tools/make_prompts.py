"""Prompt lists (or prompt-only shards) from caption sources: deduplicated, seeded subsample.

    python data_tools/make_prompts.py SOURCE OUT [--num 10000] [--seed 10] [--per-shard 1000]

SOURCE: a text file (one caption a line), JSONL (``prompt``/``caption`` field), a COCO captions
file (``captions_val2014.json``: ``annotations[].caption``), a CSV with a ``caption``/``prompt``
column, caption shards, or an image folder with ``.txt`` caption sidecars. OUT: ``.txt`` (one prompt a line), ``.jsonl`` (``{"prompt": ...}``), or
a folder, which gets prompt-only shards (``prompts-000000.tar``...). Duplicates are dropped
ignoring case and whitespace (the first spelling is kept); ``--num`` draws that many with
``random.Random(seed)`` (e.g. a COCO-10k list in the manner of DMD2, whose evaluation uses seed
10; spec 6 #21), in the drawn order.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.make_shards import write_shards  # noqa: E402
from flashdmd.data.bad_samples import DataError  # noqa: E402
from flashdmd.data.prompts import load_prompts  # noqa: E402


def read_captions(source: str) -> list[str]:
    """Captions of any supported source, in file order (duplicates kept)."""
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return [a["caption"].strip() for a in data["annotations"] if isinstance(a.get("caption"), str)]
    if path.suffix == ".csv" and path.is_file():
        import pandas as pd

        table = pd.read_csv(path)
        column = next((c for c in ("caption", "prompt", "text") if c in table.columns), None)
        if column is None:
            raise SystemExit(f"{source}: needs a caption, prompt or text column, has {list(table.columns)}")
        return [str(c).strip() for c in table[column] if isinstance(c, str) and c.strip()]
    if path.is_dir() and not any(path.glob("*.tar*")):  # an image folder with caption sidecars
        return [t.read_text(encoding="utf-8").strip() for t in sorted(path.rglob("*.txt"))]
    return load_prompts(source)


def dedupe(prompts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for prompt in prompts:
        norm = " ".join(prompt.lower().split())
        if norm and norm not in seen:
            seen.add(norm)
            out.append(" ".join(prompt.split()))
    return out


def make_prompts(source: str, out: Path, num: int = 0, seed: int = 10, per_shard: int = 1000) -> list[str]:
    """Write the deduplicated (and, with ``num``, subsampled) prompts to ``out``; return them."""
    prompts = dedupe(read_captions(source))
    if num:
        if num > len(prompts):
            raise SystemExit(f"--num {num} exceeds the {len(prompts)} distinct prompts of {source}")
        prompts = random.Random(seed).sample(prompts, num)
    if out.suffix == ".txt":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    elif out.suffix == ".jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    else:
        samples = ({"__key__": f"{i:08d}", "txt": p} for i, p in enumerate(prompts))
        write_shards(samples, out, "prompts", maxcount=per_shard)
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="captions: .txt, .jsonl, COCO captions .json, .csv, or shards")
    parser.add_argument("out", type=Path, help=".txt, .jsonl, or a folder for prompt shards")
    parser.add_argument("--num", type=int, default=0, help="draw this many (0 = all)")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.num < 0 or args.per_shard < 1:
        parser.error("--num must be >= 0 and --per-shard >= 1")
    try:
        prompts = make_prompts(args.source, args.out, args.num, args.seed, args.per_shard)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(prompts)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
