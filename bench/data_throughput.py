"""Samples per second of the data pipelines at the tiny default.

The image pipeline (tar -> PNG decode -> resize + center crop -> batch) and the precomputed-latent
pipeline (tar -> npy -> batch, no image decoding) of ``flashdmd.data.build_image_loader``, each with
0, 1 and 2 DataLoader workers, beside a plain loop that slices the same tensors held in memory (the
ceiling: what the trainer would see if data were free). Toy shards: make_toy_shards.py images at
the tiny preset's resolution with widths up to 1.5x (so every image is resized and cropped); the
latent shards hold [4, R/8, R/8] latents from a stand-in encoder (an 8x8 average pool: the bench
measures the loader, not a VAE). Steady-state throughput is timed from the first batch on; the
time to the first batch (worker start-up, shuffle-buffer fill) is reported apart.

Reading the numbers: at the tiny default (batch 2 of 64 px) a batch costs less to decode than to
pass through a worker queue, so workers lower throughput here; they pay off when decoding a batch
outweighs the queue hop (large images, big batches) and when the trainer's step runs in parallel
with them, which this loop does not measure. Timings on a shared CPU box vary with its load
(recorded in the JSON).

    python bench/data_throughput.py [--samples 512] [--batches 150] [--repeats 2]
    # writes bench/results/data_throughput.json and prints a table
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.encode_latents import encode_shard  # noqa: E402
from data_tools.make_toy_shards import make_toy_shards  # noqa: E402
from flashdmd.config import load_config  # noqa: E402
from flashdmd.data import build_image_loader  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def stand_in_encoder(pixels: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


def time_loader(cfg, batches: int) -> tuple[float, float, list[torch.Tensor]]:
    """(seconds to the first batch, steady samples/s over the rest, the tensors seen)."""
    start = time.perf_counter()
    loader = build_image_loader(cfg, 0, 1)
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter() - start
    tensors = [first.get("image", first.get("latent"))]
    t0 = time.perf_counter()
    for batch in it:
        tensors.append(batch.get("image", batch.get("latent")))
    steady = (batches - 1) * cfg.data.batch_size / (time.perf_counter() - t0)
    loader.close()
    return t_first, steady, tensors


def time_memory(tensors: list[torch.Tensor], batch_size: int) -> float:
    """Samples/s of a plain loop slicing the same data held in one tensor (what a step would read)."""
    data = torch.cat(tensors)
    t0 = time.perf_counter()
    total = 0.0
    for i in range(0, len(data) - batch_size + 1, batch_size):
        total += float(data[i : i + batch_size].sum())  # touch the batch as a step would
    return (len(data) // batch_size) * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-sdxl")
    parser.add_argument("--samples", type=int, default=512, help="toy samples in the shards")
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batches", type=int, default=150, help="batches timed per configuration")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (the median is kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    base = load_config(args.preset)
    res, batch_size = base.data.resolution, base.data.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_dir, latent_dir = Path(tmp) / "img", Path(tmp) / "lat"
        shards = make_toy_shards(image_dir, args.samples, args.per_shard, size=res, aspect=1.5)
        for url in shards:
            encode_shard(url, latent_dir, stand_in_encoder, {"vae": "stand-in avg-pool"}, res, batch_size=64)
        for pipeline, folder, extra in (("image", image_dir, []), ("latent", latent_dir, ["data.latent_shards=true"])):
            memory = []
            for workers in (0, 1, 2):
                cfg = load_config(args.preset, [f"data.shards={folder}", f"data.workers={workers}",
                                                f"data.epoch_length={args.batches}", *extra])
                runs = [time_loader(cfg, args.batches) for _ in range(args.repeats)]
                memory.extend(time_memory(r[2], batch_size) for r in runs)
                rows.append({
                    "pipeline": pipeline, "workers": workers,
                    "samples_per_s": statistics.median(r[1] for r in runs),
                    "first_batch_s": statistics.median(r[0] for r in runs),
                })
            rows.append({"pipeline": f"{pipeline} (in memory)", "workers": "-",
                         "samples_per_s": statistics.median(memory), "first_batch_s": 0.0})
    result = {
        "preset": args.preset,
        "resolution": res,
        "batch_size": batch_size,
        "shuffle_buffer": base.data.shuffle_buffer,
        "samples": args.samples,
        "batches_timed": args.batches,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset}: R={res}, batch {batch_size}, load average {result['load_average_1min']:.1f} on {os.cpu_count()} CPUs")
    print(f"| {'pipeline':<20} | workers | samples/s | first batch s |")
    print(f"|{'-' * 22}|---------|-----------|---------------|")
    for row in rows:
        print(f"| {row['pipeline']:<20} | {row['workers']!s:>7} | {row['samples_per_s']:9.0f} | {row['first_batch_s']:13.2f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
