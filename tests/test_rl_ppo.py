"""RL4VLM's PPO math (rl/ppo.py) against hand computations on small arrays (no backbone)."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.rl.ppo import (PPOConfig, ValueHead, advantages_and_returns, clipped_value_loss,
                               gae, minibatch_indices, normalize_advantages, ppo_loss,
                               ppo_optimizer_config, reference_value_widths, sequence_logprob)
from latent_mca.training.state import learning_rate_schedule

# A 3-step, 2-env rollout. Env 0's episode ends at t = 1 (t = 2 starts a new one);
# env 1's ends at t = 2, the last step.
REWARDS = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], np.float32)  # [T=3, E=2]
VALUES = np.array([[0.5, 1.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
DONES = np.array([[0, 0], [1, 0], [0, 1]], np.float32)
LAST_VALUE = np.array([4.0, 3.0], np.float32)


# The functions under test, jitted: one compilation per shape instead of many eager ops.
gae_jit = jax.jit(gae)  # gamma and lam traced too
normalize_jit = jax.jit(normalize_advantages)
sequence_logprob_jit = jax.jit(sequence_logprob)
advantages_and_returns_jit = jax.jit(advantages_and_returns, static_argnums=0)
minibatch_indices_jit = jax.jit(minibatch_indices, static_argnums=(1, 2, 3))


def run_gae(gamma, lam):
  return gae_jit(jnp.asarray(REWARDS), jnp.asarray(VALUES), jnp.asarray(DONES),
                 jnp.asarray(LAST_VALUE), gamma, lam)


# --- GAE ------------------------------------------------------------------------------------


def test_gae_with_a_done_in_the_middle_by_hand():
  # gamma = 0.9, lam = 0.5, so gamma * lam = 0.45.
  # env 0: t=2: delta = 2 + 0.9 * 4 - 0 = 5.6                  A = 5.6
  #        t=1 (done): delta = 0 + 0 - 1 = -1                   A = -1 (no carry from t=2)
  #        t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4                 A = 1.4 + 0.45 * -1 = 0.95
  # env 1: t=2 (done): delta = 0 + 0 - 2 = -2 (last_value 3 unused)   A = -2
  #        t=1: delta = 1 + 0.9 * 2 - 0 = 2.8                   A = 2.8 + 0.45 * -2 = 1.9
  #        t=0: delta = 0 + 0.9 * 0 - 1 = -1                    A = -1 + 0.45 * 1.9 = -0.145
  advantages, returns = run_gae(0.9, 0.5)
  expected = np.array([[0.95, -0.145], [-1.0, 1.9], [5.6, -2.0]])
  np.testing.assert_allclose(advantages, expected, rtol=1e-6, atol=1e-6)
  # R = A + V.
  np.testing.assert_allclose(returns, [[1.45, 0.855], [0.0, 1.9], [5.6, 0.0]], rtol=1e-6,
                             atol=1e-6)
  assert advantages.dtype == jnp.float32 and advantages.shape == (3, 2)


def test_gae_lambda_one_is_discounted_return_minus_value():
  # Discounted returns, bootstrapped from last_value and cut at the dones (gamma = 0.9):
  # env 0: G2 = 2 + 0.9 * 4 = 5.6; G1 = 0 (done); G0 = 1 + 0.9 * 0 = 1.
  # env 1: G2 = 0 (done); G1 = 1 + 0.9 * 0 = 1; G0 = 0 + 0.9 * 1 = 0.9.
  # A = G - V: env 0 [1 - 0.5, 0 - 1, 5.6 - 0]; env 1 [0.9 - 1, 1 - 0, 0 - 2].
  advantages, returns = run_gae(0.9, 1.0)
  np.testing.assert_allclose(advantages, [[0.5, -0.1], [-1.0, 1.0], [5.6, -2.0]], atol=1e-6)
  np.testing.assert_allclose(returns, [[1.0, 0.9], [0.0, 1.0], [5.6, 0.0]], atol=1e-6)


def test_gae_lambda_zero_is_the_td_error_and_gamma_zero_the_reward():
  # lam = 0: A_t = delta_t (the deltas of the first test).
  advantages, _ = run_gae(0.9, 0.0)
  np.testing.assert_allclose(advantages, [[1.4, -1.0], [-1.0, 2.8], [5.6, -2.0]], atol=1e-6)
  # gamma = 0: A = r - V and R = r, whatever lam.
  advantages, returns = run_gae(0.0, 0.95)
  np.testing.assert_allclose(advantages, REWARDS - VALUES, atol=1e-7)
  np.testing.assert_allclose(returns, REWARDS, atol=1e-7)


def test_gae_matches_the_reference_masks_convention_and_jits():
  # The reference stores masks[t + 1] = 1 - done_t and value_preds[T] = next_value.
  rng = np.random.default_rng(0)
  t, e, gamma, lam = 7, 3, 0.9, 0.95
  rewards = rng.normal(size=(t, e)).astype(np.float32)
  values = rng.normal(size=(t + 1, e)).astype(np.float32)  # row T is next_value
  dones = (rng.random((t, e)) < 0.3).astype(np.float32)
  masks = np.concatenate([np.ones((1, e)), 1 - dones])  # [T + 1, E]
  expected = np.zeros((t, e))
  running = np.zeros(e)
  for step in reversed(range(t)):
    delta = rewards[step] + gamma * values[step + 1] * masks[step + 1] - values[step]
    running = delta + gamma * lam * masks[step + 1] * running
    expected[step] = running
  advantages, returns = gae_jit(rewards, values[:-1], dones.astype(bool), values[-1], gamma, lam)
  np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, expected + values[:-1], rtol=1e-5, atol=1e-5)


def test_normalize_advantages_unbiased_std_by_hand():
  # [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], squares sum 14, unbiased var 14/3.
  std = math.sqrt(14 / 3)  # 2.1602
  out = normalize_jit(jnp.array([1.0, 2.0, 3.0, 6.0]))
  np.testing.assert_allclose(out, np.array([-2, -1, 0, 3]) / (std + 1e-5), rtol=1e-6)
  # The masked entry (100) neither counts nor survives.
  out = normalize_jit(jnp.array([1.0, 2.0, 3.0, 100.0, 6.0]),
                             jnp.array([1, 1, 1, 0, 1]))
  np.testing.assert_allclose(out, np.array([-2, -1, 0, 0, 3]) / (std + 1e-5), rtol=1e-6)
  # One counted entry: no std, so zeros rather than nan.
  np.testing.assert_array_equal(normalize_jit(jnp.array([5.0, 7.0]), jnp.array([1, 0])),
                                [0.0, 0.0])


def test_advantages_and_returns_normalises_the_batch_but_not_the_returns():
  config = PPOConfig(gamma=0.9, gae_lambda=0.5, num_steps=3, num_envs=2, minibatch_size=2)
  rollout = (REWARDS, VALUES, DONES, LAST_VALUE)
  advantages, returns = advantages_and_returns_jit(config, *rollout)
  raw = np.array([0.95, -0.145, -1.0, 1.9, 5.6, -2.0])  # the first test's A, row-major
  mean = raw.sum() / 6  # 5.305 / 6
  std = math.sqrt(((raw - mean)**2).sum() / 5)
  np.testing.assert_allclose(advantages.reshape(-1), (raw - mean) / (std + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(returns, [[1.45, 0.855], [0.0, 1.9], [5.6, 0.0]], atol=1e-6)
  unnormalised, _ = advantages_and_returns_jit(
      dataclasses.replace(config, advantage_norm="minibatch"), *rollout)
  np.testing.assert_allclose(unnormalised.reshape(-1), raw, atol=1e-6)


# --- The sequence log-prob --------------------------------------------------------------------


def test_sequence_logprob_weights_thoughts_by_lambda():
  logp = jnp.array([[-1.0, -2.0, -3.0, -4.0],
                    [-0.5, -1.5, -jnp.inf, -jnp.inf]])  # row 1: two padding positions
  thought = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]])
  action = jnp.array([[0, 0, 1, 1], [0, 1, 0, 0]])
  # row 0: 0.5 * (-1 - 2) + (-3 - 4) = -8.5;  row 1: 0.5 * -0.5 + -1.5 = -1.75.
  np.testing.assert_allclose(sequence_logprob_jit(logp, thought, action, 0.5), [-8.5, -1.75])
  # lambda = 1 is the plain response log-prob; lambda = 0 the action alone.
  np.testing.assert_allclose(sequence_logprob_jit(logp, thought, action, 1.0), [-10.0, -2.0])
  np.testing.assert_allclose(sequence_logprob_jit(logp, thought, action, 0.0), [-7.0, -1.5])
  # d/dlogp: lambda on thoughts, 1 on actions, 0 (not nan) on the -inf padding.
  grad = jax.jit(jax.grad(lambda x: sequence_logprob(x, thought, action, 0.5).sum()))(logp)
  np.testing.assert_array_equal(grad, [[0.5, 0.5, 1.0, 1.0], [0.5, 1.0, 0.0, 0.0]])


# --- The loss ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="config")
def _loss_and_grads(new_logp, old_logp, advantages, values, old_values, returns, mask, config):
  def loss_fn(new_logp, values):
    return ppo_loss(new_logp, old_logp, advantages, values, old_values, returns, config,
                    mask_n=mask)

  return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(new_logp, values)


def loss_and_grads(*arrays, mask=None, config=PPOConfig()):
  """(loss, metrics) of ppo_loss on 2 samples, and its gradients w.r.t. new_logp and values.

  Always [2] arrays and an explicit mask, so each config compiles once.
  """
  mask = np.ones(2, bool) if mask is None else mask
  return _loss_and_grads(*[jnp.asarray(a, jnp.float32) for a in arrays], mask, config)


def one_sample_loss(ratio, advantage, config=PPOConfig(), value=1.0, old_value=1.0, ret=1.0):
  """ppo_loss and its gradient w.r.t. the new log-prob and the value, for one sample.

  A second, masked-out sample pads the batch (its zeros must change nothing).
  """
  args = [[x, 0.0] for x in (math.log(ratio), 0.0, advantage, value, old_value, ret)]
  (loss, metrics), (g_logp, g_value) = loss_and_grads(*args, mask=np.array([True, False]),
                                                      config=config)
  assert float(metrics["count"]) == 1.0 and float(g_logp[1]) == float(g_value[1]) == 0.0
  return float(loss), metrics, float(g_logp[0]), float(g_value[0])


@pytest.mark.parametrize(
    "ratio, advantage, policy_loss, grad, clipped",
    [
        # Inside [0.9, 1.1]: -r A = -1.05 * 2; d/dlogp (-r A) = -r A.
        (1.05, 2.0, -2.1, -2.1, 0.0),
        # A > 0, r = 1.5 > 1.1: min(1.5 * 2, 1.1 * 2) = 2.2, clipped: no gradient.
        (1.5, 2.0, -2.2, 0.0, 1.0),
        # A > 0, r = 0.5 < 0.9: min(0.5 * 2, 0.9 * 2) = 1.0, not clipped: gradient -0.5 * 2.
        (0.5, 2.0, -1.0, -1.0, 0.0),
        # A < 0, r = 0.5 < 0.9: min(0.5 * -2, 0.9 * -2) = -1.8, clipped: no gradient.
        (0.5, -2.0, 1.8, 0.0, 1.0),
        # A < 0, r = 1.5 > 1.1: min(1.5 * -2, 1.1 * -2) = -3, not clipped: gradient 1.5 * 2.
        (1.5, -2.0, 3.0, 3.0, 0.0),
    ])
def test_clipped_surrogate_regimes_by_hand(ratio, advantage, policy_loss, grad, clipped):
  # value = old value = return, so the value loss is 0 and loss = policy loss.
  loss, metrics, g_logp, _ = one_sample_loss(ratio, advantage)
  assert loss == pytest.approx(policy_loss, rel=1e-5)
  assert float(metrics["policy_loss"]) == pytest.approx(policy_loss, rel=1e-5)
  assert float(metrics["value_loss"]) == 0.0
  assert g_logp == pytest.approx(grad, rel=1e-5, abs=1e-7)
  assert float(metrics["clip_fraction"]) == clipped
  assert float(metrics["ratio_mean"]) == pytest.approx(ratio, rel=1e-6)
  # k3: r - 1 - log r.
  assert float(metrics["approx_kl"]) == pytest.approx(ratio - 1 - math.log(ratio), abs=1e-6)


def test_ratio_guard_drops_runaway_samples():
  # r = 20, A = -1: min(-20, -1.1) = -20, so loss 20 and gradient 20; the guard takes
  # -clip(r) A = 1.1 alone, with no gradient.
  loss, metrics, grad, _ = one_sample_loss(20.0, -1.0, PPOConfig(ratio_guard=None))
  assert (loss, grad) == (pytest.approx(20.0, rel=1e-5), pytest.approx(20.0, rel=1e-5))
  loss, metrics, grad, _ = one_sample_loss(20.0, -1.0)
  assert (loss, grad) == (pytest.approx(1.1, rel=1e-5), 0.0)
  assert float(metrics["guard_fraction"]) == 1.0 and float(metrics["clip_fraction"]) == 1.0
  # Below the guard nothing changes: r = 5, A = -1 gives min(-5, -1.1) = -5.
  assert one_sample_loss(5.0, -1.0)[0] == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize(
    "value, value_loss, grad, clipped",
    [
        # old value 1, return 2, value clip 0.1.
        # Inside the clip: 0.5 * (1.05 - 2)^2 = 0.5 * 0.9025; gradient (1.05 - 2) * 0.5 coef.
        (1.05, 0.45125, -0.95 * 0.5, 0.0),
        # Towards the return beyond the clip: max((1.5 - 2)^2, (1.1 - 2)^2) = 0.81, clipped
        # term wins: 0.5 * 0.81, no gradient.
        (1.5, 0.405, 0.0, 1.0),
        # Away from the return: max((0.5 - 2)^2, (0.9 - 2)^2) = 2.25 unclipped: 0.5 * 2.25,
        # gradient (0.5 - 2) times value_coef 0.5.
        (0.5, 1.125, -1.5 * 0.5, 1.0),
    ])
def test_clipped_value_loss_regimes_by_hand(value, value_loss, grad, clipped):
  # ratio 1 and advantage 0: the policy loss is 0, so loss = 0.5 * value_loss.
  loss, metrics, _, g_value = one_sample_loss(1.0, 0.0, value=value, old_value=1.0, ret=2.0)
  assert float(metrics["value_loss"]) == pytest.approx(value_loss, rel=1e-5)
  assert loss == pytest.approx(0.5 * value_loss, rel=1e-5)
  assert g_value == pytest.approx(grad, rel=1e-5, abs=1e-7)
  assert float(metrics["value_clip_fraction"]) == clipped


def test_unclipped_value_loss_and_the_helper():
  # value_clip None: 0.5 * (1.5 - 2)^2 = 0.125 where the clipped loss is 0.405.
  loss, metrics, _, g_value = one_sample_loss(1.0, 0.0, PPOConfig(value_clip=None), value=1.5,
                                              old_value=1.0, ret=2.0)
  assert float(metrics["value_loss"]) == pytest.approx(0.125)
  assert g_value == pytest.approx(0.5 * (1.5 - 2.0))
  per_sample, clipped = jax.jit(clipped_value_loss, static_argnums=3)(
      np.array([1.05, 1.5, 0.5]), np.ones(3), np.full(3, 2.0), 0.1)
  np.testing.assert_allclose(per_sample, [0.45125, 0.405, 1.125], rtol=1e-5)
  np.testing.assert_array_equal(clipped, [False, True, True])


def test_ppo_loss_batch_means_and_metrics_by_hand():
  # Two samples: (r = 1.05, A = 2) -> -2.1 and (r = 1.5, A = -2) -> 3; policy loss 0.45.
  # Values: (V 1.05, V_old 1, R 2) -> 0.45125 and (V 0.5, V_old 1, R 2) -> 1.125; mean 0.788125.
  # loss = 0.45 + 0.5 * 0.788125 = 0.8440625.
  new_logp = jnp.log(jnp.array([1.05, 1.5]))
  zeros = jnp.zeros(2)
  values, returns = jnp.array([1.05, 0.5]), jnp.array([2.0, 2.0])
  (loss, metrics), _ = loss_and_grads(new_logp, zeros, jnp.array([2.0, -2.0]), values,
                                      jnp.ones(2), returns)
  assert float(loss) == pytest.approx(0.8440625, rel=1e-5)
  assert float(metrics["policy_loss"]) == pytest.approx(0.45, rel=1e-5)
  assert float(metrics["value_loss"]) == pytest.approx(0.788125, rel=1e-5)
  assert float(metrics["ratio_max"]) == pytest.approx(1.5, rel=1e-6)
  assert float(metrics["count"]) == 2.0
  # Var(R) = 0: explained variance reported as 0.
  assert float(metrics["explained_variance"]) == 0.0
  # R = [1, 3], V = [1, 2]: Var(R - V) = Var([0, 1]) = 0.25, Var(R) = 1 -> 1 - 0.25 = 0.75.
  (_, metrics), _ = loss_and_grads(zeros, zeros, zeros, jnp.array([1.0, 2.0]),
                                   jnp.array([1.0, 2.0]), jnp.array([1.0, 3.0]))
  assert float(metrics["explained_variance"]) == pytest.approx(0.75)


def test_minibatch_advantage_normalisation_by_hand():
  # A = [1, 3]: mean 2, unbiased std sqrt(2) -> [-1, 1] / (sqrt(2) + 1e-5).
  # r = 1 for both: policy loss = mean(-A_norm) = 0; with advantage_norm "batch" it is
  # mean(-[1, 3]) = -2.
  zeros, ones = jnp.zeros(2), jnp.ones(2)
  advantages = jnp.array([1.0, 3.0])
  (loss, _), _ = loss_and_grads(zeros, zeros, advantages, ones, ones, ones)
  assert float(loss) == pytest.approx(-2.0)
  (loss, _), (grad, _) = loss_and_grads(zeros, zeros, advantages, ones, ones, ones,
                                        config=PPOConfig(advantage_norm="minibatch"))
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  # d/dlogp_i of mean(-r_i A_i) = -A_i / 2 at r = 1.
  a = 1 / (math.sqrt(2) + 1e-5)
  np.testing.assert_allclose(grad, [a / 2, -a / 2], rtol=1e-5)


def test_masked_samples_are_ignored_even_when_nan():
  # Sample 1 is garbage (nan log-prob, inf value): with it masked, the loss and the
  # gradient are sample 0's alone: r = 1.05, A = 2 -> -2.1 (values at their returns).
  new_logp = jnp.array([math.log(1.05), jnp.nan])
  values = jnp.array([1.0, jnp.inf])
  mask = jnp.isfinite(new_logp)

  (loss, metrics), (g_logp, g_value) = loss_and_grads(
      new_logp, jnp.zeros(2), jnp.array([2.0, 5.0]), values, jnp.ones(2), jnp.ones(2), mask=mask)
  assert float(loss) == pytest.approx(-2.1, rel=1e-5)
  assert float(metrics["count"]) == 1.0
  np.testing.assert_allclose(g_logp, [-2.1, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(g_value, [0.0, 0.0])


# --- Config -------------------------------------------------------------------------------------


def test_config_defaults_follow_the_reference_and_hash():
  config = PPOConfig()
  assert (config.clip_eps, config.value_clip, config.value_coef) == (0.1, 0.1, 0.5)
  assert (config.gamma, config.gae_lambda, config.epochs) == (0.9, 0.95, 4)
  assert (config.learning_rate, config.end_learning_rate, config.max_grad_norm) == (1e-5, 1e-9,
                                                                                     0.01)
  assert (config.temperature, config.thought_coef) == (0.2, 0.5)
  # 512 samples in mini-batches of 128, 4 epochs: 16 optimizer steps per update.
  assert (config.batch_size, config.optimizer_steps_per_update) == (512, 16)
  assert hash(config) == hash(PPOConfig())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(clip_eps=0.0), "clip_eps"),
        (dict(value_clip=-0.1), "value_clip"),
        (dict(value_coef=-1.0), "value_coef"),
        (dict(ratio_guard=1.05), "ratio_guard"),
        (dict(gamma=1.5), "gamma"),
        (dict(gae_lambda=-0.1), "gae_lambda"),
        (dict(advantage_norm="per_token"), "advantage_norm 'per_token'; known: batch"),
        (dict(epochs=0), "epochs"),
        (dict(minibatch_size=100), r"minibatch_size \(100\) must divide .* = 512"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(end_learning_rate=1e-4), "end_learning_rate"),
        (dict(temperature=0.0), "temperature"),
        (dict(thought_coef=2.0), "thought_coef"),
    ])
def test_config_validation(overrides, message):
  with pytest.raises(ValueError, match=message):
    PPOConfig(**overrides)


def test_optimizer_config_reaches_the_end_rate_after_the_decay_updates():
  config = PPOConfig()
  opt, num_steps = ppo_optimizer_config(config)
  assert num_steps == 25 * 16
  assert (opt.eps, opt.grad_clip_norm, opt.weight_decay) == (1e-7, 0.01, 0.0)
  schedule = learning_rate_schedule(opt, num_steps)
  # Cosine: 1e-5 at 0, (1e-5 + 1e-9) / 2 halfway, 1e-9 at the end and after.
  assert float(schedule(0)) == pytest.approx(1e-5)
  assert float(schedule(num_steps // 2)) == pytest.approx((1e-5 + 1e-9) / 2, rel=1e-4)
  assert float(schedule(num_steps)) == pytest.approx(1e-9, rel=1e-3)
  assert float(schedule(2 * num_steps)) == pytest.approx(1e-9, rel=1e-3)


# --- Value head and mini-batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def value_head():
  """(ValueHead with default widths, its params on D = 32, a [5, 32] input, jitted apply)."""
  head = ValueHead()
  x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
  return head, jax.jit(head.init)(jax.random.key(1), x), x, jax.jit(head.apply)


def test_value_head_shapes_init_and_reference_widths(value_head):
  head, params, x, apply = value_head
  params = nn.meta.unbox(params)["params"]
  # 32 -> 8 -> 4 -> 1: the reference's 4096 -> 1024 -> 512 -> 1 ratios.
  assert jax.tree_util.tree_map(lambda p: p.shape, params) == {
      "hidden_0": {"kernel": (32, 8), "bias": (8,)},
      "hidden_1": {"kernel": (8, 4), "bias": (4,)},
      "out": {"kernel": (4, 1), "bias": (1,)}}
  assert reference_value_widths(4096) == (1024, 512)
  # torch.nn.Linear's init: kernel and bias within 1/sqrt(fan_in) (1/sqrt(32), 1/2, 1/2).
  for name, fan_in in (("hidden_0", 32), ("hidden_1", 8), ("out", 4)):
    for leaf in params[name].values():
      assert 0 < np.abs(leaf).max() <= fan_in**-0.5
  out = apply({"params": params}, x.astype(jnp.bfloat16))  # any dtype in, fp32 out
  assert out.shape == (5,) and out.dtype == jnp.float32
  custom_params = jax.eval_shape(ValueHead(hidden_features=(6,)).init, jax.random.key(1), x)
  assert nn.meta.unbox(custom_params)["params"]["out"]["kernel"].shape == (6, 1)
  with pytest.raises(AssertionError):
    jax.eval_shape(head.apply, {"params": params}, x[None])


def test_value_head_is_a_function_of_its_row_only(value_head):
  _, params, x, apply = value_head
  out = apply(params, x)
  # Same row, different companions (and alone): same value; the function is deterministic.
  other = np.concatenate([x[:1], np.random.default_rng(1).normal(size=(4, 32))], dtype=np.float32)
  np.testing.assert_allclose(apply(params, other)[0], out[0], rtol=1e-6)
  np.testing.assert_allclose(apply(params, x[:1])[0], out[0], rtol=1e-6)  # [1, D] compiles anew
  np.testing.assert_array_equal(apply(params, x), out)
  # ...and it does depend on the input, and on the parameters.
  assert not np.allclose(out[0], out[1])
  shifted = jax.tree_util.tree_map(lambda p: p + 0.1, params)
  assert not np.allclose(apply(shifted, x), out)


def test_minibatch_indices_are_per_epoch_permutations():
  # 14 items in mini-batches of 4: 3 per epoch, the remainder (2) dropped; no repeats
  # within an epoch, a fresh order each epoch.
  idx = minibatch_indices_jit(jax.random.key(0), 14, 4, 3)
  assert idx.shape == (3, 3, 4) and idx.dtype == jnp.int32
  for epoch in np.asarray(idx):
    assert len(set(epoch.reshape(-1))) == 12 and set(epoch.reshape(-1)) <= set(range(14))
  assert not np.array_equal(idx[0], idx[1])
  with pytest.raises(ValueError, match="minibatch_size"):
    minibatch_indices(jax.random.key(0), 3, 4, epochs=1)
  with pytest.raises(ValueError, match="epochs"):
    minibatch_indices(jax.random.key(0), 3, 1, epochs=0)
