"""GPU check of the planner at real scale: SDXL stage 1 on one GPU, measured against the plan.

Builds the real SDXL architectures from their published configs (flashdmd/apps/plan_arch.py:
SDXL-base UNet, SD/SDXL VAE, SAM ViT-L) with random weights directly on the GPU (no download,
no weight files), asks the planner for the largest per-GPU batch of ``sdxl-4step`` that fits
this GPU at world size 1 (FSDP2, bf16, the preset's savers on: generator, decoder and SAM
checkpointing, decode in micro-batches of 1), runs a few stage-1 iterations of the real
algorithm (flashdmd/algo/stage1.py) at that batch, and writes
bench/results/gpu_real_scale.json: measured peak GPU memory (torch.cuda.max_memory_allocated),
the planner's prediction for the same networks, and the seconds per iteration.

Departures from a training run: the text encoders are left out (random conditioning of the
right shapes; their planned row is subtracted from the prediction), real images are random
pixels. Without CUDA it prints one line and exits 0. Budget: about 3-5 minutes on an H100/H200.

    python bench/gpu/real_scale.py [--iterations 3] [--max-batch 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "results" / "gpu_real_scale.json"
PRESET = "sdxl-4step"


def largest_batch(arch: object, gpu_gib: float, max_batch: int) -> tuple[int, object, object]:
    """(batch, config, plan): the largest per-GPU batch the planner says fits one GPU."""
    from flashdmd.apps.plan import plan
    from flashdmd.config import load_config

    best = None
    for batch in range(1, max_batch + 1):
        cfg = load_config(PRESET, ["engine.kind=fsdp", "engine.teacher_sharding=replicate",
                                   "data.global_batch_size=0", f"data.batch_size={batch}"])
        p = plan(cfg, 1, 1, gpu_gib, arch=arch, suggest=False, with_flops=False)
        if not p.fits:
            break
        best = (batch, cfg, p)
    if best is None:
        raise SystemExit(f"the planner says no batch of {PRESET} fits {gpu_gib:.0f} GiB at world size 1")
    return best


def build_parts(cfg: object, device: torch.device) -> tuple[object, dict, dict]:
    """(Parts, cond, uncond): real SDXL architectures with random weights on the GPU, wired like
    flashdmd.nets.registry, and random conditionings of the batch."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SamVisionConfig, SamVisionModel

    from flashdmd.apps.plan_arch import SAM, SD_VAE, SDXL_UNET
    from flashdmd.nets.discriminator import PixelGANDiscriminator, SamBackbone
    from flashdmd.nets.families import get_family
    from flashdmd.nets.load import freeze
    from flashdmd.nets.parts import Parts
    from flashdmd.nets.unet import UNetDenoiser
    from flashdmd.nets.vae import VAEDecoder

    family = get_family("sdxl")
    schedule = family.schedule()
    torch.manual_seed(0)
    with torch.device(device):
        student = UNet2DConditionModel(**SDXL_UNET)
        fake = UNet2DConditionModel(**SDXL_UNET)
        fake.load_state_dict(student.state_dict())
        teacher = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
        teacher.load_state_dict(student.state_dict())
        vae = AutoencoderKL(**SD_VAE, latent_channels=4).to(torch.bfloat16)
        sam = SamVisionModel(SamVisionConfig(**SAM["large"])).to(torch.bfloat16)
    e = cfg.engine
    for unet in (student, fake):
        unet.enable_gradient_checkpointing()
    backbone = SamBackbone(sam)
    if e.sam_checkpointing:
        backbone.enable_checkpointing()
    discriminator = PixelGANDiscriminator(backbone, 256).to(device)
    n = cfg.data.batch_size

    def cond(batch: int) -> dict[str, torch.Tensor]:
        r = cfg.data.resolution
        return {"encoder_hidden_states": torch.randn(batch, 77, 2048, device=device),
                "pooled": torch.randn(batch, 1280, device=device),
                "time_ids": torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=torch.float32).repeat(batch, 1)}

    return Parts(family="sdxl", schedule=schedule, latent_shape=family.latent_shape(cfg.data.resolution),
                 teacher=freeze(UNetDenoiser(teacher, schedule, True)),
                 generator=UNetDenoiser(student, schedule, True).train(),
                 fake_score=UNetDenoiser(fake, schedule, True).train(),
                 decoder=freeze(VAEDecoder(vae, e.decode_micro_batch, e.decoder_checkpointing)),
                 discriminator=discriminator, encode_prompts=lambda prompts: cond(len(prompts)),
                 null_cond=lambda k: cond(k)), cond(n), cond(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu/real_scale.py: no CUDA device; skipped (nothing written)")
        return
    import torch.distributed as dist

    from flashdmd.algo.batch import Batch
    from flashdmd.algo.optim import optim_specs
    from flashdmd.algo.stage1 import Stage1
    from flashdmd.apps.plan import GIB, architecture
    from flashdmd.config import load_config
    from flashdmd.engine.fsdp import FSDPEngine

    started = time.perf_counter()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    arch = architecture(load_config(PRESET))
    batch, cfg, planned = largest_batch(arch, gpu_gib, args.max_batch)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    (parts, cond, uncond) = build_parts(cfg, device)
    engine = FSDPEngine(precision="bf16", gradient_checkpointing=True, teacher_sharding="replicate")
    engine.setup(parts.trainable(), optim_specs(cfg), parts.frozen())
    algo = Stage1(cfg.stage1, parts, engine, cfg.seed)
    g = torch.Generator(device=device).manual_seed(0)
    real = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution, device=device, generator=g) * 2 - 1
    data = Batch(cond=cond, uncond=uncond, real=real, size=batch)
    setup_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.iterations + 1):  # the first iteration warms up kernels and allocator
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        algo.step(step, data)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device)
    text_row = planned.row("text_encoders").gpu  # left out of this check
    result = {
        "preset": PRESET, "device": torch.cuda.get_device_name(device), "gpu_gib": gpu_gib, "world_size": 1,
        "engine": "fsdp", "precision": "bf16", "batch_per_gpu": batch, "resolution": cfg.data.resolution,
        "savers": {k: planned.settings[k] for k in ("gradient_checkpointing", "decoder_checkpointing",
                                                    "decode_micro_batch", "sam_checkpointing", "gan_batch_fraction")},
        "measured_peak_gib": peak / GIB,
        "planned_gib": (planned.gpu_bytes - text_row) / GIB,
        "planned_over_measured": (planned.gpu_bytes - text_row) / peak,
        "planned_rows_gib": {r.network: r.gpu / GIB for r in planned.rows},
        "iteration_s": sorted(times[1:])[len(times[1:]) // 2], "iteration_times_s": times,
        "setup_s": setup_s, "total_s": time.perf_counter() - started,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
