"""Autoregressive decoding with a KV cache: one jitted prefill, then a `lax.while_loop`.

All shapes are static: the cache holds prompt + max_new_tokens slots; the loop
stops early only when every row has emitted a stop token.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.generation.sampling import sample_logits
from latent_mca.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from latent_mca.models.qwen2_5_vl.model import Qwen2_5_VL, check_image_inputs
from latent_mca.models.qwen2_5_vl.positions import text_positions


def init_kv_cache(config: Qwen2_5_VLConfig, batch: int, length: int, dtype=None):
  """Empty cache (k, v), each [layers, batch, length, kv_heads, head_dim]."""
  t = config.text
  shape = (t.num_hidden_layers, batch, length, t.num_key_value_heads, t.head_dim)
  dtype = dtype or config.dtype
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "stop_token_ids", "pad_token_id"))
def _generate(params, input_ids, attention_mask, pixel_values, image_grid_thw, rng, *,
              model: Qwen2_5_VL, max_new_tokens: int, temperature: float, top_k: int,
              top_p: float, stop_token_ids: tuple[int, ...], pad_token_id: int):
  b, t = input_ids.shape
  cache_len = t + max_new_tokens
  variables = {"params": params}
  cache_mask = jnp.zeros((b, cache_len), jnp.int32).at[:, :t].set(attention_mask)
  out = model.apply(variables, input_ids, attention_mask=attention_mask,
                    pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    kv_cache=init_kv_cache(model.config, b, cache_len), cache_index=0,
                    cache_mask=cache_mask)
  stops = jnp.array(stop_token_ids or (-1,), jnp.int32)

  def pick(rng, logits, done):
    token = sample_logits(rng, logits, temperature, top_k, top_p)
    token = jnp.where(done, pad_token_id, token)
    return token, done | jnp.isin(token, stops)

  rng, first_rng = jax.random.split(rng)
  token, done = pick(first_rng, out.logits[:, -1], jnp.zeros((b,), bool))
  tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    i, _, done, *_ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tokens, done, kv_cache, cache_mask, rng = state
    slot = t + i - 1  # where the previous token goes
    cache_mask = jax.lax.dynamic_update_slice(cache_mask, jnp.ones((b, 1), jnp.int32), (0, slot))
    step = model.apply(variables, jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1),
                       position_ids=text_positions(out.next_position + i - 1, 1),
                       kv_cache=kv_cache, cache_index=slot, cache_mask=cache_mask)
    rng, step_rng = jax.random.split(rng)
    token, done = pick(step_rng, step.logits[:, -1], done)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    return i + 1, tokens, done, step.kv_cache, cache_mask, rng

  state = (jnp.int32(1), tokens, done, out.kv_cache, cache_mask, rng)
  return jax.lax.while_loop(cond, body, state)[1]


def generate(model: Qwen2_5_VL, params, input_ids, attention_mask=None, pixel_values=None,
             image_grid_thw=None, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, rng=None):
  """Generates up to `max_new_tokens` tokens after left-padded prompts.

  Args:
    model, params: a Qwen2_5_VL module and its params.
    input_ids: [B, T] int prompts, left-padded; attention_mask [B, T] marks real tokens.
    pixel_values, image_grid_thw: the images of all prompts, as for `model.apply`.
    temperature: 0 for greedy decoding; otherwise softmax temperature, then top_k
      (0 = off) and top_p (1 = off) filtering.
    stop_token_ids: a row stops after emitting one (default: the config's eos ids).
    pad_token_id: fills a row after it stopped (default: config pad id, else first stop id).
    rng: a jax PRNG key; required when temperature > 0.
  Returns:
    [B, max_new_tokens] int32 new tokens.
  """
  cfg = model.config
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                     f"{input_ids.shape}")
  if np.any(np.asarray(attention_mask)[:, -1] == 0):
    raise ValueError("prompts must be left-padded: the last column of attention_mask has zeros")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, "
                     f"top_p={top_p}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  if pixel_values is not None:
    pixel_values = jnp.asarray(pixel_values)
    image_grid_thw = jnp.asarray(image_grid_thw, jnp.int32)
    check_image_inputs(cfg, input_ids, pixel_values, image_grid_thw)
  stops = tuple(int(s) for s in (cfg.eos_token_id if stop_token_ids is None else stop_token_ids))
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (stops or (0,))[0]
  rng = jax.random.key(0) if rng is None else rng
  return _generate(params, input_ids, attention_mask, pixel_values, image_grid_thw, rng,
                   model=model, max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   stop_token_ids=stops, pad_token_id=int(pad_token_id))
