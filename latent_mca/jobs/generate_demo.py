"""Generation demo: build (or load) a Qwen2.5-VL, save it as a Hugging Face folder, reload it,
and decode answers to image+text and text-only prompts in one left-padded batch.

With `config.checkpoint` empty, a tiny random model is built from `config.model.preset`
and prompts are byte-encoded (the demo shows the machinery: the model is untrained, so
its words are noise). With `config.checkpoint` set to a local Hugging Face folder that
holds a tokenizer, real Qwen2.5-VL weights answer in the Qwen chat format.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from latent_mca.data.image_processing import ImageProcessorConfig, num_image_tokens, \
    preprocess_images
from latent_mca.generation import generate
from latent_mca.models import qwen2_5_vl

_BYTE_OFFSET = 4  # ids 0..3 are pad / bos / eos / unk in the tiny vocabulary


def default_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of the demo; runs in well under a minute on a laptop CPU."""
  c = ml_collections.ConfigDict()
  c.job = "generate_demo"
  c.seed = 0
  c.checkpoint = ""  # a local HF folder; empty builds a random model from model.preset
  c.model = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32"))
  c.image_size = 112  # pixels of the synthetic scene (a multiple of 28)
  c.prompts = ("Describe the picture.", "What colour is the square?")
  c.max_new_tokens = 16
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  return c


def draw_scene(size: int, seed: int) -> Image.Image:
  """A few coloured shapes on a light background (the synthetic world draws richer ones)."""
  rng = np.random.default_rng(seed)
  image = Image.new("RGB", (size, size), (235, 235, 225))
  draw = ImageDraw.Draw(image)
  colours = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (230, 180, 20)]
  for k in range(3):
    x, y = rng.integers(0, size * 3 // 4, size=2)
    r = int(rng.integers(size // 10, size // 4))
    box = (int(x), int(y), int(x) + r, int(y) + r)
    (draw.ellipse if k % 2 else draw.rectangle)(box, fill=colours[k % len(colours)])
  return image


class _ByteCodec:
  """UTF-8 bytes shifted past the tiny model's special ids."""

  def __init__(self, config: qwen2_5_vl.Qwen2_5_VLConfig):
    self.config = config

  def prompt(self, text: str, image_tokens: int) -> list[int]:
    c = self.config
    ids = [c.bos_token_id]
    if image_tokens:
      ids += [c.vision_start_token_id] + [c.image_token_id] * image_tokens \
          + [c.vision_end_token_id]
    return ids + [b + _BYTE_OFFSET for b in text.encode()]

  def decode(self, ids) -> str:
    data = bytes(i - _BYTE_OFFSET for i in ids if _BYTE_OFFSET <= i < 256 + _BYTE_OFFSET)
    return data.decode("utf-8", errors="replace")


class _QwenChatCodec:
  """The tokenizer of a local checkpoint folder, in the Qwen2.5-VL chat format."""

  def __init__(self, folder: str):
    import transformers  # only needed for real checkpoints
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
      raise FileNotFoundError(f"checkpoint {folder!r} has no usable tokenizer files: {e}") from e

  def prompt(self, text: str, image_tokens: int) -> list[int]:
    image = ("<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
             if image_tokens else "")
    chat = f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
    return self.tokenizer(chat, add_special_tokens=False)["input_ids"]

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)


def _build_or_load(config, workdir: str):
  """(model, params, codec): from config.checkpoint, or a random preset saved to workdir/model."""
  dtype = jnp.dtype(config.model.dtype)
  if config.checkpoint:
    model, params = qwen2_5_vl.from_pretrained(config.checkpoint, dtype=dtype)
    return model, params, _QwenChatCodec(config.checkpoint)
  folder = os.path.join(workdir, "model")
  if os.path.isfile(os.path.join(folder, "config.json")):
    logging.info("reusing the model saved in %s", folder)
  else:
    presets = {"tiny": qwen2_5_vl.Qwen2_5_VLConfig.tiny,
               "qwen2_5_vl_3b": qwen2_5_vl.Qwen2_5_VLConfig.qwen2_5_vl_3b,
               "qwen2_5_vl_7b": qwen2_5_vl.Qwen2_5_VLConfig.qwen2_5_vl_7b}
    if config.model.preset not in presets:
      raise qwen2_5_vl.ConfigError(f"config.model.preset={config.model.preset!r} is not one of "
                                   f"{sorted(presets)}")
    model_config = presets[config.model.preset](dtype=dtype, param_dtype=dtype)
    params = qwen2_5_vl.init_params(model_config, jax.random.key(config.seed))
    qwen2_5_vl.save_pretrained(qwen2_5_vl.Qwen2_5_VL(model_config), params, folder)
  model, params = qwen2_5_vl.from_pretrained(folder, dtype=dtype)
  return model, params, _ByteCodec(model.config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Answers each prompt twice, with the synthetic image and without; writes generations.json."""
  model, params, codec = _build_or_load(config, workdir)
  image = draw_scene(config.image_size, config.seed)
  image.save(os.path.join(workdir, "scene.png"))
  processor = ImageProcessorConfig()
  pixels, grid = preprocess_images([image] * len(config.prompts), processor)
  n_image = num_image_tokens(grid[0], processor.merge_size)

  rows = [codec.prompt(p, n_image) for p in config.prompts] + \
         [codec.prompt(p, 0) for p in config.prompts]
  width = max(map(len, rows))
  pad = model.config.pad_token_id or 0
  ids = np.array([[pad] * (width - len(r)) + r for r in rows], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)

  kw = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_k=config.top_k, top_p=config.top_p, rng=jax.random.key(config.seed))
  start = time.perf_counter()
  tokens = np.asarray(generate(model, params, ids, mask, pixels, grid, **kw))
  first_call = time.perf_counter() - start  # includes compilation
  start = time.perf_counter()
  tokens = np.asarray(generate(model, params, ids, mask, pixels, grid, **kw))
  seconds = time.perf_counter() - start

  results = [dict(prompt=p, with_image=k < len(config.prompts), tokens=t.tolist(),
                  text=codec.decode(t))
             for k, (p, t) in enumerate(zip(list(config.prompts) * 2, tokens))]
  with open(os.path.join(workdir, "generations.json"), "w") as f:
    json.dump(results, f, indent=2)
  for r in results:
    logging.info("[%s] %s -> %r", "image" if r["with_image"] else "text", r["prompt"], r["text"])
  return dict(num_sequences=len(rows), prompt_length=width, image_tokens=n_image,
              compile_and_decode_seconds=first_call, decode_seconds=seconds,
              decode_tokens_per_second=tokens.size / seconds)
