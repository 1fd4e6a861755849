"""The inverse dynamics model, the policy and the language world model.

All three read h_t, the backbone's final-normed hidden state [B, T, D]
(`ModelOutput.hidden_states`). The inverse dynamics model and the policy add
decoder layers of the backbone's own kind (`DecoderLayer`, scanned), run
causally with the backbone's M-RoPE positions [3, B, T] and attention mask.

Step t is the transition x_t -> x_{t+1}. The policy reads step t's code from
position t, so it has seen x_{<=t}; the inverse dynamics model reads it from
position t + 1, so it has also seen x_{t+1} (and nothing later).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_mca.latent.config import LatentConfig
from latent_mca.models.qwen2_5_vl.config import TextConfig
from latent_mca.models.qwen2_5_vl.layers import RMSNorm, dense
from latent_mca.models.qwen2_5_vl.model import Qwen2_5_VL
from latent_mca.models.qwen2_5_vl.text import decoder_stack


def causal_mask(attention_mask_bs, num_queries: int, cache_index=0):
  """bool [B, 1, T, S] (True = attend), as the backbone builds it.

  attention_mask_bs [B, S] marks real tokens (cache slots, with a cache). Query i
  sits at slot cache_index + i and sees the real slots up to its own; without a
  cache S = T and cache_index = 0, which is the plain causal mask.
  """
  s = attention_mask_bs.shape[1]
  slots_ts = jnp.arange(s)[None, :] <= cache_index + jnp.arange(num_queries)[:, None]
  return slots_ts[None, None] & attention_mask_bs.astype(bool)[:, None, None, :]


def shift_to_steps(out_btf):
  """Position t + 1's output becomes step t's; the last step has no successor and gets zeros."""
  return jnp.concatenate([out_btf[:, 1:], jnp.zeros_like(out_btf[:, :1])], axis=1)


def init_kv_cache(text_config: TextConfig, num_layers: int, batch: int, length: int,
                  dtype=jnp.float32):
  """Empty cache (k, v) for extra decoder layers: each [layers, batch, length, kv_heads, hd]."""
  shape = (num_layers, batch, length, text_config.num_key_value_heads, text_config.head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class DecoderHead(nn.Module):
  """Extra decoder layers -> RMSNorm -> Linear(d, features)."""

  config: TextConfig
  num_layers: int
  features: int
  out_axis: str  # logical name of the output features
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, h_btd, positions_3bt, mask_b1ts, kv_cache=None, cache_index=0):
    """Returns (out_btf, kv_cache); kv_cache as in `init_kv_cache`, or None."""
    x, kv_cache = decoder_stack(self.config, self.num_layers, h_btd.astype(self.dtype),
                                positions_3bt, mask_b1ts, kv_cache, cache_index,
                                dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    out_btf = dense(self.features, ("embed", self.out_axis), use_bias=True, name="head",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return out_btf, kv_cache


def _check_backbone_inputs(h_btd, positions_3bt, attention_mask_bs, hidden_size: int):
  chex.assert_rank([h_btd, positions_3bt, attention_mask_bs], [3, 3, 2])
  chex.assert_axis_dimension(h_btd, 2, hidden_size)
  chex.assert_shape(positions_3bt, (3, *h_btd.shape[:2]))
  chex.assert_axis_dimension(attention_mask_bs, 0, h_btd.shape[0])


class InverseDynamics(nn.Module):
  """IDM: idm_layers decoder layers on stop_gradient(h) -> RMSNorm -> Linear.

  Outputs code logits [B, T, num_codes] for the Gumbel codebook, or vectors
  [B, T, D] for the VQ codebook to quantise.
  """

  text_config: TextConfig
  config: LatentConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, h_btd, positions_3bt, attention_mask_bt):
    """h_btd [B, T, D]; positions_3bt [3, B, T]; attention_mask_bt [B, T] {0, 1}.

    Returns out_btf with out_btf[:, t] = step t's logits (or vector), read at
    position t + 1; the last step is zeros (it has no x_{t+1}: give it weight 0,
    as `next_token_targets` does).
    """
    _check_backbone_inputs(h_btd, positions_3bt, attention_mask_bt, self.text_config.hidden_size)
    chex.assert_equal_shape([h_btd[..., 0], attention_mask_bt])
    vq = self.config.quantizer == "vq"
    head = DecoderHead(
        self.text_config, self.config.idm_layers,
        self.text_config.hidden_size if vq else self.config.num_codes,
        "embed" if vq else "codes", self.dtype, self.param_dtype, self.remat, name="decoder")
    # The IDM labels the backbone's transitions; it must not move the backbone.
    out_btf, _ = head(jax.lax.stop_gradient(h_btd), positions_3bt,
                      causal_mask(attention_mask_bt, h_btd.shape[1]))
    return shift_to_steps(out_btf)


class Policy(nn.Module):
  """policy_layers decoder layers on h -> RMSNorm -> Linear(d, num_codes).

  Not stop-gradient: the reference's RL also trains the backbone's final norm
  through the policy (our `rl` stage trains the policy alone by default).
  """

  text_config: TextConfig
  config: LatentConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, h_btd, positions_3bt, attention_mask_bs, kv_cache=None, cache_index=0):
    """Code logits of the new tokens' steps: (logits_btc, kv_cache).

    Without a cache: h_btd [B, T, D], positions_3bt [3, B, T], attention_mask_bs
    = [B, T]; logits_btc[:, t] is step t's, from position t. With a cache (from
    `init_kv_cache(text_config, config.policy_layers, ...)`, for sampling): the T
    new tokens go to slots [cache_index, cache_index + T) and attention_mask_bs
    [B, S] marks the filled slots, as the backbone's `cache_mask`.
    """
    _check_backbone_inputs(h_btd, positions_3bt, attention_mask_bs, self.text_config.hidden_size)
    head = DecoderHead(self.text_config, self.config.policy_layers, self.config.num_codes,
                       "codes", self.dtype, self.param_dtype, self.remat, name="decoder")
    return head(h_btd, positions_3bt, causal_mask(attention_mask_bs, h_btd.shape[1], cache_index),
                kv_cache, cache_index)


class MergeMLP(nn.Module):
  """SwiGLU from concat[x, action] (2d) to d."""

  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd, action_btd):
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    xa = jnp.concatenate([x_btd, action_btd], axis=-1)
    gate = dense(self.hidden, ("embed", "mlp"), name="gate_proj", **kw)(xa)
    up = dense(self.hidden, ("embed", "mlp"), name="up_proj", **kw)(xa)
    return dense(x_btd.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


class WorldModel(nn.Module):
  """Language world model: x_{t+1} logits from (h_t, a_t).

  x = h; x = x + MergeMLP_i(concat[x, action]) for each merge layer; then the
  backbone's final norm and LM head (`backbone_lm_head`).
  """

  text_config: TextConfig
  config: LatentConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_btd, action_btd, lm_head: Callable):
    """h_btd, action_btd [B, T, D] (action = the codebook vector of a_t); lm_head maps
    [B, T, D] -> [B, T, V]. Returns logits_btv[:, t] over x_{t+1}."""
    chex.assert_rank([h_btd, action_btd], 3)
    chex.assert_equal_shape([h_btd, action_btd])
    chex.assert_axis_dimension(h_btd, 2, self.text_config.hidden_size)
    width = self.config.world_model_width(self.text_config.intermediate_size)
    x_btd = h_btd.astype(self.dtype)
    action_btd = action_btd.astype(self.dtype)
    for i in range(self.config.world_model_merge_layers):
      x_btd = x_btd + MergeMLP(width, self.dtype, self.param_dtype, name=f"merge_{i}")(x_btd,
                                                                                     action_btd)
    return lm_head(x_btd)


def backbone_lm_head(model: Qwen2_5_VL, params) -> Callable:
  """The backbone's final norm then LM head, as a function [B, T, D] -> [B, T, V].

  Differentiable in `params` (the reference trains the final norm during RL).
  """
  cfg = model.config
  norm = RMSNorm(cfg.text.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def lm_head(x_btd):
    x_btd = norm.apply({"params": params["decoder"]["norm"]}, x_btd)
    return model.apply({"params": params}, x_btd, method=Qwen2_5_VL.logits)

  return lm_head
