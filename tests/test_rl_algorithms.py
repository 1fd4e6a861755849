"""GRPO, Dr.GRPO, DAPO and BNPO against hand computations on small arrays (no model)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.rl import (ALGORITHMS, AlgorithmConfig, aggregate, bnpo_advantages,
                           bnpo_beta_params, compute_advantages, dr_grpo_advantages,
                           get_algorithm, group_row_indices, groups_with_signal,
                           grpo_advantages, k3_kl, loss_params, overlong_penalty, overlong_reward_shaping,
                           policy_loss, select_groups_with_signal, seq_mean_token_mean,
                           seq_sum_over_constant, shape_rewards, token_mean)

# Two groups of G = 4; the second is constant (no signal).
REWARDS = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0], np.float32)
# Ragged responses: 3 real tokens, then 1; T = 4.
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)


def beta_pdf(x, a, b):
  """Beta density written out: x^(a-1) (1-x)^(b-1) / B(a, b)."""
  return x**(a - 1) * (1 - x)**(b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


def hand_beta_fit(p):
  """BNPO's widened method-of-moments fit, written out: (alpha, beta)."""
  m = sum(p) / len(p)
  v = sum((x - m)**2 for x in p) / len(p)
  common = m * (1 - m) / v - 1
  return max(1 + common * m / 3, 1), max(1 + common * (1 - m) / 3, 1)


# --- Advantages -----------------------------------------------------------------------------


def test_grpo_advantages_unbiased_std_by_hand():
  g0 = REWARDS[:4]
  mean = (1.0 + 0.0 + 0.5 + 0.0) / 4  # 0.375
  std = math.sqrt(sum((x - mean)**2 for x in g0) / 3)  # ddof = 1, as torch.std
  expected = np.concatenate([(g0 - mean) / (std + 1e-6), np.zeros(4)])
  np.testing.assert_allclose(grpo_advantages(jnp.asarray(REWARDS), 4), expected, rtol=1e-5)

  pop_std = math.sqrt(sum((x - mean)**2 for x in g0) / 4)
  np.testing.assert_allclose(grpo_advantages(jnp.asarray(REWARDS), 4, std_ddof=0)[:4],
                             (g0 - mean) / (pop_std + 1e-6), rtol=1e-5)
  with pytest.raises(ValueError, match="group_size"):
    grpo_advantages(jnp.asarray(REWARDS), 1)
  with pytest.raises(ValueError, match="groups of 3"):
    grpo_advantages(jnp.asarray(REWARDS), 3)


def test_dr_grpo_advantages_are_mean_centred_only():
  expected = [1 - 0.375, -0.375, 0.5 - 0.375, -0.375, 0.0, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(dr_grpo_advantages(jnp.asarray(REWARDS), 4), expected, atol=1e-7)


def test_bnpo_beta_fit_and_advantages_by_hand():
  # Rewards in [0, 2] (reward_max=2); scaled group means p = [0.25, 0.5, 0.75, 0.75].
  rewards = np.array([2, 0, 0, 0, 2, 2, 0, 0, 2, 2, 2, 0, 0, 2, 2, 2], np.float32)
  # m = 0.5625, v = 0.04296875, common = m(1-m)/v - 1 = 4.7272..,
  # a = common * m = 2.6591, b = common * (1 - m) = 2.0682 -> alpha = 1 + a/3, beta = 1 + b/3.
  alpha_hand, beta_hand = 1.886364, 1.689394
  assert hand_beta_fit([0.25, 0.5, 0.75, 0.75]) == pytest.approx((alpha_hand, beta_hand), 1e-5)

  adv, alpha, beta = bnpo_advantages(jnp.asarray(rewards), 4, reward_max=2.0)
  assert float(alpha) == pytest.approx(alpha_hand, rel=1e-5)
  assert float(beta) == pytest.approx(beta_hand, rel=1e-5)
  expected = []
  for g, p in enumerate([0.25, 0.5, 0.75, 0.75]):
    inv_pdf = 1.0 / beta_pdf(p, alpha_hand, beta_hand)  # all below the default clamp 10
    expected += [(r / 2.0 - p) * inv_pdf for r in rewards[4 * g:4 * g + 4]]
  np.testing.assert_allclose(adv, expected, rtol=1e-4)

  _, metrics = compute_advantages(get_algorithm("bnpo", reward_max=2.0), jnp.asarray(rewards), 4)
  assert float(metrics["bnpo_alpha"]) == pytest.approx(alpha_hand, rel=1e-5)
  assert float(metrics["bnpo_beta"]) == pytest.approx(beta_hand, rel=1e-5)


def test_bnpo_inverse_pdf_clamp_and_edges():
  # Six groups at p = 0.5, one at 0.75, one at 1 (all-one rewards, where pdf = 0).
  p = [0.5] * 6 + [0.75, 1.0]
  rewards = np.array([1, 1, 0, 0] * 6 + [1, 1, 1, 0] + [1, 1, 1, 1], np.float32)
  a, b = hand_beta_fit(p)
  assert a > 1 and b > 1  # so pdf(1) = 0 and 1/pdf(1) = inf before the clamp
  inv_half, inv_three_quarters = 1 / beta_pdf(0.5, a, b), 1 / beta_pdf(0.75, a, b)
  clamp = 0.7  # 1/pdf is 0.656 at p = 0.5 and 0.722 at p = 0.75
  assert inv_half < clamp < inv_three_quarters  # the clamp bites on the p = 0.75 group only

  adv = np.asarray(bnpo_advantages(jnp.asarray(rewards), 4, max_inv_pdf=clamp)[0])
  np.testing.assert_allclose(adv[:4], np.array([0.5, 0.5, -0.5, -0.5]) * inv_half, rtol=1e-4)
  np.testing.assert_allclose(adv[24:28], np.array([0.25, 0.25, 0.25, -0.75]) * clamp,
                             rtol=1e-6)
  np.testing.assert_array_equal(adv[28:], 0.0)  # r - p = 0: the infinite weight never shows
  assert np.all(np.isfinite(adv))
  # Without the clamp (a large bound) the p = 0.75 group gets its full weight.
  adv = np.asarray(bnpo_advantages(jnp.asarray(rewards), 4, max_inv_pdf=1e3)[0])
  np.testing.assert_allclose(adv[24:28], np.array([0.25, 0.25, 0.25, -0.75]) * inv_three_quarters,
                             rtol=1e-4)


def test_bnpo_degenerate_batch_is_uniform():
  # Every group has p = 0.5: v = 0, so alpha = beta = 1, pdf = 1 and A = r - p.
  alpha, beta = bnpo_beta_params(jnp.array([0.5, 0.5]))
  assert (float(alpha), float(beta)) == (1.0, 1.0)
  adv, _, _ = bnpo_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 2)
  np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5], rtol=1e-5)


def test_bnpo_rewards_outside_range_are_clipped():
  adv, _, _ = bnpo_advantages(jnp.array([3.0, 0.0, -1.0, 1.0]), 2)  # scaled: 1, 0, 0, 1
  np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5], rtol=1e-5)


# --- Aggregations ---------------------------------------------------------------------------

LOSS = np.array([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]], np.float32)  # 99 = padding


def test_aggregations_by_hand():
  loss, mask = jnp.asarray(LOSS), jnp.asarray(MASK)
  # Sequence means 2 and 4, then their mean.
  assert [float(x) for x in seq_mean_token_mean(loss, mask)] == [6.0, 2.0]
  # Token sums 6 and 4, each / T_max = 4, then mean over 2 sequences: 1.25.
  assert [float(x) for x in seq_sum_over_constant(loss, mask, 4)] == [2.5, 2.0]
  # All 4 tokens: 10 / 4.
  assert [float(x) for x in token_mean(loss, mask)] == [10.0, 4.0]
  # seq_sum_over_constant's default constant is T.
  assert float(aggregate("seq_sum_over_constant", loss, mask)[0]) == 2.5
  assert float(aggregate("seq_sum_over_constant", loss, mask, max_length=5)[0]) == 2.0
  with pytest.raises(ValueError, match="token_mean"):
    aggregate("bnpo", loss, mask)


def test_rows_without_tokens_do_not_count():
  loss = jnp.asarray(np.concatenate([LOSS, np.full((1, 4), 7.0, np.float32)]))
  mask = jnp.asarray(np.concatenate([MASK, np.zeros((1, 4), np.float32)]))
  assert float(seq_mean_token_mean(loss, mask)[1]) == 2.0
  assert float(seq_sum_over_constant(loss, mask, 4)[1]) == 2.0
  assert float(token_mean(loss, mask)[1]) == 4.0


def test_policy_loss_aggregation_per_algorithm():
  # On-policy (ratio 1), no KL: per-token loss = -A, i.e. 1 on 3 tokens and 3 on 1 token.
  logp = jnp.zeros((2, 4))
  adv = jnp.array([-1.0, -3.0])
  mask = jnp.asarray(MASK)
  expected = {"grpo": (1 + 3) / 2,  # mean of sequence means
              "bnpo": (1 + 3) / 2,
              "dapo": (1 * 3 + 3) / 4,  # token mean over the batch
              "dr_grpo": (3 / 4 + 3 / 4) / 2}  # token sums / T_max, mean over sequences
  for name, value in expected.items():
    algorithm = get_algorithm(name, kl_beta=0.0)
    loss, metrics = policy_loss(algorithm, logp, logp, None, adv, mask)
    assert float(loss) == pytest.approx(value), name
    assert float(metrics["pg_loss"]) == pytest.approx(value), name
  loss, _ = policy_loss(get_algorithm("dr_grpo", kl_beta=0.0), logp, logp, None, adv, mask,
                        max_length=6)
  assert float(loss) == pytest.approx((3 / 6 + 3 / 6) / 2)


# --- Clipping and KL ------------------------------------------------------------------------


def single_token_loss(name, ratio, advantage):
  """(loss, d loss / d logp, metrics) of one token with the given ratio and advantage."""
  algorithm = get_algorithm(name, kl_beta=0.0)
  old = jnp.zeros((1, 1))
  mask = jnp.ones((1, 1))

  def f(logp):
    return policy_loss(algorithm, logp, old, None, jnp.array([advantage]), mask)

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.full((1, 1), math.log(ratio)))
  return float(loss), float(grad[0, 0]), metrics


def test_clip_and_clip_higher():
  # ratio 1.25, A = +1: outside GRPO's 1 + 0.2, inside DAPO's 1 + 0.28.
  loss, grad, metrics = single_token_loss("grpo", 1.25, 1.0)
  assert loss == pytest.approx(-1.2) and grad == 0.0
  assert float(metrics["clip_fraction"]) == 1.0
  assert float(metrics["ratio_mean"]) == pytest.approx(1.25)
  loss, grad, metrics = single_token_loss("dapo", 1.25, 1.0)
  assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
  assert float(metrics["clip_fraction"]) == 0.0
  # ratio 0.75, A = -1: below 1 - 0.2 for both, clipped at 0.8.
  for name in ("grpo", "dapo"):
    loss, grad, metrics = single_token_loss(name, 0.75, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert float(metrics["clip_fraction"]) == 1.0
  # Leaving the region against the advantage's direction is not clipped.
  loss, grad, metrics = single_token_loss("grpo", 0.75, 1.0)
  assert loss == pytest.approx(-0.75) and grad == pytest.approx(-0.75)
  assert float(metrics["clip_fraction"]) == 0.0


def test_k3_kl_by_hand_and_in_the_loss():
  rng = np.random.RandomState(0)
  logp = rng.randn(2, 4).astype(np.float32) - 1.0
  ref = rng.randn(2, 4).astype(np.float32) - 1.0
  d = ref - logp
  kl_hand = np.exp(d) - d - 1
  np.testing.assert_allclose(k3_kl(jnp.asarray(logp), jnp.asarray(ref)), kl_hand, rtol=1e-5)
  assert np.all(np.asarray(k3_kl(jnp.asarray(logp), jnp.asarray(ref))) >= 0)
  assert float(k3_kl(jnp.asarray(logp), jnp.asarray(logp)).max()) == 0.0

  # A = 0 and ratio 1: the loss is kl_beta times GRPO's aggregation of the KL.
  zeros = jnp.zeros(2)
  loss, metrics = policy_loss(get_algorithm("grpo"), jnp.asarray(logp), jnp.asarray(logp),
                              jnp.asarray(ref), zeros, jnp.asarray(MASK))
  seq_means = [kl_hand[0, :3].mean(), kl_hand[1, 0]]
  assert float(loss) == pytest.approx(0.01 * np.mean(seq_means), rel=1e-5)
  assert float(metrics["kl"]) == pytest.approx((kl_hand[0, :3].sum() + kl_hand[1, 0]) / 4,
                                               rel=1e-5)
  # DAPO reports the KL but does not add it; it needs no reference; GRPO does.
  loss, metrics = policy_loss(get_algorithm("dapo"), jnp.asarray(logp), jnp.asarray(logp),
                              jnp.asarray(ref), zeros, jnp.asarray(MASK))
  assert float(loss) == 0.0 and float(metrics["kl"]) > 0
  _, metrics = policy_loss(get_algorithm("dapo"), jnp.asarray(logp), jnp.asarray(logp), None,
                           zeros, jnp.asarray(MASK))
  assert "kl" not in metrics
  with pytest.raises(ValueError, match="ref_logp"):
    policy_loss(get_algorithm("grpo"), jnp.asarray(logp), jnp.asarray(logp), None, zeros,
                jnp.asarray(MASK))


def test_padding_values_reach_neither_loss_nor_gradient():
  mask = jnp.asarray(MASK)
  logp = jnp.where(mask > 0, -1.0, 50.0)  # garbage at padding
  old = jnp.where(mask > 0, -1.0, -jnp.inf)
  ref = jnp.where(mask > 0, -1.0, -jnp.inf)
  adv = jnp.array([1.0, -1.0])

  def f(x):
    return policy_loss(get_algorithm("grpo"), x, old, ref, adv, mask)[0]

  loss, grad = jax.value_and_grad(f)(logp)
  assert float(loss) == pytest.approx(0.0)  # sequence means -1 and +1
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[np.asarray(MASK) == 0] == 0)


# --- DAPO extras ----------------------------------------------------------------------------


def test_dynamic_sampling_drops_exactly_the_constant_groups():
  rewards = jnp.array([0, 0, 0,  # constant
                       0, 1, 0,
                       1, 1, 1,  # constant
                       0.3, 0.3, 0.3 + 1e-8,  # constant within the tolerance
                       1, 0, 0,
                       0.5, 0.5, 0.7], jnp.float32)
  signal = groups_with_signal(rewards, 3)
  np.testing.assert_array_equal(signal, [False, True, False, False, True, True])

  index, valid = select_groups_with_signal(rewards, 3, 2)
  np.testing.assert_array_equal(index, [1, 4])
  np.testing.assert_array_equal(valid, [True, True])
  index, valid = select_groups_with_signal(rewards, 3, 5)  # only 3 have signal
  np.testing.assert_array_equal(index[:3], [1, 4, 5])
  np.testing.assert_array_equal(valid, [True, True, True, False, False])
  assert set(np.asarray(index[3:]).tolist()) <= {0, 2, 3}
  np.testing.assert_array_equal(group_row_indices(jnp.array([1, 4]), 3), [3, 4, 5, 12, 13, 14])
  with pytest.raises(ValueError, match="num_needed"):
    select_groups_with_signal(rewards, 3, 7)


def test_overlong_shaping_three_regimes():
  # L_max = 10, L_cache = 4: 0 up to 6, then (6 - len) / 4, then -1 beyond 10.
  lengths = jnp.array([3, 6, 7, 9, 10, 11])
  np.testing.assert_allclose(overlong_penalty(lengths, 10, 4),
                             [0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
  np.testing.assert_allclose(overlong_reward_shaping(jnp.ones(6), lengths, 10, 4),
                             [1.0, 1.0, 0.75, 0.25, 0.0, 0.0])
  # The registry: DAPO shapes with L_cache = 0.2 L_max; GRPO leaves rewards alone.
  np.testing.assert_allclose(shape_rewards(get_algorithm("dapo"), jnp.ones(6), lengths,
                                           max_length=20),
                             [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  dapo, grpo = get_algorithm("dapo"), get_algorithm("grpo")
  np.testing.assert_allclose(shape_rewards(dapo, jnp.ones(3), jnp.array([16, 18, 20]),
                                           max_length=20), [1.0, 0.5, 0.0])
  np.testing.assert_allclose(shape_rewards(grpo, jnp.ones(2), jnp.array([19, 30]),
                                           max_length=20), [1.0, 1.0])
  # verl's penalty_factor weighs the penalty: 0.1 x (0, -0.5, -1).
  np.testing.assert_allclose(shape_rewards(get_algorithm("dapo", overlong_penalty_factor=0.1),
                                           jnp.ones(3), jnp.array([16, 18, 20]), max_length=20),
                             [1.0, 0.95, 0.9], rtol=1e-6)
  with pytest.raises(ValueError, match="overlong_penalty_factor"):
    get_algorithm("dapo", overlong_penalty_factor=-1.0)
  with pytest.raises(ValueError, match="cache_length"):
    overlong_penalty(lengths, 10, 0)


# --- Registry and jit -----------------------------------------------------------------------


def test_registry_entries_and_errors():
  assert set(ALGORITHMS) == {"grpo", "dr_grpo", "dapo", "bnpo"}
  dapo = get_algorithm("dapo")
  assert (dapo.eps_low, dapo.eps_high, dapo.kl_beta) == (0.2, 0.28, 0.0)
  assert dapo.dynamic_sampling and dapo.overlong_shaping and dapo.aggregation == "token_mean"
  assert get_algorithm("dr_grpo").aggregation == "seq_sum_over_constant"
  assert get_algorithm("bnpo").advantage == "bnpo"
  assert get_algorithm("grpo", kl_beta=0.04).kl_beta == 0.04
  assert ALGORITHMS["grpo"].kl_beta == 0.01  # overrides copy
  with pytest.raises(ValueError, match=r"'ppo'.*bnpo, dapo, dr_grpo, grpo"):
    get_algorithm("ppo")
  with pytest.raises(ValueError, match="clip_eps"):
    get_algorithm("grpo", clip_eps=0.1)
  with pytest.raises(ValueError, match="aggregation"):
    get_algorithm("grpo", aggregation="bnpo")
  with pytest.raises(ValueError, match="advantage"):
    AlgorithmConfig(name="x", advantage="ppo", aggregation="token_mean")
  with pytest.raises(dataclasses.FrozenInstanceError):
    dapo.kl_beta = 0.1


def test_everything_jits():
  rng = np.random.RandomState(1)
  logp, old, ref = (jnp.asarray(rng.randn(2, 4).astype(np.float32) * 0.1 - 1) for _ in range(3))
  mask, rewards = jnp.asarray(MASK), jnp.array([1.0, 0.0, 0.0, 1.0])
  for name in ALGORITHMS:
    algorithm = get_algorithm(name)
    adv_fn = functools.partial(compute_advantages, algorithm, group_size=2)
    adv, adv_metrics = jax.jit(adv_fn)(rewards)
    eager_adv, _ = adv_fn(rewards)
    np.testing.assert_allclose(adv, eager_adv, rtol=1e-6)
    assert np.all(np.isfinite(jnp.stack(list(adv_metrics.values()))))
    adv = adv[::2]  # one advantage per row of the [2, 4] batch
    loss_fn = functools.partial(policy_loss, algorithm, max_length=8)
    loss, metrics = jax.jit(loss_fn)(logp, old, ref, adv, mask)
    assert float(loss) == pytest.approx(float(loss_fn(logp, old, ref, adv, mask)[0]), rel=1e-6)
    assert set(metrics) == {"pg_loss", "kl", "clip_fraction", "ratio_mean"}
  index, valid = jax.jit(select_groups_with_signal, static_argnums=(1, 2))(rewards, 2, 1)
  assert int(index[0]) == 0 and bool(valid[0])
  shaped = jax.jit(shape_rewards, static_argnums=0, static_argnames="max_length")(
      get_algorithm("dapo"), rewards, jnp.array([1, 8, 9, 10]), max_length=10)
  np.testing.assert_allclose(shaped, [1.0, 0.0, -0.5, 0.0])


def test_loss_params_give_each_algorithms_loss_from_one_compiled_program():
  rng = np.random.RandomState(0)
  logp, old, ref = (jnp.asarray(rng.randn(2, 4).astype(np.float32) * 0.3) for _ in range(3))
  adv, mask = jnp.array([0.7, -1.2]), jnp.asarray(MASK)
  traces = []

  @jax.jit
  def loss_of(params):
    traces.append(1)
    return jax.value_and_grad(lambda lp: policy_loss(params, lp, old, ref, adv, mask)[0])(logp)

  for name in ALGORITHMS:
    algorithm = get_algorithm(name, kl_beta=0.05 if name != "dapo" else 0.0)
    expected = jax.value_and_grad(
        lambda lp, a=algorithm: policy_loss(a, lp, old, ref, adv, mask)[0])(logp)
    got = loss_of(loss_params(algorithm))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-7, err_msg=name)
  assert len(traces) == 1
  with pytest.raises(ValueError, match="pass ref_logp_bt"):
    policy_loss(loss_params(get_algorithm("dapo")), logp, old, None, adv, mask)
