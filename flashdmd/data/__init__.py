"""Data layer: WebDataset shard pipelines (images + captions, precomputed latents, prompts),
split by rank and worker, with a resumable position and a bad-sample policy (DESIGN.md, "data")."""
from flashdmd.data.bad_samples import REASONS, DataError
from flashdmd.data.pipeline import ShardLoader, build_image_loader
from flashdmd.data.position import DataPosition
from flashdmd.data.prompts import PromptLoader, build_prompt_loader, load_prompts
from flashdmd.data.shards import check_shards, expand_shards

__all__ = [
    "REASONS",
    "DataError",
    "DataPosition",
    "PromptLoader",
    "ShardLoader",
    "build_image_loader",
    "build_prompt_loader",
    "check_shards",
    "expand_shards",
    "load_prompts",
]
