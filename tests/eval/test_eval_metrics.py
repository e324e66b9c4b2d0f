"""flashdmd.eval metrics with tiny random-weight transformers models saved with save_pretrained.

CLIP-family scores and ImageReward are checked against the models' own forward passes; FID's
formula against closed forms for Gaussians; sharded states against one pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_metric_models import tiny_clip, tiny_image_reward

from flashdmd.config import EvalConfig
from flashdmd.eval import REGISTRY, build_metrics, results_table
from flashdmd.eval.fid import frechet_distance
from flashdmd.eval.image_reward import REWARD_MEAN, REWARD_STD, reward_head

PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "two dogs", "a house", "the sea"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def uint8_images(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Images on the uint8 grid, as the [-1, 1] tensor the metrics take and as uint8 arrays."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, pixels


def test_clip_family_scores_match_the_models_own_forward(clip_folder):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    images, pixels = uint8_images(len(PROMPTS))
    names = ["clip_score", "pickscore", "hpsv2"]
    cfg = EvalConfig(metrics=names, weights={n: str(clip_folder) for n in names})
    metrics, skipped = build_metrics(cfg)
    assert not skipped
    for metric in metrics.values():
        metric.update(images, PROMPTS)

    # direct: the processor's PIL preprocessing and CLIPModel.forward's logits
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokens = AutoTokenizer.from_pretrained(clip_folder)(PROMPTS, padding=True, return_tensors="pt")
    inputs = CLIPImageProcessor.from_pretrained(clip_folder)(images=list(pixels), return_tensors="pt")
    with torch.no_grad():
        logits = model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=inputs.pixel_values
        )
    scale = model.logit_scale.detach().exp()
    cos = logits.logits_per_image.diagonal() / scale
    assert cos.min() < 0 < cos.max()  # the clamp of CLIP score matters for this data
    assert metrics["clip_score"].compute() == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)
    assert metrics["pickscore"].compute() == pytest.approx(float((scale * cos / 100).mean()), abs=1e-6)
    assert metrics["hpsv2"].compute() == pytest.approx(float(cos.mean()), abs=1e-6)


def test_sharded_states_sum_to_one_pass(clip_folder, tmp_path):
    images, pixels = uint8_images(6, seed=1)
    for i, array in enumerate(pixels[:4]):
        Image.fromarray(array).save(tmp_path / f"ref{i}.png")
    cfg = EvalConfig(metrics=["clip_score", "fd_clip"], weights={"clip_score": str(clip_folder), "fd_clip": str(clip_folder)},
                     reference_images=str(tmp_path))  # fmt: skip
    whole, _ = build_metrics(cfg)
    shard_a, _ = build_metrics(cfg)
    shard_b, _ = build_metrics(cfg)
    for name in whole:
        whole[name].update(images, PROMPTS)
        shard_a[name].update(images[:2], PROMPTS[:2])
        shard_b[name].update(images[2:], PROMPTS[2:])
        shard_a[name].merge(shard_b[name].state())
        # float32 model outputs depend slightly on the batch's size; the state arithmetic is exact
        assert shard_a[name].compute() == pytest.approx(whole[name].compute(), rel=1e-5)

    # the reference images against themselves: the same Gaussian, distance ~0
    same, _ = build_metrics(cfg)
    same["fd_clip"].update(images[:4], PROMPTS[:4])
    assert abs(same["fd_clip"].compute()) < 1e-6 * max(1.0, whole["fd_clip"].compute())
    assert whole["fd_clip"].compute() > 1e-3


def _rank_main(rank: int, world: int, port: int, cfg: EvalConfig, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    images, _ = uint8_images(6, seed=1)
    metrics, _ = build_metrics(cfg)
    for metric in metrics.values():
        metric.update(images[rank::world], PROMPTS[rank::world])  # every other image per rank
        metric.all_reduce()
    if rank == 0:
        torch.save({name: metric.compute() for name, metric in metrics.items()}, out)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes import torch and transformers
def test_two_gloo_ranks_give_the_numbers_of_one(clip_folder, tmp_path):
    import socket

    import torch.multiprocessing as mp

    images, pixels = uint8_images(6, seed=1)
    for i, array in enumerate(pixels[:4]):
        Image.fromarray(array).save(tmp_path / f"ref{i}.png")
    cfg = EvalConfig(metrics=["clip_score", "fd_clip"], weights={"clip_score": str(clip_folder), "fd_clip": str(clip_folder)},
                     reference_images=str(tmp_path))  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, cfg, str(tmp_path / "out.pt")), nprocs=2, start_method="spawn")
    sharded = torch.load(tmp_path / "out.pt", weights_only=True)
    single, _ = build_metrics(cfg)
    for name, metric in single.items():
        metric.update(images, PROMPTS)
        assert sharded[name] == pytest.approx(metric.compute(), rel=1e-5)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # isotropic: |mu1 - mu2|^2 + d (a - b)^2
    a, b = 1.5, 0.5
    expected = float(((mu1 - mu2) ** 2).sum() + d * (a - b) ** 2)
    assert frechet_distance(mu1, a**2 * np.eye(d), mu2, b**2 * np.eye(d)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]])) == pytest.approx(
        5.0
    )
    # general SPD pair, against the symmetric form tr((S1^1/2 S2 S1^1/2)^1/2) computed by eigendecomposition
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # scipy's sqrtm is what the formula uses; the symmetric form must agree with it
    assert np.trace(scipy.linalg.sqrtm(s1 @ s2)).real == pytest.approx(np.sqrt(inner).sum(), rel=1e-8)
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_unavailable_metrics_are_skipped_with_a_message(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    cfg = EvalConfig(
        metrics=["clip_score", "hpsv2", "mps", "image_reward", "fd_clip"], weights={"clip_score": missing, "fd_clip": missing}
    )
    built, skipped = build_metrics(cfg)
    assert not built and set(skipped) == set(cfg.metrics)
    assert missing in skipped["clip_score"] and "does not exist" in skipped["clip_score"]
    assert "eval.weights.hpsv2" in skipped["hpsv2"] and "eval.weights.image_reward" in skipped["image_reward"]
    assert "MPS" in skipped["mps"] and "eval.reference_images" in skipped["fd_clip"]
    with pytest.raises(ValueError, match="unknown metric.*clipscore.*known: clip_score"):
        build_metrics(EvalConfig(metrics=["clipscore"]))


def test_image_reward_matches_the_blip_forward(tmp_path):
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    folder = tiny_image_reward(tmp_path / "image-reward", PROMPTS)
    blip = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    tokenizer = BertTokenizer.from_pretrained(folder)
    head = reward_head(32).eval()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in load_file(str(folder / "mlp.safetensors")).items()})

    metrics, skipped = build_metrics(EvalConfig(metrics=["image_reward"], weights={"image_reward": str(folder)}))
    assert not skipped
    images, _ = uint8_images(4, seed=2)
    metrics["image_reward"].update(images, PROMPTS[:4])

    tokens = tokenizer(PROMPTS[:4], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = blip(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=((images + 1) / 2 - mean) / std,
        )
        expected = (head(out.question_embeds[:, 0]).squeeze(-1) - REWARD_MEAN) / REWARD_STD
    assert metrics["image_reward"].compute() == pytest.approx(float(expected.mean()), abs=1e-5)


def test_results_table_is_shaped_like_the_papers():
    rows = [
        {
            "method": "SDXL (teacher)",
            "nfe": 100,
            "metrics": {"image_reward": 0.7143, "pickscore": 0.2265, "hpsv2": 0.2865, "mps": 11.87},
        },
        {"method": "Flash-DMD", "nfe": 4, "metrics": {"pickscore": 0.23221, "image_reward": 0.9509, "fid": 19.321,
                                                      "fd_clip": 3.5}},
    ]
    table = results_table(rows, notes=["mps skipped: not implemented"])
    assert table == (
        "| Method | NFE | ImgRwd | Pick | HPSv2 | MPS | FID | FD-CLIP |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| SDXL (teacher) | 100 | 0.7143 | 0.2265 | 0.2865 | 11.87 | - | - |\n"
        "| Flash-DMD | 4 | 0.9509 | 0.2322 | - | - | 19.32 | 3.50 |\n"
        "\n- mps skipped: not implemented\n"
    )
    assert [REGISTRY[m].column for m in ("clip_score", "image_reward", "pickscore", "hpsv2", "mps", "fid", "fd_clip")] == [
        "CLIP", "ImgRwd", "Pick", "HPSv2", "MPS", "FID", "FD-CLIP"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown metric"):
        results_table([{"method": "x", "nfe": 1, "metrics": {"fidd": 1.0}}])
