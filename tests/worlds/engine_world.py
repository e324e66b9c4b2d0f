"""A tiny world for engine tests: toy networks with the shapes of spec 1.1 (block-structured
denoisers, a discriminator with a frozen backbone and trainable heads, a frozen differentiable
decoder) and a Flash-DMD-shaped iteration written only against the Engine interface, plus a
runner that starts N gloo processes. Used by tests/test_engine_*.py and tests/train/test_checkpoint.py.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from flashdmd.engine.base import Engine, OptimSpec

DIM, GLOBAL_BATCH = 8, 4


class ToyDenoiser(nn.Module):
    """x_t, t -> prediction; three residual blocks in a ModuleList (sharded one by one)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(DIM + 1, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.SiLU()) for _ in range(3))
        self.out = nn.Linear(16, DIM)

    def forward(self, x: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        h = self.embed(torch.cat([x, t[:, None] / 1000.0], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class ToyDiscriminator(nn.Module):
    """Frozen random backbone, trainable heads on two feature levels (Pixel-GAN shape, spec 1.8)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleList([nn.Linear(DIM, 12), nn.Linear(12, 12)])
        self.backbone.requires_grad_(False)
        self.heads = nn.ModuleList([nn.Linear(12, 1), nn.Linear(12, 1)])

    def forward(self, images: Tensor) -> Tensor:
        h1 = torch.tanh(self.backbone[0](images))
        h2 = torch.tanh(self.backbone[1](h1))
        return (self.heads[0](h1) + self.heads[1](h2))[:, 0].clone()


def make_nets(scramble: bool = False) -> dict[str, nn.Module]:
    """Teacher, generator and fake score share the teacher's weights (Algorithm 1 init).
    ``scramble``: the trainable weights (not the frozen ones, which come from pretrained
    sources in real runs) are drawn afresh, so a resume that fails to load shows."""
    torch.manual_seed(0)
    teacher = ToyDenoiser()
    generator, fake = ToyDenoiser(), ToyDenoiser()
    generator.load_state_dict(teacher.state_dict())
    fake.load_state_dict(teacher.state_dict())
    nets = {"teacher": teacher, "generator": generator, "fake_score": fake, "discriminator": ToyDiscriminator(),
            "decoder": nn.Linear(DIM, DIM)}
    if scramble:
        torch.manual_seed(123)
        with torch.no_grad():
            for name in ("generator", "fake_score", "discriminator"):
                for p in nets[name].parameters():
                    if p.requires_grad:
                        p.normal_()
    return nets


def optim_specs() -> dict[str, OptimSpec]:
    return {
        "generator": OptimSpec(lr=1e-2, warmup_steps=2, schedule="cosine", total_steps=10, grad_clip=0.5),
        "fake_score": OptimSpec(lr=1e-2, grad_clip=1.0),
        "discriminator": OptimSpec(lr=1e-2, grad_clip=1.0),
    }


def setup_engine(engine: Engine, scramble: bool = False) -> Engine:
    nets = make_nets(scramble)
    trainable = {k: nets[k] for k in ("generator", "fake_score", "discriminator")}
    engine.setup(trainable, optim_specs(), {"teacher": nets["teacher"], "decoder": nets["decoder"]})
    return engine


def global_batch(step: int) -> dict[str, Tensor]:
    """The fixed global batch of one iteration (all randomness drawn here, identically everywhere)."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "z": torch.randn(GLOBAL_BATCH, DIM, generator=g),
        "noise": torch.randn(GLOBAL_BATCH, DIM, generator=g),
        "t": torch.randint(20, 980, (GLOBAL_BATCH,), generator=g).float(),
        "real": torch.randn(GLOBAL_BATCH, DIM, generator=g) + 1.0,
    }


def shard(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    per = GLOBAL_BATCH // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def iteration(engine: Engine, step: int, ema_decay: float = 0.9) -> dict[str, float]:
    """One Flash-DMD-shaped iteration: generator (DM-like + GAN through the frozen D and
    decoder), EMA pull of the fake score, fake-score denoising, discriminator hinge."""
    b = shard(global_batch(step), engine.rank, engine.world_size)
    t999 = torch.full((b["z"].shape[0],), 999.0)
    a = (1 - b["t"] / 1000.0)[:, None]

    x0 = engine["generator"](b["z"], t999, {})
    with torch.no_grad():
        x_t = a * x0 + (1 - a) * b["noise"]
        target = x0 - 0.1 * (engine["teacher"](x_t, b["t"], {}) - engine["fake_score"](x_t, b["t"], {}))
    dm = F.mse_loss(x0, target)
    with engine.frozen("discriminator"):
        gan = -engine["discriminator"](engine["decoder"](x0)).mean()
    g_loss = dm + 0.5 * gan
    engine.backward("generator", g_loss)
    g_stats = engine.step("generator")
    engine.ema_("fake_score", "generator", ema_decay)

    x0 = x0.detach()
    x_t = a * x0 + (1 - a) * b["noise"]
    f_loss = F.mse_loss(engine["fake_score"](x_t, b["t"], {}), x0)
    engine.backward("fake_score", f_loss)
    engine.step("fake_score")

    fake_img = engine["decoder"](x0)
    d_loss = F.relu(1 - engine["discriminator"](b["real"])).mean() + F.relu(1 + engine["discriminator"](fake_img)).mean()
    engine.backward("discriminator", d_loss)
    engine.step("discriminator")
    out = {"g_loss": g_loss.detach(), "f_loss": f_loss.detach(), "d_loss": d_loss.detach()}
    stats = {k: float(engine.all_reduce_mean(v)) for k, v in out.items()}
    return {**stats, "g_grad_norm": g_stats["grad_norm"], "g_lr": g_stats["lr"]}


def full_weights(engine: Engine) -> dict[str, dict[str, Tensor]]:
    """Every trainable network's full weights (collective; rank 0 gets them)."""
    return {name: engine.full_state_dict(name) for name in ("generator", "fake_score", "discriminator")}


# ------------------------------------------------------------------------------------ runner
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: str,
            env: dict[str, str]) -> None:
    os.environ.clear()  # the caller's environment at the call, not the fork server's from its start
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in result.items()}, out)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        raise
    # Leave without interpreter teardown: DeepSpeed's and gloo's background threads can abort
    # the process at exit ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _start_fork_server() -> None:
    """Ranks fork from one server that imported torch, this module and what the ranks use on top
    (fork_preload: DeepSpeed, diffusers, transformers, PEFT, flashdmd) once per session: a spawned
    rank is a fresh interpreter that spends seconds importing them again.

    The server is a fresh ``python -c`` in the caller's working directory; Python 3.11 does not
    give it the caller's sys.path (it passes it and ignores it), so the preload would find neither
    module and silently import nothing. It gets this folder through PYTHONPATH instead, set only
    while it starts. Later calls find it running (the preload list is read once)."""
    from multiprocessing import forkserver

    mp.set_forkserver_preload(["engine_world", "fork_preload"])
    here, before = str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, before) if p)
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before


def run_ranks(world: int, fn: Callable[..., dict[str, Tensor]], *args: Any, tmp: Path) -> dict[str, Tensor]:
    """Run ``fn(*args)`` on ``world`` gloo ranks; returns rank 0's flat tensor dict."""
    from safetensors.torch import load_file

    out = str(tmp / f"result-{os.getpid()}-{free_port()}.safetensors")
    _start_fork_server()
    mp.start_processes(_worker, args=(world, free_port(), fn, args, out, dict(os.environ)), nprocs=world, join=True,
                       start_method="forkserver")
    return load_file(out)


def flatten(nested: dict[str, dict[str, Tensor]], prefix: str = "") -> dict[str, Tensor]:
    return {f"{prefix}{net}.{k}": v for net, sd in nested.items() for k, v in sd.items()}


# ------------------------------------------------------------------------------ runs (spawned)
def make_engine(kind: str) -> Engine:
    """The engine under test; the sharded ones also shard the frozen teacher (teacher_sharding=zero3)."""
    if kind == "local":
        from flashdmd.engine.local import LocalEngine

        return LocalEngine("cpu")
    if kind == "ddp":
        from flashdmd.engine.ddp import DDPEngine

        return DDPEngine()
    if kind == "fsdp":
        from flashdmd.engine.fsdp import FSDPEngine

        return FSDPEngine(teacher_sharding="zero3")
    if kind == "deepspeed":
        from flashdmd.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(teacher_sharding="zero3")
    if kind == "deepspeed-offload":  # DeepSpeed's CPU AdamW (g++-compiled once) and parameter offload
        from flashdmd.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(offload_optimizer=True, offload_params=True)
    if kind == "fsdp-offload":
        from flashdmd.engine.fsdp import FSDPEngine

        return FSDPEngine(offload=True)
    raise ValueError(kind)


def _record(engine: Engine, losses: list[dict[str, float]], first_step: int) -> dict[str, Tensor]:
    out = flatten(full_weights(engine), prefix="w.")
    for i, stats in enumerate(losses):
        out.update({f"loss.{first_step + i}.{k}": torch.tensor(v) for k, v in stats.items()})
    return out


def train_run(kind: str, n: int, save_at: int = 0, ckpt_dir: str = "") -> dict[str, Tensor]:
    """n iterations from the shared init; with ``save_at``, a checkpoint after that many."""
    from flashdmd.train.checkpoint import save_checkpoint

    engine = setup_engine(make_engine(kind))
    losses = []
    for step in range(n):
        losses.append(iteration(engine, step))
        if save_at and step + 1 == save_at:
            save_checkpoint(engine, ckpt_dir, save_at, trainer={"mlflow_run_id": "run-1"},
                            rank_state={"position": 10 * save_at + engine.rank}, keep_last=2)
    out = _record(engine, losses, 0)
    if kind.startswith("deepspeed"):
        out.update(_deepspeed_checks(engine, Path(ckpt_dir or "/tmp") / f"ds-native-{os.getppid()}"))
    return out


def resume_run(kind: str, n: int, ckpt_dir: str) -> dict[str, Tensor]:
    """Fresh processes, scrambled trainable weights, then the newest valid checkpoint and on to n."""
    from flashdmd.train.checkpoint import latest_valid, load_checkpoint

    engine = setup_engine(make_engine(kind), scramble=True)
    resumed = load_checkpoint(engine, latest_valid(ckpt_dir))
    assert resumed.trainer["mlflow_run_id"] == "run-1"
    assert resumed.rank_state["position"] == 10 * resumed.step + engine.rank
    losses = [iteration(engine, step) for step in range(resumed.step, n)]
    return _record(engine, losses, resumed.step)


def _deepspeed_checks(engine: Engine, native_dir: Path) -> dict[str, Tensor]:
    """Export equals DeepSpeed's own zero_to_fp32 consolidation; EMA refuses unlike networks.

    DeepSpeed's native checkpoint pickles; it is written here to a private temporary directory
    only to compare against, never by the engine."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ours = engine.full_state_dict("generator")
    engine.engines["generator"].save_checkpoint(str(native_dir), tag="t")
    dist.barrier()
    checks = {}
    if engine.rank == 0:
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(native_dir), tag="t")
        assert theirs.keys() == ours.keys(), sorted(theirs.keys() ^ ours.keys())
        checks["check.zero_to_fp32_maxdiff"] = torch.tensor(max((ours[k] - theirs[k]).abs().max().item() for k in ours))
    try:
        engine.ema_("discriminator", "generator", 0.5)
        checks["check.ema_mismatch_raises"] = torch.tensor(0)
    except ValueError:
        checks["check.ema_mismatch_raises"] = torch.tensor(1)
    return checks


# ------------------------------------------------------------------ tiny-sdxl stage 1 (spawned)
PROMPTS = ["a red car", "a cat on a mat", "a bowl of fruit", "a blue house"]


def stage1_config(kind: str, cache: str, preset: str = "tiny-sdxl", overrides: tuple[str, ...] = ()) -> Any:
    """tiny-sdxl without LoRA, or a preset as it is (tiny-sd3: LoRA, EMA on the adapters); then ``overrides``."""
    from flashdmd.config import load_config

    lora = ["model.lora.enabled=false"] if preset == "tiny-sdxl" else []
    sharded = ["engine.teacher_sharding=zero3"] if kind != "local" else []  # the local engine replicates it
    return load_config(preset, [f"engine.kind={kind}", *sharded, f"model.cache_dir={cache}",
                                "stage1.fake_ema_decay=0.9", *lora, *overrides])


def stage1_batch(parts: Any, step: int, rank: int, world: int) -> Any:
    """Rank ``rank``'s share of a fixed global batch of prompts and real pixels."""
    from flashdmd.algo.batch import Batch

    per = len(PROMPTS) // world
    prompts = PROMPTS[rank * per:(rank + 1) * per]
    g = torch.Generator().manual_seed(500 + step)
    real = torch.rand(len(PROMPTS), 3, 64, 64, generator=g)[rank * per:(rank + 1) * per] * 2 - 1
    with torch.no_grad():
        cond, uncond = parts.encode_prompts(prompts), parts.null_cond(per)
    return Batch(cond=cond, uncond=uncond, real=real, size=per)


def stage1_run(kind: str, cache: str, n: int, save_at: int = 0, ckpt_dir: str = "", resume: bool = False,
               preset: str = "tiny-sdxl", overrides: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Stage-1 iterations of the real algorithm on tiny-sdxl under ``kind`` (ddp = LocalEngine over DDP)."""
    from flashdmd.algo.stage1 import Stage1
    from flashdmd.train.checkpoint import latest_valid, load_checkpoint, save_checkpoint
    from flashdmd.engine.factory import build_engine, optim_specs
    from flashdmd.nets.registry import build_parts

    cfg = stage1_config("local" if kind == "ddp" else kind, cache, preset, tuple(overrides))
    torch.manual_seed(0)  # identical discriminator heads on every rank
    parts = build_parts(cfg, Path(cache))
    engine = build_engine(cfg)
    engine.setup(parts.trainable(), optim_specs(cfg), parts.frozen())
    algo = Stage1(cfg.stage1, parts, engine, cfg.seed)
    first = load_checkpoint(engine, latest_valid(ckpt_dir)).step if resume else 0
    losses = []
    for step in range(first, n):
        stats = algo.step(step, stage1_batch(parts, step, engine.rank, engine.world_size))
        losses.append({k: float(engine.all_reduce_mean(torch.tensor(v))) for k, v in stats.items() if k.startswith("loss")})
        if save_at and step + 1 == save_at:
            save_checkpoint(engine, ckpt_dir, save_at, trainer={"mlflow_run_id": "run-1"})
    out = {f"w.{k}": v for k, v in engine.full_state_dict("generator").items()}
    out.update({f"f.{k}": v for k, v in engine.full_state_dict("fake_score").items()})
    for i, stats in enumerate(losses):
        out.update({f"loss.{first + i}.{k}": torch.tensor(v) for k, v in stats.items()})
    if kind != "ddp" and not resume:
        export_dir = Path(ckpt_dir) / "export"
        from flashdmd.engine.diffusers_weights import export_full_weights

        export_full_weights(engine, "generator", export_dir)
    return out


def killed_save_run(kind: str, ckpt_dir: str) -> dict[str, Tensor]:
    """Save step 1, then die (SIGKILL on every rank, as a node loss or a Slurm kill) in the
    middle of saving step 2: after the networks are written, before the trainer state and marker.
    Never returns; step 1's weights are left in ``<ckpt_dir>/step1-weights.safetensors``."""
    import signal

    from safetensors.torch import save_file

    from flashdmd.train.checkpoint import save_checkpoint

    engine = setup_engine(make_engine(kind))
    iteration(engine, 0)
    save_checkpoint(engine, ckpt_dir, 1, trainer={"mlflow_run_id": "run-1"}, rank_state={"position": 10 + engine.rank})
    weights = flatten(full_weights(engine), prefix="w.")
    if engine.rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(ckpt_dir) / "step1-weights.safetensors"))
    iteration(engine, 1)
    original = engine.save

    def dying_save(path: Path) -> None:
        original(path)
        os.kill(os.getpid(), signal.SIGKILL)

    engine.save = dying_save  # type: ignore[method-assign]
    save_checkpoint(engine, ckpt_dir, 2, trainer={"mlflow_run_id": "run-1"})
    raise AssertionError("unreachable: the save above kills this process")


def load_latest_run(kind: str, ckpt_dir: str) -> dict[str, Tensor]:
    """Fresh processes, scrambled weights, then the newest valid checkpoint; returns the weights."""
    from flashdmd.train.checkpoint import latest_valid, load_checkpoint

    engine = setup_engine(make_engine(kind), scramble=True)
    resumed = load_checkpoint(engine, latest_valid(ckpt_dir))
    assert resumed.step == 1 and resumed.rank_state["position"] == 10 + engine.rank
    return flatten(full_weights(engine), prefix="w.")
