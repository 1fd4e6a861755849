"""The Qwen2 text decoder with M-RoPE and an explicit, functional KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.models.qwen2_5_vl.config import TextConfig
from latent_mca.models.qwen2_5_vl.layers import (RMSNorm, SwiGLU, apply_rotary, attention, dense,
                                                 mask_to_bias, stack_layers)

Dtype = jnp.dtype


def mrope_cos_sin(positions, config: TextConfig, dtype):
  """cos, sin [B, T, head_dim] of M-RoPE from positions [3, B, T].

  Frequency band i of the rotary takes its angle from the t, h or w position
  according to the contiguous `mrope_section` split (Qwen2.5-VL, not interleaved).
  """
  hd = config.head_dim
  inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  axis_of_band = np.repeat(np.arange(3), config.mrope_section)  # [hd/2] in {0, 1, 2}
  band_positions = jnp.moveaxis(positions[axis_of_band], 0, -1)  # [B, T, hd/2]
  freqs = band_positions.astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class DecoderLayer(nn.Module):
  """Pre-norm GQA attention (q/k/v bias, no o bias) + SwiGLU.

  With a cache, the new keys/values are written at `cache_index` and the queries
  attend over the whole cache (the bias hides empty and padded slots).
  """

  config: TextConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x, kv_cache, cos, sin, bias, cache_index):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, _ = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
    q = dense(nh * hd, ("embed", "q_heads"), use_bias=True, name="q_proj", **kw)(h)
    k = dense(nkv * hd, ("embed", "kv_heads"), use_bias=True, name="k_proj", **kw)(h)
    v = dense(nkv * hd, ("embed", "kv_heads"), use_bias=True, name="v_proj", **kw)(h)
    q = apply_rotary(q.reshape(b, t, nh, hd), cos, sin)
    k = apply_rotary(k.reshape(b, t, nkv, hd), cos, sin)
    v = v.reshape(b, t, nkv, hd)
    q = nn.with_logical_constraint(q, ("batch", "length", "q_heads", "head_dim"))
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
      kv_cache = (k, v)
    out = attention(q, k.astype(self.dtype), v.astype(self.dtype), bias).reshape(b, t, nh * hd)
    x = x + dense(cfg.hidden_size, ("q_heads", "embed"), use_bias=False, name="o_proj", **kw)(out)
    h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + SwiGLU(cfg.intermediate_size, use_bias=False, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, kv_cache


def decoder_stack(config: TextConfig, num_layers: int, x, positions, mask, kv_cache=None,
                  cache_index=0, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  remat: bool = False):
  """num_layers scanned decoder layers, then RMSNorm: (hidden states [B, T, D], kv_cache).

  Call it inside a compact method: it creates the calling module's "layers" and "norm"
  (the backbone's decoder and the latent heads share it).
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  cos, sin = mrope_cos_sin(positions, config, dtype)
  layers = stack_layers(DecoderLayer, num_layers, (0,) + (nn.broadcast,) * 4, remat)
  x, kv_cache = layers(config, name="layers", **kw)(x, kv_cache, cos, sin, mask_to_bias(mask),
                                                    cache_index)
  return RMSNorm(config.rms_norm_eps, name="norm", **kw)(x), kv_cache


class TextDecoder(nn.Module):
  """Stack of decoder layers (scanned: weights have a leading layer axis) and the final norm."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, kv_cache=None, cache_index=0):
    """x [B, T, D] embeddings; positions [3, B, T]; mask bool [B, 1, T, S] (True = attend).

    kv_cache: None, or (k, v) each [layers, B, S, kv_heads, head_dim].
    Returns the final-normed hidden states [B, T, D] and the updated cache.
    """
    return decoder_stack(self.config, self.config.num_hidden_layers, x, positions, mask,
                         kv_cache, cache_index, dtype=self.dtype, param_dtype=self.param_dtype,
                         remat=self.remat)
