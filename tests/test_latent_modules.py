"""The latent action model's modules and losses against hand computations, on tiny sizes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.latent import (CODEBOOK_STATE, GUMBEL_RNG, RESTART_RNG, GumbelCodebook,
                               InverseDynamics, LatentConfig, LatentConfigError, LatentModules,
                               Policy, Projector, VQCodebook, backbone_lm_head,
                               behaviour_cloning_loss, code_neg_entropy, codebook_metrics,
                               cross_entropy, cycle_loss, gaussian_nll, gumbel_softmax,
                               init_kv_cache, masked_mean, next_token_targets, projection_loss)
from latent_mca.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, TextConfig, VisionConfig

D = 32
TEXT = TextConfig(vocab_size=512, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                  mrope_section=(2, 1, 1), max_position_embeddings=256)
SMALL = LatentConfig(num_codes=8, idm_layers=2, policy_layers=2)


def key(seed: int):
  """A PRNG key of the "unsafe_rbg" kind: threefry compiles slowly on CPU, and no test needs it."""
  return jax.random.key(seed, impl="unsafe_rbg")


def random_variables(module, *args, seed: int = 0):
  """Variables of `module.init(*args)`'s structure, drawn by numpy (norm scales at 1).

  Cheaper than compiling `init` on a small CPU; the properties under test hold
  for any weights.
  """
  shapes = jax.eval_shape(lambda: nn.unbox(module.init(key(0), *args)))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return np.ones(leaf.shape, leaf.dtype)
    return (0.1 * rng.randn(*leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def text_positions(attention_mask_bt):
  """[3, B, T]: 0, 1, ... from the first real token (left padding gets 0)."""
  pos = jnp.maximum(jnp.cumsum(attention_mask_bt, axis=1) - 1, 0)
  return jnp.broadcast_to(pos, (3, *pos.shape))


def softmax_np(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------ config

def test_config_defaults_and_validation():
  cfg = LatentConfig()
  assert (cfg.num_codes, cfg.gumbel_tau, cfg.entropy_coef) == (128, 2.0, 1e-3)
  assert (cfg.idm_layers, cfg.policy_layers, cfg.world_model_merge_layers) == (4, 8, 2)
  assert (cfg.proj_nll_coef, cfg.cycle_coef, cfg.vq_commitment_beta) == (1e-5, 1e-5, 0.25)
  assert cfg.projector_width(2048) == 1024
  assert cfg.cycle_enabled
  # Each ablation is one switch: no projector or no text-only data also means no cycle term.
  assert not cfg.replace(use_projector=False).cycle_enabled
  assert not cfg.replace(use_text_only=False).cycle_enabled
  with pytest.raises(LatentConfigError, match="quantizer"):
    LatentConfig(quantizer="fsq")
  with pytest.raises(LatentConfigError, match="gumbel_tau"):
    LatentConfig(gumbel_tau=0.0)


# ---------------------------------------------------------- (a) Gumbel codebook

def test_gumbel_softmax_is_one_hot_forward_and_soft_backward():
  rng = np.random.RandomState(0)
  logits, cotangent = rng.randn(2, 5, 8).astype(np.float32), rng.randn(2, 5, 8).astype(np.float32)
  rng_key, tau = key(2), 2.0
  noise = np.asarray(jax.random.gumbel(rng_key, logits.shape))

  one_hot, probs = gumbel_softmax(logits, tau, rng_key)
  one_hot = np.asarray(one_hot)
  assert set(np.unique(one_hot)) <= {0.0, 1.0}
  np.testing.assert_array_equal(one_hot.sum(-1), 1.0)
  np.testing.assert_array_equal(one_hot.argmax(-1), np.argmax(logits + noise, -1))
  np.testing.assert_allclose(probs, softmax_np(np.asarray((logits + noise) / tau)), rtol=1e-6)

  def straight_through(l):
    return jnp.sum(cotangent * gumbel_softmax(l, tau, rng_key)[0])

  def soft_only(l):
    return jnp.sum(cotangent * jax.nn.softmax((l + noise) / tau, axis=-1))

  grad_st = jax.jit(jax.grad(straight_through))(logits)
  grad_soft = jax.jit(jax.grad(soft_only))(logits)
  assert np.abs(grad_soft).max() > 1e-3
  np.testing.assert_allclose(grad_st, grad_soft, rtol=1e-5, atol=1e-7)

  # Deterministic (evaluation): no noise.
  one_hot, probs = gumbel_softmax(logits, tau)
  np.testing.assert_array_equal(np.asarray(one_hot).argmax(-1), np.argmax(logits, -1))
  np.testing.assert_allclose(probs, softmax_np(np.asarray(logits) / tau), rtol=1e-6)


def test_gumbel_codebook_embedding_entropy_and_gradients():
  cfg = SMALL.replace(entropy_coef=0.1)
  codebook = GumbelCodebook(cfg, D)
  logits = np.random.RandomState(0).randn(2, 4, 8).astype(np.float32)
  weights = np.array([[1, 1, 1, 0], [0, 1, 1, 0]], np.float32)
  params = nn.unbox(jax.jit(codebook.init, static_argnames="deterministic")(
      key(1), logits, weights, deterministic=True))
  rngs = {GUMBEL_RNG: key(3)}
  apply = jax.jit(lambda params, logits: codebook.apply(params, logits, weights,
                                                        deterministic=False, rngs=rngs))
  out = apply(params, logits)

  table = np.asarray(params["params"]["codebook"])
  np.testing.assert_allclose(out.embedding, table[np.asarray(out.codes)], rtol=1e-6)
  np.testing.assert_array_equal(codebook.apply(params, out.codes, method="lookup"),
                                table[np.asarray(out.codes)])
  p = softmax_np(np.asarray(logits))
  neg_entropy = (p * np.log(p)).sum(-1)
  w = np.asarray(weights)
  np.testing.assert_allclose(out.aux_loss[0], 0.1 * (neg_entropy * w).sum(), rtol=1e-5)
  assert float(out.aux_loss[1]) == w.sum()

  # The codebook learns only the rows that were picked; the logits learn through the soft probs.
  def loss(params, logits):
    return jnp.sum(apply(params, logits).embedding ** 2)

  g_params, g_logits = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, logits)
  rows_with_grad = np.flatnonzero(np.abs(g_params["params"]["codebook"]).sum(-1))
  np.testing.assert_array_equal(rows_with_grad, np.unique(np.asarray(out.codes)))
  assert np.abs(g_logits).max() > 0


# ------------------------------------------------- (b) IDM / policy one-step shift

@pytest.fixture(scope="module")
def shift_setup():
  """(h [2, 6, D], jitted h -> (idm_out, policy_logits), policy, its variables, mask)."""
  b, t = 2, 6
  h = jnp.asarray(np.random.RandomState(0).randn(b, t, D).astype(np.float32))
  mask = jnp.array([[1] * t, [0] + [1] * (t - 1)], jnp.int32)
  idm, policy = InverseDynamics(TEXT, SMALL), Policy(TEXT, SMALL)
  positions = text_positions(mask)
  idm_vars = random_variables(idm, h, positions, mask, seed=1)
  policy_vars = random_variables(policy, h, positions, mask, seed=2)

  @jax.jit
  def run(h):
    return (idm.apply(idm_vars, h, positions, mask),
            policy.apply(policy_vars, h, positions, mask)[0])

  return h, run, policy, policy_vars, mask


def changed(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1e-5


def test_idm_sees_the_next_token_and_the_policy_only_the_present(shift_setup):
  h, run, *_ = shift_setup
  t = 2
  idm, policy = run(h)
  assert idm.shape == policy.shape == (2, 6, SMALL.num_codes)
  np.testing.assert_array_equal(idm[:, -1], 0.0)  # the last step has no successor

  idm_next, policy_next = run(h.at[:, t + 1].add(1.0))
  assert changed(idm_next[:, t], idm[:, t])
  np.testing.assert_allclose(policy_next[:, t], policy[:, t], atol=1e-6)
  assert changed(policy_next[:, t + 1], policy[:, t + 1])
  np.testing.assert_allclose(idm_next[:, t - 1], idm[:, t - 1], atol=1e-6)

  idm_later, policy_later = run(h.at[:, t + 2].add(1.0))
  np.testing.assert_allclose(idm_later[:, t], idm[:, t], atol=1e-6)
  np.testing.assert_allclose(policy_later[:, t], policy[:, t], atol=1e-6)
  assert changed(idm_later[:, t + 1], idm[:, t + 1])

  idm_now, policy_now = run(h.at[:, t].add(1.0))
  assert changed(policy_now[:, t], policy[:, t])
  assert changed(idm_now[:, t], idm[:, t])


def test_idm_input_is_stop_gradient_and_policy_input_is_not(shift_setup):
  h, run, *_ = shift_setup
  g_idm, g_policy = jax.jit(lambda h: [jax.grad(lambda h: jnp.sum(run(h)[i] ** 2))(h)
                                        for i in (0, 1)])(h)
  np.testing.assert_array_equal(g_idm, 0.0)
  assert np.abs(g_policy).max() > 0


def test_policy_kv_cache_matches_full_forward(shift_setup):
  h, run, policy, policy_vars, mask = shift_setup
  full = run(h)[1]
  positions = text_positions(mask)
  b, t = mask.shape
  prefill = 4
  apply = jax.jit(lambda *args: policy.apply(policy_vars, *args))
  cache = init_kv_cache(TEXT, SMALL.policy_layers, b, t)
  cache_mask = jnp.zeros_like(mask).at[:, :prefill].set(mask[:, :prefill])
  logits, cache = apply(h[:, :prefill], positions[:, :, :prefill], cache_mask, cache, 0)
  steps = [logits]
  for i in range(prefill, t):
    cache_mask = cache_mask.at[:, i].set(1)
    logits, cache = apply(h[:, i:i + 1], positions[:, :, i:i + 1], cache_mask, cache, i)
    steps.append(logits)
  incremental = jnp.concatenate(steps, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-5)


# -------------------------------------------------------- (c) projector losses

def nll_np(mu, logvar, target, weights):
  per_token = ((mu - target) ** 2 * np.exp(-logvar) + logvar).sum(-1)
  return (per_token * weights).sum(), weights.sum()


def test_gaussian_nll_by_hand_with_masking():
  rng = np.random.RandomState(0)
  mu, logvar, target = (rng.randn(2, 3, 4).astype(np.float32) for _ in range(3))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  total, count = gaussian_nll(mu, logvar, target, weights)
  expected = sum(((mu[b, t] - target[b, t]) ** 2 * np.exp(-logvar[b, t]) + logvar[b, t]).sum()
                 for b, t in [(0, 0), (0, 1), (1, 0)])
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert float(count) == 3.0
  np.testing.assert_allclose(masked_mean((total, count)), expected / 3, rtol=1e-5)
  # Padded tokens do not matter, and the target is data (no gradient).
  target_moved = target.copy()
  target_moved[0, 2] += 100.0
  np.testing.assert_allclose(gaussian_nll(mu, logvar, target_moved, weights)[0], total)
  g = jax.grad(lambda tg: gaussian_nll(mu, logvar, tg, weights)[0])(jnp.asarray(target))
  np.testing.assert_array_equal(g, 0.0)


def test_projector_matches_its_formula():
  x = np.random.RandomState(0).randn(2, 3, D).astype(np.float32)
  projector = Projector(SMALL.projector_width(D))
  params = nn.unbox(jax.jit(projector.init)(key(1), x))["params"]
  mu, logvar = jax.jit(projector.apply)({"params": params}, x)

  def mlp(p, x):
    hidden = np.tanh(x @ np.asarray(p["fc_in"]["kernel"]) + np.asarray(p["fc_in"]["bias"]))
    return hidden @ np.asarray(p["fc_out"]["kernel"]) + np.asarray(p["fc_out"]["bias"])

  assert params["mean"]["fc_in"]["kernel"].shape == (D, D // 2)
  np.testing.assert_allclose(mu, mlp(params["mean"], x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logvar, np.tanh(mlp(params["logvar"], x)), rtol=1e-5, atol=1e-6)


def test_cycle_and_projection_losses_by_hand():
  rng = np.random.RandomState(1)
  h_text = rng.randn(2, 3, 4).astype(np.float32)
  h_image = rng.randn(2, 3, 4).astype(np.float32)
  weights = np.array([[1, 1, 1], [0, 1, 1]], np.float32)

  def projector(h):
    return 2.0 * jnp.tanh(h), 0.5 * h

  def inverse_projector(h):
    return h - 0.3, jnp.tanh(h)

  mu = 2.0 * np.tanh(h_text)
  expected_cycle = nll_np(mu - 0.3, np.tanh(mu), h_text, weights)
  np.testing.assert_allclose(cycle_loss(projector, inverse_projector, h_text, weights),
                             expected_cycle, rtol=1e-5)
  forward = nll_np(2.0 * np.tanh(h_text), 0.5 * h_text, h_image, weights)[0]
  backward = nll_np(h_image - 0.3, np.tanh(h_image), h_text, weights)[0]
  np.testing.assert_allclose(
      projection_loss(projector, inverse_projector, h_text, h_image, weights),
      (forward + backward, weights.sum()), rtol=1e-5)


def test_cycle_loss_trains_both_projectors_through_the_mean_only():
  h = np.random.RandomState(0).randn(2, 3, D).astype(np.float32)
  weights = np.ones((2, 3), np.float32)
  p, p_inv = Projector(D // 2), Projector(D // 2)
  params = {"p": random_variables(p, h, seed=1)["params"],
            "p_inv": random_variables(p_inv, h, seed=2)["params"]}

  def loss(params):
    return cycle_loss(lambda x: p.apply({"params": params["p"]}, x),
                      lambda x: p_inv.apply({"params": params["p_inv"]}, x), h, weights)[0]

  grads = jax.jit(jax.grad(loss))(params)
  norm = lambda tree: sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(tree))
  assert norm(grads["p"]["mean"]) > 0
  assert norm(grads["p_inv"]["mean"]) > 0 and norm(grads["p_inv"]["logvar"]) > 0
  assert norm(grads["p"]["logvar"]) == 0.0  # P's variance plays no part in the cycle


# ------------------------------------------------------------ token losses

def test_next_token_cross_entropy_and_behaviour_cloning_by_hand():
  ids = jnp.array([[0, 5, 6, 7], [3, 4, 0, 0]])
  mask = jnp.array([[0, 1, 1, 1], [1, 1, 0, 0]])
  targets, weights = next_token_targets(ids, mask)
  np.testing.assert_array_equal(targets, [[5, 6, 7, 0], [4, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[0, 1, 1, 0], [1, 0, 0, 0]])

  logits = np.random.RandomState(0).randn(2, 4, 9).astype(np.float32)
  log_p = np.log(softmax_np(logits))
  expected = -(log_p[0, 1, 6] + log_p[0, 2, 7] + log_p[1, 0, 4])
  total, count = cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert float(count) == 3.0

  codes = jnp.array([[1, 2, 3, 0], [8, 0, 0, 0]])
  expected_bc = -(log_p[0, 1, 2] + log_p[0, 2, 3] + log_p[1, 0, 8])
  np.testing.assert_allclose(behaviour_cloning_loss(logits, codes, weights)[0], expected_bc,
                             rtol=1e-5)

  p = softmax_np(logits)
  expected_ent = sum((p[b, t] * np.log(p[b, t])).sum() for b, t in [(0, 1), (0, 2), (1, 0)])
  np.testing.assert_allclose(code_neg_entropy(logits, weights)[0], expected_ent, rtol=1e-5)


# ---------------------------------------------------------------- (d) VQ codebook

VQ = LatentConfig(quantizer="vq", num_codes=4, vq_ema_decay=0.9, vq_dead_code_threshold=1.0,
                  vq_commitment_beta=0.25)
TABLE = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)


def vq_setup(counts):
  """A VQ codebook whose vectors are TABLE, with the given EMA counts."""
  counts = np.asarray(counts, np.float32)
  state = {CODEBOOK_STATE: {"counts": jnp.asarray(counts),
                            "sums": jnp.asarray(TABLE * counts[:, None])}}
  x = np.array([[[0.1, 0.0, 0.1], [0.9, 0.2, 0.0], [0.8, -0.1, 0.1], [-0.2, 0.1, 0.0],
                 [0.0, 0.1, 5.0]]], np.float32)  # the last (padded) token is nearest to code 3
  weights = np.array([[1, 1, 1, 1, 0]], np.float32)
  return VQCodebook(VQ, 3), state, x, weights


def vq_train_step(vq, state, x, weights, rng):
  """(output, updated state) of a training call, as a stage would jit it."""
  @jax.jit
  def step(state, x, rng):
    return vq.apply(state, x, weights, deterministic=False, mutable=[CODEBOOK_STATE],
                    rngs={RESTART_RNG: rng})
  return step(state, x, rng)


def test_vq_nearest_code_straight_through_and_commitment():
  vq, state, x, weights = vq_setup([10.0] * 4)
  apply = jax.jit(lambda x: vq.apply(state, x, weights, deterministic=True))
  out = apply(x)
  dist = ((x[:, :, None, :] - TABLE[None, None]) ** 2).sum(-1)
  codes = dist.argmin(-1)
  np.testing.assert_array_equal(out.codes, codes)
  np.testing.assert_array_equal(out.codes, [[0, 1, 1, 0, 3]])
  np.testing.assert_allclose(out.embedding, TABLE[codes], atol=1e-6)
  np.testing.assert_array_equal(out.one_hot, np.eye(4)[codes])

  commitment = ((x - TABLE[codes]) ** 2).mean(-1)
  np.testing.assert_allclose(out.aux_loss[0], 0.25 * (commitment * weights).sum(), rtol=1e-5)
  assert float(out.aux_loss[1]) == 4.0
  assert int(out.metrics["codes_used"]) == 2  # the padded token's code 3 does not count

  cotangent = np.random.RandomState(0).randn(*x.shape).astype(np.float32)
  g = jax.jit(jax.grad(lambda x: jnp.sum(cotangent * apply(x).embedding)))(x)
  np.testing.assert_allclose(g, cotangent, rtol=1e-6)  # identity through the quantiser
  g_commit = jax.jit(jax.grad(lambda x: apply(x).aux_loss[0]))(x)
  np.testing.assert_allclose(g_commit, 0.25 * 2 * (x - TABLE[codes]) / 3 * weights[..., None],
                             rtol=1e-5, atol=1e-7)


def test_vq_ema_update_by_hand():
  vq, state, x, weights = vq_setup([10.0] * 4)
  out, new = vq_train_step(vq, state, x, weights, key(0))
  codes = np.asarray(out.codes)
  one_hot = np.eye(4)[codes] * weights[..., None]  # [1, 5, 4], padded token dropped
  counts = 0.9 * 10.0 + 0.1 * one_hot.sum((0, 1))
  sums = 0.9 * 10.0 * TABLE + 0.1 * np.einsum("btc,btd->cd", one_hot, x)
  np.testing.assert_allclose(new[CODEBOOK_STATE]["counts"], counts, rtol=1e-6)
  np.testing.assert_allclose(new[CODEBOOK_STATE]["sums"], sums, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new[CODEBOOK_STATE]["sums"] / new[CODEBOOK_STATE]["counts"][:, None],
                             sums / counts[:, None], rtol=1e-5)
  # The outputs use the codebook from before the update; evaluation leaves the state alone.
  np.testing.assert_allclose(out.embedding, TABLE[codes], atol=1e-6)


def test_vq_dead_codes_restart_from_real_inputs():
  # Codes 2 and 3 are barely used: after decay their counts fall below the threshold.
  vq, state, x, weights = vq_setup([10.0, 10.0, 0.5, 0.5])
  _, new = vq_train_step(vq, state, x, weights, key(1))
  codebook = np.asarray(new[CODEBOOK_STATE]["sums"] / new[CODEBOOK_STATE]["counts"][:, None])
  real_inputs = x[0, :4]
  for c in (2, 3):
    distance = np.abs(real_inputs - codebook[c]).max(-1)
    assert distance.min() < 1e-6, f"code {c} was not restarted from a real input"
  np.testing.assert_allclose(new[CODEBOOK_STATE]["counts"][2:], 1.0)
  # Live codes follow the EMA.
  np.testing.assert_allclose(new[CODEBOOK_STATE]["counts"][:2], [9.0 + 0.2, 9.0 + 0.2], rtol=1e-6)


# --------------------------------------------------------------- (e) world model

def test_world_model_uses_the_action_and_the_backbone_head():
  backbone_cfg = Qwen2_5_VLConfig.tiny().replace(
      text=TEXT, vision=VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                     out_hidden_size=D, fullatt_block_indexes=(0,)))
  backbone = Qwen2_5_VL(backbone_cfg)
  ids = jnp.array([[1, 5, 6, 7, 8]])
  backbone_params = random_variables(backbone, ids)["params"]
  out = jax.jit(backbone.apply)({"params": backbone_params}, ids)
  lm_head = jax.jit(backbone_lm_head(backbone, backbone_params))
  h = out.hidden_states
  # The final norm's scale starts at 1, so re-normalising h_t barely changes it (up to eps)...
  np.testing.assert_allclose(lm_head(h), out.logits, rtol=1e-2, atol=1e-4)
  # ... and the norm is applied: the head alone would scale with its input.
  np.testing.assert_allclose(lm_head(3.0 * h), lm_head(h), rtol=1e-4, atol=1e-6)

  modules = LatentModules.build(TEXT, SMALL)
  variables = {name: nn.unbox(modules.init_fns()[name](key(i)))
               for i, name in enumerate(("codebook", "world_model"))}

  @jax.jit
  def predict(code):
    action = modules.codebook.apply(variables["codebook"], jnp.full(ids.shape, code),
                                    method="lookup")
    return modules.world_model.apply(variables["world_model"], h, action, lm_head)

  logits_3, logits_7 = predict(3), predict(7)
  assert logits_3.shape == (1, 5, TEXT.vocab_size)
  assert changed(logits_3, logits_7)
  np.testing.assert_array_equal(predict(3), logits_3)


def test_latent_modules_variables():
  for quantizer in ("gumbel", "vq"):
    modules = LatentModules.build(TEXT, SMALL.replace(quantizer=quantizer))
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(modules.abstract()))
    assert set(shapes) == {"inverse_dynamics", "codebook", "world_model", "policy", "projector",
                           "inverse_projector"}
    layers = shapes["inverse_dynamics"]["params"]["decoder"]["layers"]
    assert layers["q_proj"]["kernel"] == (SMALL.idm_layers, D, D)
    idm_out = D if quantizer == "vq" else SMALL.num_codes
    assert shapes["inverse_dynamics"]["params"]["decoder"]["head"]["kernel"] == (D, idm_out)
    assert shapes["policy"]["params"]["decoder"]["layers"]["q_proj"]["kernel"][0] == 2
    assert shapes["policy"]["params"]["decoder"]["head"]["kernel"] == (D, SMALL.num_codes)
    assert set(shapes["world_model"]["params"]) == {"merge_0", "merge_1"}
    assert shapes["projector"]["params"]["mean"]["fc_in"]["kernel"] == (D, D // 2)
    if quantizer == "vq":
      assert shapes["codebook"] == {CODEBOOK_STATE: {"counts": (8,), "sums": (8, D)}}
    else:
      assert shapes["codebook"] == {"params": {"codebook": (8, D)}}


# ------------------------------------------------------------ (f) usage metrics

def test_codebook_metrics_by_hand():
  c = 8
  codes = jnp.tile(jnp.arange(c), 3).reshape(2, 12)
  uniform = codebook_metrics(jax.nn.one_hot(codes, c), jnp.ones((2, 12)))
  np.testing.assert_allclose(uniform["perplexity"], c, rtol=1e-5)
  assert int(uniform["codes_used"]) == c

  collapsed = codebook_metrics(jax.nn.one_hot(jnp.full((2, 12), 5), c), jnp.ones((2, 12)))
  np.testing.assert_allclose(collapsed["perplexity"], 1.0, rtol=1e-6)
  assert int(collapsed["codes_used"]) == 1

  probs = softmax_np(np.random.RandomState(0).randn(2, 3, c).astype(np.float32))
  weights = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
  avg = (probs * weights[..., None]).sum((0, 1)) / weights.sum()
  metrics = codebook_metrics(probs, weights)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(-(avg * np.log(avg)).sum()), rtol=1e-5)
  used = {int(probs[b, t].argmax()) for b, t in zip(*np.nonzero(weights))}
  assert int(metrics["codes_used"]) == len(used)
