"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as in `transformers`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Applies temperature, then top-k, then top-p to logits [..., V] (the `transformers` order).

  Removed entries become -inf. top_p keeps the smallest set of tokens whose
  probability mass exceeds top_p (always at least one).
  """
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(remove_sorted)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def sample_logits(rng, logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Picks one token per row of logits [B, V]: argmax when temperature == 0, else samples."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
