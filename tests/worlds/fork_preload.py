"""What the gloo ranks of ``engine_world.run_ranks`` import, loaded once into their fork server.

A rank forked from a bare server imports torch, DeepSpeed, diffusers, transformers, PEFT and the
flashdmd layers itself: seconds per rank, in every run. Imported here, the fork server pays that
once per test session and every rank starts with them.

Fork safety: the server only imports, it never computes, so no OpenMP pool, CUDA context or
process group exists when a rank forks (the threads that numpy's BLAS and pyarrow's jemalloc start
at import have fork handlers). DeepSpeed picks its accelerator when it is imported, so the server
is given the one every rank uses (CPU, as ``engine_world._worker`` sets it) first.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os

MODULES = (
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # read by every ZeRO optimizer check; pulls torch._inductor
    "torch._dynamo",  # the optimizers' first construction imports it
    "peft",
    # the model classes the tiny presets build (flashdmd/nets/tiny.py), which diffusers and transformers load lazily
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.transformers.transformer_sd3",
    "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip",
    "transformers.models.sam.modeling_sam",
    "transformers.models.t5.modeling_t5",
    "flashdmd.algo.stage1",
    "flashdmd.algo.stage2",
    "flashdmd.engine.ddp",
    "flashdmd.engine.deepspeed",
    "flashdmd.engine.diffusers_weights",
    "flashdmd.engine.factory",
    "flashdmd.engine.fsdp",
    "flashdmd.engine.local",
    "flashdmd.nets.registry",
    "flashdmd.train.checkpoint",
    "flashdmd.train.handoff",
)

# the fork server's own environment (ranks set theirs again): DeepSpeed on CPU, and a CUDA check
# that asks NVML instead of initialising CUDA, which a forked rank could not use after it
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
for name in MODULES:
    with contextlib.suppress(ImportError):  # another version's layout: the ranks import what they need
        importlib.import_module(name)

# DeepSpeed's ZeRO-3 set-up runs gc.collect() once per network (parameter defragmentation); frozen,
# the millions of objects imported above are not traversed again in every rank.
gc.freeze()
