"""Token-averaged losses of the latent action model, MaxText-style: each returns (sum, count).

Returning the masked sum and the number of weighted tokens (instead of a mean)
lets gradient accumulation and data-parallel reductions average over all tokens
correctly; `masked_mean` turns a pair into the loss to optimise.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def masked_mean(sum_count):
  """(sum, count) -> sum / count, and 0 when nothing was counted."""
  total, count = sum_count
  return total / jnp.maximum(count, 1.0)


def next_token_targets(input_ids_bt, attention_mask_bt):
  """Targets and weights of next-token prediction from position t.

  targets[:, t] = input_ids[:, t + 1]; weights[:, t] = 1 where both t and t + 1
  are real tokens. The last position has no successor, so its weight is 0 (and
  its target 0). The same weights mark the valid latent steps: step t is the
  transition x_t -> x_{t+1}.
  """
  chex.assert_rank([input_ids_bt, attention_mask_bt], 2)
  chex.assert_equal_shape([input_ids_bt, attention_mask_bt])
  mask = attention_mask_bt.astype(jnp.float32)
  targets_bt = jnp.concatenate([input_ids_bt[:, 1:], jnp.zeros_like(input_ids_bt[:, :1])], axis=1)
  weights_bt = jnp.concatenate([mask[:, :-1] * mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return targets_bt, weights_bt


def cross_entropy(logits_btv, targets_bt, weights_bt):
  """Weighted cross-entropy of integer targets, in fp32: (sum over tokens, sum of weights)."""
  chex.assert_rank([logits_btv, targets_bt, weights_bt], [3, 2, 2])
  chex.assert_equal_shape([logits_btv[..., 0], targets_bt, weights_bt])
  logits = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None].astype(jnp.int32),
                                        axis=-1)[..., 0]
  weights = weights_bt.astype(jnp.float32)
  return jnp.sum((log_z_bt - target_logit_bt) * weights), jnp.sum(weights)


def behaviour_cloning_loss(policy_logits_btc, target_codes_bt, weights_bt):
  """Policy code logits vs the inverse dynamics model's codes (its argmax, at the same step).

  The targets are integers, so no gradient reaches the inverse dynamics model.
  """
  return cross_entropy(policy_logits_btc, target_codes_bt, weights_bt)


def code_neg_entropy(logits_btc, weights_bt):
  """Anti-collapse term: sum_c p log p of p = softmax(logits), summed over weighted tokens.

  Minimising coef * masked_mean(...) maximises the entropy of each step's code
  distribution, which keeps the inverse dynamics model from collapsing onto a few codes.
  """
  chex.assert_rank([logits_btc, weights_bt], [3, 2])
  chex.assert_equal_shape([logits_btc[..., 0], weights_bt])
  log_p = jax.nn.log_softmax(logits_btc.astype(jnp.float32), axis=-1)
  neg_entropy_bt = jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  weights = weights_bt.astype(jnp.float32)
  return jnp.sum(neg_entropy_bt * weights), jnp.sum(weights)
