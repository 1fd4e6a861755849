"""A tiny random backbone + latent model and image prompts, for the RL tests."""

from __future__ import annotations

import jax
import numpy as np

from latent_mca.latent.config import LatentConfig
from latent_mca.latent.steps import LatentSystem
from latent_mca.models import qwen2_5_vl
from latent_mca.rl import prompts as prompts_lib
from latent_mca.rl.rollout import SamplingConfig

PAD, STOP = 0, 2


def tiny_system(seed: int = 0):
  """(system, params, extra): random tiny Qwen2.5-VL and latent modules (16 codes)."""
  model_cfg = qwen2_5_vl.Qwen2_5_VLConfig.tiny()
  system = LatentSystem.build(model_cfg, LatentConfig(num_codes=16, idm_layers=1,
                                                      policy_layers=2))
  backbone = qwen2_5_vl.init_params(model_cfg, jax.random.key(seed))
  params, extra = system.init(backbone, jax.random.key(seed + 1))
  return system, params, extra


def tiny_examples(num: int, seed: int = 0) -> list[dict]:
  """num prompt examples of different lengths, each with one 8x8-patch image (16 tokens)."""
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.tiny()
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(num):
    text = rng.integers(3, 400, size=3 + 2 * i)
    ids = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 16,
                          [cfg.vision_end_token_id], text]).astype(np.int32)
    examples.append({"input_ids": ids, "loss_mask": np.zeros_like(ids),
                     "pixel_values": rng.normal(size=(64, 1176)).astype(np.float32),
                     "image_grid_thw": np.array([[1, 8, 8]], np.int32)})
  return examples


def tiny_prompts(num: int, shards: int = 1, seed: int = 0) -> dict:
  """`collate_prompts` of `tiny_examples`, images packed for `shards` devices."""
  return prompts_lib.collate_prompts(tiny_examples(num, seed), PAD, 40, 64, shards)


def sampling(group_size: int = 4, max_new_tokens: int = 12) -> SamplingConfig:
  return SamplingConfig(group_size=group_size, max_new_tokens=max_new_tokens, temperature=1.0,
                        top_k=8, stop_token_ids=(STOP,), pad_token_id=PAD)
