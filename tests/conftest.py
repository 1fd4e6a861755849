"""Shared fixtures: tiny random PyTorch reference models, saved as local HF folders."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

import torch  # the test extra installs it: a missing reference must fail, not skip
import transformers

IMAGE, VSTART, VEND, PAD = 250, 252, 253, 0


def pytest_configure(config):
  """One persistent compilation cache for the session (and the jobs its tests start in
  subprocesses): the many tests that build the same programs compile each once. XLA
  compiles quickly (`fast_compile`): the tests' tiny programs compile far longer than
  they run. Subprocesses inherit both through the environment."""
  from latent_mca.compilation_cache import enable_compilation_cache, fast_compile

  assert fast_compile(), "JAX started its backends before pytest_configure"

  directory = tempfile.mkdtemp(prefix="latent_mca_jax_cache_")
  config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
  os.environ["LATENT_MCA_COMPILATION_CACHE"] = directory
  enable_compilation_cache(directory)

# Tiny configs that still exercise every structural choice of the real model.
TINY_CONFIGS = {
    # GQA 4:2, untied head, windows + one full-attention block.
    "gqa_untied": dict(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[2, 3, 3])),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, fullatt_block_indexes=[1]),
        tie_word_embeddings=False),
    # GQA 8:2, tied head, full attention in the first and last blocks, wider heads.
    "gqa4_tied": dict(
        text_config=dict(vocab_size=256, hidden_size=128, intermediate_size=160,
                         num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                         rms_norm_eps=1e-5, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[2, 3, 3])),
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=96, num_heads=4,
                           out_hidden_size=128, fullatt_block_indexes=[0, 2]),
        tie_word_embeddings=True),
}


def build_reference(name: str, seed: int = 0):
  """A random fp32 transformers Qwen2.5-VL with weights large enough to give varied outputs."""
  spec = dict(TINY_CONFIGS[name])
  spec["text_config"] = dict(spec["text_config"], bos_token_id=1, eos_token_id=2,
                             pad_token_id=PAD, tie_word_embeddings=spec["tie_word_embeddings"])
  config = transformers.Qwen2_5_VLConfig(image_token_id=IMAGE, video_token_id=251,
                                         vision_start_token_id=VSTART, vision_end_token_id=VEND,
                                         **spec)
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1 and "norm" in pname or "ln_q" in pname:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def reference(request, tmp_path_factory):
  """(torch model, folder it was saved to) for each tiny config."""
  model = build_reference(request.param)
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder)
  return model, str(folder)


def image_prompt(num_image_tokens: int, before=(5, 6), after=(7, 8, 9)) -> list[int]:
  return list(before) + [VSTART] + [IMAGE] * num_image_tokens + [VEND] + list(after)


def left_pad(rows: list[list[int]]):
  """Left-pads token rows: (input_ids [B, T], attention_mask [B, T]) int64."""
  t = max(map(len, rows))
  ids = np.full((len(rows), t), PAD, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask


def random_pixels(grid_thw, seed=0):
  n = int(np.prod(np.asarray(grid_thw), axis=-1).sum())
  return np.random.RandomState(seed).randn(n, 1176).astype(np.float32)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
  """(config, workdir, metrics, seconds) of one run of every stage of the smoke config."""
  import time

  from latent_mca.jobs import pipeline

  config = pipeline.smoke_config()
  workdir = str(tmp_path_factory.mktemp("smoke"))
  start = time.perf_counter()
  metrics = pipeline.run(config, workdir)
  return config, workdir, metrics, time.perf_counter() - start
