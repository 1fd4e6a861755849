"""Hugging Face checkpoint I/O: a table of name patterns plus per-leaf transforms.

Loads a local folder holding `config.json` and `model.safetensors` or sharded
`*.safetensors` (+ `model.safetensors.index.json`), in either key layout found
in the wild (`model.layers.*`/`visual.*` or `model.language_model.*`/`model.visual.*`),
and writes the first layout back, which `transformers` loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from latent_mca.models.qwen2_5_vl.config import ConfigError, Qwen2_5_VLConfig
from latent_mca.models.qwen2_5_vl.model import Qwen2_5_VL, abstract_params

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"

# Flax parameter path -> Hugging Face tensor name. `{i}` marks a scanned layer axis
# (the Flax leaf stacks layers on axis 0; the checkpoint has one tensor per layer).
_RULES: list[tuple[str, str]] = [
    (r"visual/patch_embed/kernel", r"visual.patch_embed.proj.kernel"),
    (r"visual/blocks/(norm1|norm2)/(scale)", r"visual.blocks.{i}.\1.\2"),
    (r"visual/blocks/(qkv|proj)/(kernel|bias)", r"visual.blocks.{i}.attn.\1.\2"),
    (r"visual/blocks/mlp/(\w+)/(kernel|bias)", r"visual.blocks.{i}.mlp.\1.\2"),
    (r"visual/merger/ln_q/scale", r"visual.merger.ln_q.scale"),
    (r"visual/merger/mlp_(\d)/(kernel|bias)", r"visual.merger.mlp.\1.\2"),
    (r"embed_tokens/embedding", r"model.embed_tokens.embedding"),
    (r"decoder/layers/(input_layernorm|post_attention_layernorm)/scale",
     r"model.layers.{i}.\1.scale"),
    (r"decoder/layers/([qkvo]_proj)/(kernel|bias)", r"model.layers.{i}.self_attn.\1.\2"),
    (r"decoder/layers/mlp/(\w+)/kernel", r"model.layers.{i}.mlp.\1.kernel"),
    (r"decoder/norm/scale", r"model.norm.scale"),
    (r"lm_head/kernel", r"lm_head.kernel"),
]
# Key prefixes of the newer layout, rewritten to the canonical one on load.
_LAYOUT_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class CheckpointError(ValueError):
  """A checkpoint folder that does not hold the tensors the config asks for."""


def hf_name(flax_path: str) -> str:
  """The Hugging Face tensor name of a Flax leaf path ("a/b/kernel"); `{i}` for stacked layers."""
  for pattern, template in _RULES:
    if re.fullmatch(pattern, flax_path):
      name = re.sub(pattern, template, flax_path)
      return re.sub(r"\.(kernel|scale|embedding)$", ".weight", name)
  raise KeyError(f"no checkpoint rule for parameter {flax_path!r}")


def _to_hf(flax_path: str, x: np.ndarray, config: Qwen2_5_VLConfig) -> np.ndarray:
  """One layer's Flax leaf -> the checkpoint tensor."""
  if flax_path == "visual/patch_embed/kernel":  # [C*T*P*P, D] -> Conv3d [D, C, T, P, P]
    v = config.vision
    return x.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                       v.patch_size)
  return x.T if flax_path.endswith("kernel") else x


def _from_hf(flax_path: str, x: np.ndarray) -> np.ndarray:
  """The checkpoint tensor -> one layer's Flax leaf."""
  if flax_path == "visual/patch_embed/kernel":
    return x.reshape(x.shape[0], -1).T
  return x.T if flax_path.endswith("kernel") else x


def _num_layers(flax_path: str, config: Qwen2_5_VLConfig) -> int:
  return config.vision.depth if flax_path.startswith("visual/blocks") \
      else config.text.num_hidden_layers


# ------------------------------------------------------------------ reading
def read_config(path: str, **overrides) -> Qwen2_5_VLConfig:
  """Qwen2_5_VLConfig from `path/config.json`; overrides (e.g. dtype) win."""
  file = os.path.join(path, CONFIG_NAME)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"checkpoint folder {path!r} has no {CONFIG_NAME}")
  try:
    with open(file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file} is not valid JSON: {e}") from None
  return Qwen2_5_VLConfig.from_hf_dict(d, **overrides)


def _shard_files(path: str) -> list[str]:
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
      raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
    return [os.path.join(path, n) for n in names]
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"checkpoint folder {path!r} has no *.safetensors files")
  return [os.path.join(path, f) for f in files]


class _TensorReader:
  """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str):
    self._where: dict[str, str] = {}
    for file in _shard_files(path):
      try:
        with safe_open(file, framework="numpy") as f:
          for key in f.keys():
            self._where[self._canonical(key)] = (file, key)
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {e}") from None

  @staticmethod
  def _canonical(key: str) -> str:
    for old, new in _LAYOUT_ALIASES:
      if key.startswith(old):
        return new + key[len(old):]
    return key

  def keys(self) -> Iterable[str]:
    return self._where.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    file, key = self._where[name]
    with safe_open(file, framework="numpy") as f:
      return tuple(f.get_slice(key).get_shape())

  def get(self, name: str) -> np.ndarray:
    file, key = self._where[name]
    with safe_open(file, framework="numpy") as f:
      return f.get_tensor(key)


def load_params(path: str, config: Qwen2_5_VLConfig) -> dict:
  """Reads the checkpoint tensors into a Flax param pytree of `config.param_dtype`.

  Every missing tensor and every shape mismatch is collected and reported in one
  CheckpointError that names each key with its expected and found shape.
  """
  reader = _TensorReader(path)
  expected = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)), sep="/")
  plan, problems = {}, []
  for flax_path, leaf in expected.items():
    template = hf_name(flax_path)
    stacked = "{i}" in template
    names = ([template.format(i=i) for i in range(_num_layers(flax_path, config))]
             if stacked else [template])
    layer_shape = leaf.shape[1:] if stacked else leaf.shape
    want = _to_hf(flax_path, np.empty(layer_shape, np.int8), config).shape
    for name in names:
      if name not in reader:
        problems.append(f"missing tensor {name} (expected shape {list(want)})")
      elif reader.shape(name) != want:
        problems.append(f"tensor {name} has shape {list(reader.shape(name))}, "
                        f"expected {list(want)}")
    plan[flax_path] = (names, stacked)
  if problems:
    raise CheckpointError(f"checkpoint {path!r} does not match its config:\n  " +
                          "\n  ".join(problems))
  used = {n for names, _ in plan.values() for n in names}
  extra = sorted(set(reader.keys()) - used - ({"lm_head.weight"} if config.tie_word_embeddings
                                              else set()))
  if extra:
    logging.warning("checkpoint %s has %d tensors the model does not use, e.g. %s",
                    path, len(extra), extra[:5])
  dtype = config.param_dtype
  params = {}
  for flax_path, (names, stacked) in plan.items():
    arrays = [_from_hf(flax_path, reader.get(n)) for n in names]
    params[flax_path] = jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype=dtype)
  return traverse_util.unflatten_dict(params, sep="/")


def from_pretrained(path: str, dtype=jnp.float32, param_dtype=None, **config_overrides):
  """Loads a local Hugging Face Qwen2.5-VL folder: returns (model, params).

  Args:
    path: folder with config.json and *.safetensors.
    dtype: compute dtype; also the parameter dtype unless `param_dtype` is given.
    config_overrides: other Qwen2_5_VLConfig fields (e.g. remat=True).
  """
  config = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  return Qwen2_5_VL(config), load_params(path, config)


# ------------------------------------------------------------------ writing
def to_hf_state(params: dict, config: Qwen2_5_VLConfig) -> dict[str, np.ndarray]:
  """The checkpoint tensors (name -> numpy array) of a Flax param pytree."""
  state = {}
  for flax_path, leaf in traverse_util.flatten_dict(nn.meta.unbox(params), sep="/").items():
    template = hf_name(flax_path)
    leaf = np.asarray(jax.device_get(leaf))
    if "{i}" in template:
      for i in range(leaf.shape[0]):
        state[template.format(i=i)] = np.ascontiguousarray(_to_hf(flax_path, leaf[i], config))
    else:
      state[template] = np.ascontiguousarray(_to_hf(flax_path, leaf, config))
  return state


def _atomic_write(target: str, write) -> None:
  """write(tmp_path), then rename over target: an interrupted save never leaves half a file."""
  folder = os.path.dirname(target)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(target))
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_pretrained(model: Qwen2_5_VL, params: dict, path: str,
                    max_shard_bytes: int = 4 * 1024**3) -> None:
  """Writes config.json and safetensors (sharded with an index above max_shard_bytes)."""
  config = model.config
  os.makedirs(path, exist_ok=True)
  state = to_hf_state(params, config)
  shards, current, size = [], {}, 0
  for name in sorted(state):
    nbytes = state[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = state[name]
    size += nbytes
  shards.append(current)
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  for file, shard in zip(files, shards):
    _atomic_write(os.path.join(path, file),
                  lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
  if len(shards) > 1:
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
             "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
    _write_json(os.path.join(path, INDEX_NAME), index)
  hf_config = config.to_hf_dict()
  hf_config["dtype"] = np.dtype(config.param_dtype).name
  _write_json(os.path.join(path, CONFIG_NAME), hf_config)


def _write_json(target: str, obj) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
  _atomic_write(target, write)
