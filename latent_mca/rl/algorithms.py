"""Group policy-gradient algorithms (SPEC section 3): GRPO, Dr.GRPO, DAPO and BNPO.

Pure, jittable functions over per-token log-probs and masks, so the same code
serves both action spaces (text tokens and latent codes). A batch holds
N = num_groups * G sequences: each prompt repeated G times, groups contiguous
(rows [g * G, (g + 1) * G) are group g), responses padded to length T, with
`mask_bt` [N, T] marking the real response tokens.

A run looks up its algorithm by name and threads the frozen config through:

  algorithm = get_algorithm("dapo")
  rewards_n = shape_rewards(algorithm, rewards_n, mask_bt.sum(-1), max_length=T)
  advantages_n, adv_metrics = compute_advantages(algorithm, rewards_n, G)
  loss, metrics = policy_loss(algorithm, logp_bt, old_logp_bt, ref_logp_bt, advantages_n, mask_bt)

`AlgorithmConfig` is frozen and hashable, so it can be a static argument of `jax.jit`;
`loss_params(algorithm)` gives its loss numbers as arrays instead, so that one compiled
learner step serves every algorithm.
Dynamic sampling (DAPO) happens before the loss, on the rollout side:
`select_groups_with_signal` picks the groups to train on from a pool of candidates.

Aggregations return (sum, count) like `latent.losses`, so gradient accumulation
over micro-batches averages correctly; `policy_loss` returns their ratio.
"""

from __future__ import annotations

import dataclasses

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.latent.losses import masked_mean

ADVANTAGES = ("grpo", "dr_grpo", "bnpo")
AGGREGATIONS = ("seq_mean_token_mean", "seq_sum_over_constant", "token_mean")


# ---------------------------------------------------------------------------------------------
# Advantages: one per sequence, from the rewards of its group.


def _grouped(rewards_n, group_size: int):
  """[N] -> [num_groups, G] in fp32; N must be a multiple of G."""
  chex.assert_rank(rewards_n, 1)
  n = rewards_n.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"{n} rewards do not split into groups of {group_size}")
  return rewards_n.astype(jnp.float32).reshape(n // group_size, group_size)


def grpo_advantages(rewards_n, group_size: int, *, eps: float = 1e-6, std_ddof: int = 1):
  """GRPO (and DAPO) advantages: A = (r - mean_group) / (std_group + eps).

  The group std is the unbiased one by default (std_ddof=1), as TRL computes it
  with torch.std; std_ddof=0 gives the population std (verl's torch.std default
  is also unbiased). A group whose rewards are all equal gets A = 0.

  Args:
    rewards_n: [N] rewards, groups contiguous.
    group_size: G, the number of samples per prompt.
    eps: added to the std, so constant groups divide 0 by eps.
    std_ddof: delta degrees of freedom of the group std; needs G > std_ddof.

  Returns:
    [N] fp32 advantages.
  """
  if group_size <= std_ddof:
    raise ValueError(f"group std with ddof={std_ddof} needs group_size > {std_ddof}, "
                     f"got {group_size}")
  r_gk = _grouped(rewards_n, group_size)
  mean_g1 = jnp.mean(r_gk, axis=1, keepdims=True)
  std_g1 = jnp.std(r_gk, axis=1, keepdims=True, ddof=std_ddof)
  return ((r_gk - mean_g1) / (std_g1 + eps)).reshape(-1)


def dr_grpo_advantages(rewards_n, group_size: int):
  """Dr.GRPO advantages: A = r - mean_group; no std division (it biases towards easy/hard prompts).

  Args:
    rewards_n: [N] rewards, groups contiguous.
    group_size: G, the number of samples per prompt.

  Returns:
    [N] fp32 advantages.
  """
  r_gk = _grouped(rewards_n, group_size)
  return (r_gk - jnp.mean(r_gk, axis=1, keepdims=True)).reshape(-1)


def bnpo_beta_params(p_g):
  """Method-of-moments Beta fit over the batch's group success rates, widened as BNPO does.

  m = mean(p), v = var(p) (population variance over groups), common = m(1 - m) / v - 1,
  a = common * m, b = common * (1 - m); returns alpha = max(1 + a / 3, 1) and
  beta = max(1 + b / 3, 1). When v == 0 (every group has the same p, or a single
  group) the fit is undefined and alpha = beta = 1, the uniform density.

  Args:
    p_g: [num_groups] group mean rewards in [0, 1].

  Returns:
    (alpha, beta), fp32 scalars.
  """
  chex.assert_rank(p_g, 1)
  p = p_g.astype(jnp.float32)
  m = jnp.mean(p)
  v = jnp.var(p)
  degenerate = v <= 0.0
  common = m * (1.0 - m) / jnp.where(degenerate, 1.0, v) - 1.0
  alpha = jnp.where(degenerate, 1.0, jnp.maximum(1.0 + common * m / 3.0, 1.0))
  beta = jnp.where(degenerate, 1.0, jnp.maximum(1.0 + common * (1.0 - m) / 3.0, 1.0))
  return alpha, beta


def bnpo_advantages(rewards_n, group_size: int, *, reward_min: float = 0.0,
                    reward_max: float = 1.0, max_inv_pdf: float = 10.0):
  """BNPO advantages: A = (r - p_g) / BetaPDF(p_g; alpha, beta), with 1/pdf clamped.

  Rewards are scaled to [0, 1] by (r - reward_min) / (reward_max - reward_min) and
  clipped there; p_g is the group mean of the scaled rewards, and (alpha, beta)
  come from `bnpo_beta_params` over the batch's p values. The density vanishes at
  p = 0 or 1 when alpha or beta > 1 and can blow up the weight near the edges,
  so 1 / pdf is clamped to [0, max_inv_pdf] (a constant group has r - p = 0, so
  its advantage stays 0 whatever the clamp).

  (This is the BNPO *algorithm*. Some libraries name a loss normalisation "bnpo":
  divide by the active tokens of the local batch. That is `token_mean` here.)

  Args:
    rewards_n: [N] rewards, groups contiguous.
    group_size: G, the number of samples per prompt.
    reward_min: reward mapped to 0.
    reward_max: reward mapped to 1.
    max_inv_pdf: upper bound on 1 / pdf.

  Returns:
    ([N] fp32 advantages, alpha, beta).
  """
  if reward_max <= reward_min:
    raise ValueError(f"reward_max ({reward_max}) must exceed reward_min ({reward_min})")
  r_gk = jnp.clip((_grouped(rewards_n, group_size) - reward_min) / (reward_max - reward_min),
                  0.0, 1.0)
  p_g = jnp.mean(r_gk, axis=1)
  alpha, beta = bnpo_beta_params(p_g)
  pdf_g = jax.scipy.stats.beta.pdf(p_g, alpha, beta)
  # 1 / 0 = inf clips to max_inv_pdf: the clamp happens before the product, so no 0 * inf.
  inv_pdf_g = jnp.clip(1.0 / pdf_g, 0.0, max_inv_pdf)
  return ((r_gk - p_g[:, None]) * inv_pdf_g[:, None]).reshape(-1), alpha, beta


# ---------------------------------------------------------------------------------------------
# DAPO's reward-side extras: dynamic sampling and overlong reward shaping.


def groups_with_signal(rewards_n, group_size: int, *, atol: float = 1e-6):
  """[num_groups] bool: False for groups whose rewards are all equal (max - min <= atol).

  Such groups have zero advantage under every algorithm here, so they add no
  gradient; DAPO's dynamic sampling drops them and refills the batch.
  """
  r_gk = _grouped(rewards_n, group_size)
  return jnp.max(r_gk, axis=1) - jnp.min(r_gk, axis=1) > atol


def select_groups_with_signal(rewards_n, group_size: int, num_needed: int, *,
                              atol: float = 1e-6):
  """The first `num_needed` groups of a candidate pool that have signal, with static shapes.

  The pool is typically the concatenation of several generation rounds; groups
  keep their pool order. When fewer than `num_needed` groups have signal the
  remaining slots hold groups without signal and are marked invalid: zero their
  rows' masks (`group_row_indices` maps groups to rows) and the aggregations,
  which count only sequences/tokens with mask, ignore them.

  Args:
    rewards_n: [pool_groups * G] rewards of the candidate pool.
    group_size: G.
    num_needed: K, the number of groups to return (static).
    atol: tolerance of `groups_with_signal`.

  Returns:
    (group indices [K] int32 into the pool, valid [K] bool).
  """
  has_signal_g = groups_with_signal(rewards_n, group_size, atol=atol)
  if not 0 < num_needed <= has_signal_g.shape[0]:
    raise ValueError(f"num_needed must be in [1, {has_signal_g.shape[0]}] (the pool's groups), "
                     f"got {num_needed}")
  # A stable sort on "no signal" puts the groups with signal first, each side in pool order.
  order_g = jnp.argsort(jnp.logical_not(has_signal_g), stable=True)
  index_k = order_g[:num_needed].astype(jnp.int32)
  return index_k, has_signal_g[index_k]


def group_row_indices(group_index_k, group_size: int):
  """Rows [K * G] of the batch that hold groups `group_index_k` [K], in order (for jnp.take)."""
  chex.assert_rank(group_index_k, 1)
  rows_kg = group_index_k[:, None] * group_size + jnp.arange(group_size, dtype=jnp.int32)
  return rows_kg.reshape(-1)


def overlong_penalty(lengths_n, max_length: int, cache_length: int):
  """DAPO's soft overlong punishment (paper eq. 13), added to the task reward.

  With L_max = max_length and L_cache = cache_length:
    0                                   if len <= L_max - L_cache,
    ((L_max - L_cache) - len) / L_cache  if L_max - L_cache < len <= L_max,
    -1                                  if len > L_max.
  The middle branch falls linearly from 0 to -1 over the cache window.

  Args:
    lengths_n: [N] response lengths in tokens (e.g. mask_bt.sum(-1)).
    max_length: L_max.
    cache_length: L_cache, in (0, L_max].

  Returns:
    [N] fp32 penalties in [-1, 0].
  """
  if not 0 < cache_length <= max_length:
    raise ValueError(f"cache_length must be in (0, max_length={max_length}], got {cache_length}")
  length_n = lengths_n.astype(jnp.float32)
  soft_start = max_length - cache_length
  linear_n = (soft_start - length_n) / cache_length
  return jnp.where(length_n <= soft_start, 0.0, jnp.where(length_n <= max_length, linear_n, -1.0))


def overlong_reward_shaping(rewards_n, lengths_n, max_length: int, cache_length: int,
                            factor: float = 1.0):
  """r + factor * overlong_penalty(len): DAPO's overlong reward shaping."""
  chex.assert_equal_shape([rewards_n, lengths_n])
  penalty = overlong_penalty(lengths_n, max_length, cache_length)
  return rewards_n.astype(jnp.float32) + factor * penalty


# ---------------------------------------------------------------------------------------------
# Loss aggregations: per-token loss [N, T] -> (sum, count); masked_mean gives the scalar.


def _sequences_with_tokens(mask_bt):
  """Number of sequences with at least one real token (padded or dropped rows don't count)."""
  return jnp.sum(jnp.sum(mask_bt, axis=1) > 0).astype(jnp.float32)


def seq_mean_token_mean(loss_bt, mask_bt):
  """GRPO/BNPO aggregation: mean over each sequence's tokens, then mean over sequences.

  Every sequence weighs the same, so a token of a short response weighs more
  than one of a long response (the length bias Dr.GRPO removes).

  Returns:
    (sum over sequences of their token means, number of sequences with tokens).
  """
  chex.assert_rank([loss_bt, mask_bt], 2)
  chex.assert_equal_shape([loss_bt, mask_bt])
  mask = mask_bt.astype(jnp.float32)
  seq_mean_n = jnp.sum(loss_bt * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return jnp.sum(seq_mean_n), _sequences_with_tokens(mask)


def seq_sum_over_constant(loss_bt, mask_bt, max_length: int):
  """Dr.GRPO aggregation: each sequence's token sum / max_length, then mean over sequences.

  Dividing by a constant instead of the sequence length removes GRPO's length bias.

  Returns:
    (sum over sequences of token sum / max_length, number of sequences with tokens).
  """
  chex.assert_rank([loss_bt, mask_bt], 2)
  chex.assert_equal_shape([loss_bt, mask_bt])
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(loss_bt * mask) / max_length, _sequences_with_tokens(mask)


def token_mean(loss_bt, mask_bt):
  """DAPO aggregation: sum over all tokens of the batch / number of tokens of the batch.

  Every token weighs the same, so long responses count in proportion to their
  length. Some libraries call this normalisation "bnpo" (normalise by the active
  tokens of the local batch); it is unrelated to the BNPO algorithm
  (`bnpo_advantages`), which uses `seq_mean_token_mean`.

  Returns:
    (sum of the loss over real tokens, number of real tokens).
  """
  chex.assert_rank([loss_bt, mask_bt], 2)
  chex.assert_equal_shape([loss_bt, mask_bt])
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(loss_bt * mask), jnp.sum(mask)


def aggregate(aggregation: str, loss_bt, mask_bt, *, max_length: int | None = None):
  """Dispatches to the aggregation named `aggregation`; returns (sum, count).

  `max_length` is seq_sum_over_constant's constant; None means T, the padded
  length, which is the max completion length when rollouts pad to it.
  """
  if aggregation == "seq_mean_token_mean":
    return seq_mean_token_mean(loss_bt, mask_bt)
  if aggregation == "seq_sum_over_constant":
    return seq_sum_over_constant(loss_bt, mask_bt,
                                 mask_bt.shape[1] if max_length is None else max_length)
  if aggregation == "token_mean":
    return token_mean(loss_bt, mask_bt)
  raise ValueError(f"unknown aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")


def aggregate_by_index(index, loss_bt, mask_bt, *, max_length: int | None = None):
  """`aggregate` with the aggregation given by its index in `AGGREGATIONS`, an int or a
  traced int32: every aggregation is computed (each is a masked sum) and one is taken."""
  sums, counts = zip(*(aggregate(name, loss_bt, mask_bt, max_length=max_length)
                       for name in AGGREGATIONS))
  return jnp.stack(sums)[index], jnp.stack(counts)[index]


# ---------------------------------------------------------------------------------------------
# Per-token terms.


def clipped_surrogate(log_ratio_bt, advantages_bt, eps_low: float, eps_high: float):
  """PPO's clipped surrogate loss per token, and where the clip is active.

  loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A). The clip is
  active (the gradient is zero) where the ratio left the trust region in the
  advantage's direction: ratio > 1 + eps_high with A > 0, or ratio < 1 - eps_low
  with A < 0. eps_high > eps_low is DAPO's clip-higher.

  Args:
    log_ratio_bt: log pi(a) - log pi_old(a), [N, T].
    advantages_bt: advantages broadcast to tokens, [N, T].
    eps_low: lower clip range.
    eps_high: upper clip range.

  Returns:
    (loss [N, T], clipped [N, T] bool).
  """
  ratio_bt = jnp.exp(log_ratio_bt)
  unclipped_bt = ratio_bt * advantages_bt
  clipped_obj_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high) * advantages_bt
  is_clipped_bt = (((ratio_bt > 1.0 + eps_high) & (advantages_bt > 0))
                   | ((ratio_bt < 1.0 - eps_low) & (advantages_bt < 0)))
  return -jnp.minimum(unclipped_bt, clipped_obj_bt), is_clipped_bt


def k3_kl(logp_bt, ref_logp_bt):
  """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref_logp - logp.

  Unbiased for the KL under samples of pi, and >= 0 for every sample (e^d >= 1 + d).
  """
  d_bt = ref_logp_bt - logp_bt
  return jnp.exp(d_bt) - d_bt - 1.0


# ---------------------------------------------------------------------------------------------
# The algorithms and their entry points.


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """One group policy-gradient algorithm: its advantage, loss and rollout-side switches.

  Attributes:
    name: registry name.
    advantage: "grpo" (std-normalised), "dr_grpo" (mean-centred) or "bnpo" (Beta-normalised).
    aggregation: "seq_mean_token_mean", "seq_sum_over_constant" or "token_mean".
    eps_low: lower clip range of the ratio.
    eps_high: upper clip range of the ratio (> eps_low is DAPO's clip-higher).
    kl_beta: weight of the k3 KL to the reference policy; 0 needs no reference.
    dynamic_sampling: whether the rollout side drops groups without signal and refills
      (`select_groups_with_signal`); the loss itself is unaffected.
    overlong_shaping: whether `shape_rewards` adds DAPO's overlong penalty.
    overlong_cache_fraction: L_cache / L_max of the overlong penalty (DAPO: 4096 / 20480).
    overlong_penalty_factor: the penalty's weight (verl's overlong_buffer.penalty_factor):
      1 suits DAPO's +-1 rewards; rewards on a smaller scale want a smaller one.
    adv_eps: eps added to the group std (grpo advantage).
    std_ddof: ddof of the group std (grpo advantage); 1 is TRL's unbiased std.
    reward_min: reward mapped to 0 by the bnpo advantage.
    reward_max: reward mapped to 1 by the bnpo advantage.
    max_inv_pdf: clamp on 1 / BetaPDF in the bnpo advantage.
    signal_atol: rewards closer than this count as equal for dynamic sampling.
  """

  name: str
  advantage: str
  aggregation: str
  eps_low: float = 0.2
  eps_high: float = 0.2
  kl_beta: float = 0.01
  dynamic_sampling: bool = False
  overlong_shaping: bool = False
  overlong_cache_fraction: float = 0.2
  overlong_penalty_factor: float = 1.0
  adv_eps: float = 1e-6
  std_ddof: int = 1
  reward_min: float = 0.0
  reward_max: float = 1.0
  max_inv_pdf: float = 10.0
  signal_atol: float = 1e-6

  def __post_init__(self):
    if self.advantage not in ADVANTAGES:
      raise ValueError(f"{self.name}: unknown advantage {self.advantage!r}; "
                       f"known: {', '.join(ADVANTAGES)}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"{self.name}: unknown aggregation {self.aggregation!r}; "
                       f"known: {', '.join(AGGREGATIONS)}")
    if self.eps_low < 0 or self.eps_high < 0 or self.kl_beta < 0:
      raise ValueError(f"{self.name}: eps_low, eps_high and kl_beta must be >= 0")
    if not 0.0 < self.overlong_cache_fraction <= 1.0:
      raise ValueError(f"{self.name}: overlong_cache_fraction must be in (0, 1]")
    if self.overlong_penalty_factor < 0:
      raise ValueError(f"{self.name}: overlong_penalty_factor must be >= 0")


ALGORITHMS: dict[str, AlgorithmConfig] = {
    "grpo": AlgorithmConfig(name="grpo", advantage="grpo", aggregation="seq_mean_token_mean"),
    "dr_grpo": AlgorithmConfig(name="dr_grpo", advantage="dr_grpo",
                               aggregation="seq_sum_over_constant"),
    "dapo": AlgorithmConfig(name="dapo", advantage="grpo", aggregation="token_mean",
                            eps_high=0.28, kl_beta=0.0, dynamic_sampling=True,
                            overlong_shaping=True),
    "bnpo": AlgorithmConfig(name="bnpo", advantage="bnpo", aggregation="seq_mean_token_mean"),
}


def get_algorithm(name: str, **overrides) -> AlgorithmConfig:
  """The registered algorithm `name`, with fields replaced by `overrides`.

  Raises:
    ValueError: for an unknown algorithm (naming the known ones) or an unknown field.
  """
  if name not in ALGORITHMS:
    raise ValueError(f"unknown RL algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
  fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown AlgorithmConfig fields {unknown}; known: {sorted(fields)}")
  return dataclasses.replace(ALGORITHMS[name], **overrides)


@flax.struct.dataclass
class LossParams:
  """The numbers of an algorithm's loss, as arrays (a pytree, so traced under jit).

  Passed to `policy_loss` instead of the `AlgorithmConfig`, they make the loss's program
  the same for every algorithm: a learner step compiles once and serves them all.

  Attributes:
    eps_low, eps_high, kl_beta: fp32 scalars, as in `AlgorithmConfig`.
    aggregation: int32 scalar, the aggregation's index in `AGGREGATIONS`.
  """

  eps_low: jax.Array
  eps_high: jax.Array
  kl_beta: jax.Array
  aggregation: jax.Array


def loss_params(algorithm: AlgorithmConfig) -> LossParams:
  """The algorithm's loss numbers as host arrays (see `LossParams`)."""
  return LossParams(eps_low=np.float32(algorithm.eps_low), eps_high=np.float32(algorithm.eps_high),
                    kl_beta=np.float32(algorithm.kl_beta),
                    aggregation=np.int32(AGGREGATIONS.index(algorithm.aggregation)))


def shape_rewards(algorithm: AlgorithmConfig, rewards_n, lengths_n, *, max_length: int):
  """Rewards after the algorithm's reward shaping (DAPO's overlong penalty, if enabled).

  Args:
    algorithm: the algorithm.
    rewards_n: [N] task rewards.
    lengths_n: [N] response lengths in tokens.
    max_length: L_max, the max completion length; L_cache = its overlong_cache_fraction.

  Returns:
    [N] fp32 rewards.
  """
  if not algorithm.overlong_shaping:
    return rewards_n.astype(jnp.float32)
  cache_length = max(1, round(algorithm.overlong_cache_fraction * max_length))
  return overlong_reward_shaping(rewards_n, lengths_n, max_length, cache_length,
                                 algorithm.overlong_penalty_factor)


def compute_advantages(algorithm: AlgorithmConfig, rewards_n, group_size: int):
  """Per-sequence advantages of `algorithm` from the rewards of G samples per prompt.

  Args:
    algorithm: the algorithm (its advantage kind and parameters).
    rewards_n: [N] rewards, groups contiguous.
    group_size: G.

  Returns:
    ([N] fp32 advantages, metrics): reward_mean, reward_std (over the batch) and
    frac_groups_with_signal; for bnpo also bnpo_alpha, bnpo_beta.
  """
  rewards = rewards_n.astype(jnp.float32)
  metrics = {
      "reward_mean": jnp.mean(rewards),
      "reward_std": jnp.std(rewards),
      "frac_groups_with_signal": jnp.mean(groups_with_signal(
          rewards, group_size, atol=algorithm.signal_atol).astype(jnp.float32)),
  }
  if algorithm.advantage == "grpo":
    advantages_n = grpo_advantages(rewards, group_size, eps=algorithm.adv_eps,
                                   std_ddof=algorithm.std_ddof)
  elif algorithm.advantage == "dr_grpo":
    advantages_n = dr_grpo_advantages(rewards, group_size)
  else:
    advantages_n, alpha, beta = bnpo_advantages(
        rewards, group_size, reward_min=algorithm.reward_min, reward_max=algorithm.reward_max,
        max_inv_pdf=algorithm.max_inv_pdf)
    metrics.update(bnpo_alpha=alpha, bnpo_beta=beta)
  return advantages_n, metrics


def policy_loss(algorithm: AlgorithmConfig | LossParams, logp_bt, old_logp_bt, ref_logp_bt, advantages_n,
                mask_bt, *, max_length: int | None = None):
  """The algorithm's loss: clipped surrogate + kl_beta * k3 KL per token, aggregated.

  Log-probs are of the sampled actions (text tokens or latent codes) under the
  current, behaviour (old) and reference policies; only `logp_bt` should carry a
  gradient. Padding positions may hold any finite or infinite value: they are
  masked before any exp, so neither the loss nor its gradient sees them.

  Args:
    algorithm: the algorithm (clip ranges, kl_beta, aggregation), or its `loss_params`
      (arrays: one compiled program then serves every algorithm).
    logp_bt: [N, T] log-probs under the policy being trained.
    old_logp_bt: [N, T] log-probs under the policy that sampled the rollouts.
    ref_logp_bt: [N, T] log-probs under the frozen reference, or None (needs an
      AlgorithmConfig with kl_beta == 0).
    advantages_n: [N] per-sequence advantages.
    mask_bt: [N, T] 1 on real response tokens.
    max_length: seq_sum_over_constant's constant (Dr.GRPO); None means T.

  Returns:
    (loss scalar, metrics): pg_loss (the surrogate, aggregated like the loss),
    clip_fraction and ratio_mean (over real tokens) and, when a reference is
    given, kl (its token mean, also when kl_beta == 0).
  """
  if isinstance(algorithm, AlgorithmConfig):
    if ref_logp_bt is None and algorithm.kl_beta != 0:
      raise ValueError(f"{algorithm.name}: kl_beta={algorithm.kl_beta} needs ref_logp_bt")
    params = loss_params(algorithm)
  elif ref_logp_bt is None:
    raise ValueError("LossParams carry kl_beta as an array: pass ref_logp_bt")
  else:
    params = algorithm
  chex.assert_rank([logp_bt, old_logp_bt, advantages_n, mask_bt], [2, 2, 1, 2])
  chex.assert_equal_shape([logp_bt, old_logp_bt, mask_bt])
  chex.assert_equal_shape([advantages_n, mask_bt[:, 0]])
  real_bt = mask_bt.astype(bool)
  mask = real_bt.astype(jnp.float32)

  def real(x_bt):
    # Zero at padding before any exp: exp(garbage) * 0 can be nan in the value or gradient.
    return jnp.where(real_bt, x_bt.astype(jnp.float32), 0.0)

  logp = real(logp_bt)
  log_ratio_bt = logp - real(old_logp_bt)
  advantages_bt = jnp.broadcast_to(advantages_n.astype(jnp.float32)[:, None], logp.shape)
  pg_bt, is_clipped_bt = clipped_surrogate(log_ratio_bt, advantages_bt, params.eps_low,
                                           params.eps_high)
  loss_bt = pg_bt
  metrics = {}
  if ref_logp_bt is not None:
    chex.assert_equal_shape([ref_logp_bt, logp_bt])
    kl_bt = k3_kl(logp, real(ref_logp_bt))
    metrics["kl"] = masked_mean(token_mean(kl_bt, mask))
    if not (isinstance(algorithm, AlgorithmConfig) and algorithm.kl_beta == 0):
      loss_bt = pg_bt + params.kl_beta * kl_bt

  def agg(x_bt):
    return masked_mean(aggregate_by_index(params.aggregation, x_bt, mask,
                                          max_length=max_length))

  metrics.update(
      pg_loss=agg(pg_bt),
      clip_fraction=masked_mean(token_mean(is_clipped_bt.astype(jnp.float32), mask)),
      ratio_mean=masked_mean(token_mean(jnp.exp(log_ratio_bt), mask)),
  )
  return agg(loss_bt), metrics
