"""Qwen2_5_VL: vision tower + text decoder + LM head, as one Flax Linen module."""

from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from latent_mca.models.qwen2_5_vl.layers import dense
from latent_mca.models.qwen2_5_vl.positions import mrope_positions, vision_layout
from latent_mca.models.qwen2_5_vl.text import TextDecoder
from latent_mca.models.qwen2_5_vl.vision import VisionTower


@flax.struct.dataclass
class ModelOutput:
  """logits [B, T, V] (None when not asked for); hidden_states [B, T, D] after the final norm;
  kv_cache (k, v) each [layers, B, S, kv_heads, head_dim] or None; next_position [B], the
  M-RoPE position of the token that would follow (None when positions were given)."""

  logits: Any
  hidden_states: Any
  kv_cache: Any = None
  next_position: Any = None


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


class Qwen2_5_VL(nn.Module):
  """Qwen2.5-VL for conditional generation.

  Parameters are grouped as `visual`, `model` (embed_tokens, layers, norm) and,
  for untied heads, `lm_head` — the names of the Hugging Face checkpoint.
  """

  config: Qwen2_5_VLConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat)
    self.visual = VisionTower(cfg.vision, **kw)
    self.embed_tokens = nn.Embed(
        cfg.text.vocab_size, cfg.text.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    self.decoder = TextDecoder(cfg.text, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(cfg.text.vocab_size, ("embed", "vocab"), use_bias=False,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lm_head")

  def encode_images(self, pixel_values, image_grid_thw):
    """pixel_values [N, C*T*P*P] -> image token embeddings [N / merge^2, D]."""
    layout = vision_layout(image_grid_thw, pixel_values.shape[0], self.config.vision)
    return self.visual(pixel_values, layout)

  def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
    """Token embeddings [B, T, D] with the image tokens replaced by the vision tower's output."""
    x = self.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    image_embeds = self.encode_images(pixel_values, image_grid_thw).astype(x.dtype)
    is_image = input_ids == self.config.image_token_id
    ordinal = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, image_embeds.shape[0] - 1)
    scattered = image_embeds[ordinal].reshape(x.shape)
    return jnp.where(is_image[..., None], scattered, x)

  def logits(self, hidden_states):
    """LM head: [B, T, D] -> [B, T, V]."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden_states)
    return self.lm_head(hidden_states)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               position_ids=None, kv_cache=None, cache_index=0, cache_mask=None,
               compute_logits: bool = True) -> ModelOutput:
    """Forward pass.

    Args:
      input_ids: [B, T] int, left-padded when batched.
      attention_mask: [B, T] {0, 1}; None means all ones.
      pixel_values: [N, C*T*P*P] float from the image processor, images of all samples
        concatenated in batch order; None for a text-only batch.
      image_grid_thw: [num_images, 3] int (t, h, w) in patches.
      position_ids: [3, B, T] M-RoPE positions; computed from the inputs when None.
      kv_cache: None, or (k, v) each [layers, B, S, kv_heads, head_dim]; the T new
        tokens are written at slots [cache_index, cache_index + T).
      cache_mask: [B, S] {0, 1}, which cache slots hold real tokens (needed with kv_cache).
      compute_logits: False returns only hidden states (skips the vocabulary projection).
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if (pixel_values is None) != (image_grid_thw is None):
      raise ValueError("pixel_values and image_grid_thw must be given together")
    if pixel_values is not None and _is_concrete(input_ids, image_grid_thw):
      check_image_inputs(cfg, input_ids, pixel_values, image_grid_thw)

    next_position = None
    if position_ids is None:
      position_ids, next_position = mrope_positions(input_ids, attention_mask, image_grid_thw, cfg)

    x = self.embed(input_ids, pixel_values, image_grid_thw)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if kv_cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    else:
      if cache_mask is None:
        raise ValueError("cache_mask [B, S] is required together with kv_cache")
      s = kv_cache[0].shape[2]
      slots = jnp.arange(s)[None, :] <= cache_index + jnp.arange(t)[:, None]  # [T, S]
      mask = slots[None, None] & cache_mask.astype(bool)[:, None, None, :]
    hidden, kv_cache = self.decoder(x, position_ids, mask, kv_cache, cache_index)
    logits = self.logits(hidden) if compute_logits else None
    return ModelOutput(logits=logits, hidden_states=hidden, kv_cache=kv_cache,
                       next_position=next_position)


def check_image_inputs(cfg: Qwen2_5_VLConfig, input_ids, pixel_values, image_grid_thw) -> None:
  """Host-side consistency checks of the image inputs, with messages that name the mismatch."""
  thw = np.asarray(image_grid_thw)
  v = cfg.vision
  if thw.ndim != 2 or thw.shape[1] != 3:
    raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {thw.shape}")
  if pixel_values.ndim != 2 or pixel_values.shape[1] != v.patch_dim:
    raise ValueError(f"pixel_values must be [num_patches, {v.patch_dim}], got {pixel_values.shape}")
  odd = thw[(thw[:, 1] % v.spatial_merge_size != 0) | (thw[:, 2] % v.spatial_merge_size != 0)]
  if len(odd):
    raise ValueError(f"image_grid_thw rows {odd.tolist()} are not multiples of "
                     f"spatial_merge_size={v.spatial_merge_size}")
  patches = int(thw.prod(-1).sum())
  if patches != pixel_values.shape[0]:
    raise ValueError(f"image_grid_thw describes {patches} patches but pixel_values has "
                     f"{pixel_values.shape[0]} rows")
  tokens = int((np.asarray(input_ids) == cfg.image_token_id).sum())
  expected = patches // v.spatial_merge_size**2
  if tokens != expected:
    raise ValueError(f"input_ids hold {tokens} image tokens (id {cfg.image_token_id}) but the "
                     f"images need {expected}: expand each image placeholder to t*h*w/"
                     f"{v.spatial_merge_size**2} tokens")


def _init_fn(config: Qwen2_5_VLConfig):
  """model.init on the smallest input that touches every weight (one 4x4-patch image)."""
  v = config.vision
  side = 2 * v.spatial_merge_size
  thw = jnp.array([[1, side, side]], jnp.int32)
  pixels = jnp.zeros((side * side, v.patch_dim), jnp.float32)
  ids = jnp.full((1, 1 + side * side // v.spatial_merge_size**2), config.image_token_id)
  ids = ids.at[0, 0].set(0)
  model = Qwen2_5_VL(config)
  return lambda rng: model.init(rng, ids, pixel_values=pixels, image_grid_thw=thw)["params"]


def init_params(config: Qwen2_5_VLConfig, rng) -> dict:
  """Random parameters (normal(0.02) weights, unit norms), unboxed: a plain pytree."""
  return nn.meta.unbox(jax.jit(_init_fn(config))(rng))


def abstract_params(config: Qwen2_5_VLConfig):
  """Shapes/dtypes of the parameters, boxed with their logical axis names (nn.Partitioned).

  Traced once per config (tracing the whole model costs about a second even when tiny);
  each call gets its own containers.
  """
  return jax.tree.map(lambda leaf: leaf, _abstract_params(config))


@functools.cache
def _abstract_params(config: Qwen2_5_VLConfig):
  return jax.eval_shape(_init_fn(config), jax.random.key(0))
