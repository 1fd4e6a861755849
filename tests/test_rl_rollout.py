"""Rollouts in both action spaces, the learner's log-probs, and what `rl_step` trains."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from latent_mca.latent.steps import BACKBONE, LatentSystem
from latent_mca.rl import algorithms as algos
from latent_mca.rl import prompts as prompts_lib
from latent_mca.rl import rollout as ro
from latent_mca.rl import step as step_lib
from latent_mca.training import state as state_lib
from tests.rl_fixtures import PAD, sampling, tiny_examples, tiny_prompts, tiny_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACES = ("latent", "token")


@pytest.fixture(scope="module")
def tiny():
  return tiny_system()


@functools.cache
def _rollout(space: str, num_prompts: int = 2, **changes):
  system, params, extra = tiny_system()
  config = dataclasses.replace(sampling(), **changes)
  out = ro.jitted_rollout(system, space=space, sampling=config)(
      params, extra, tiny_prompts(num_prompts), jax.random.key(0))
  images = prompts_lib.repeated_images(tiny_examples(num_prompts), config.group_size, 64)
  return out, step_lib.learner_batch(out, images)


def test_sharded_rollouts_and_steps_equal_single_device_on_8_devices():
  """`tests.rl_sharding_check`: rollouts split over the batch axes of a mesh, and RL
  updates on fsdp=4 x tensor=2, equal the single-device ones. One process for both
  spaces (two side by side take as long on two cores: each runs 8 devices' threads),
  with the session's XLA flags (fast compilation)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
  proc = subprocess.run([sys.executable, "-m", "tests.rl_sharding_check", *SPACES], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  lines = {" ".join(line.split()[:3]) for line in proc.stdout.splitlines()}
  expected = {f"OK {check} {space}" for check in ("rollout", "step") for space in SPACES}
  assert expected <= lines, (expected - lines, proc.stdout)


def test_a_pool_sampled_in_chunks_equals_one_call_from_one_program(tiny, monkeypatch):
  """DAPO's oversampled pool goes through the rollout program of prompts_per_step prompts,
  chunk by chunk (`RLRunner.sample`): with each chunk's row offset its rows and keys are
  those of one call over the pool, and every chunk runs the one compiled program."""
  system, params, extra = tiny
  config = sampling(max_new_tokens=7)  # a program no other test compiles
  key = jax.random.key(3)
  whole = ro.jitted_rollout(system, space="latent", sampling=config)(
      params, extra, tiny_prompts(4), key)
  traces = []
  real = ro.rollout

  def counted(*args, **kwargs):
    traces.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(ro, "rollout", counted)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  run = ro.sharded_rollout(system, mesh, space="latent", sampling=config)
  examples, rows = tiny_examples(4), 2 * config.group_size
  for c in range(2):
    prompts = prompts_lib.collate_prompts(examples[2 * c:2 * c + 2], PAD, 40, 64)
    part = run(params, extra, prompts, key, row_offset=c * rows)
    for field in ("tokens", "actions", "mask"):
      np.testing.assert_array_equal(getattr(part, field),
                                    getattr(whole, field)[c * rows:(c + 1) * rows], field)
    np.testing.assert_allclose(part.logp, whole.logp[c * rows:(c + 1) * rows], rtol=1e-5,
                               atol=1e-6)
  assert len(traces) == 1


@pytest.mark.parametrize("space", SPACES)
def test_learner_recomputes_the_sampler_logprobs(tiny, space):
  system, params, _ = tiny
  out, batch = _rollout(space)
  config = step_lib.RLStepConfig(system, space=space)
  logp, entropy = jax.jit(functools.partial(step_lib.action_logprobs, config))(params, batch)
  mask = np.asarray(out.mask)
  assert mask.sum() > 0
  np.testing.assert_allclose(np.asarray(logp) * mask, np.asarray(out.logp) * mask, atol=2e-5)
  num_actions = 16 if space == "latent" else 512
  assert np.all((np.asarray(entropy) >= 0) & (np.asarray(entropy) <= np.log(num_actions) + 1e-4))


@pytest.mark.parametrize("space", SPACES)
def test_groups_repeat_their_prompt_and_sample_different_responses(space):
  out, _ = _rollout(space)
  g = sampling().group_size
  ids = np.asarray(out.prompt_ids)
  for group in range(2):
    rows = ids[group * g:(group + 1) * g]
    assert (rows == rows[0]).all()
  assert not (ids[0] == ids[g]).all()
  actions = np.asarray(out.actions)
  assert len({tuple(r) for r in actions[:g]}) > 1  # temperature 1: the samples differ
  if space == "latent":
    assert np.asarray(out.actions).max() < 16


def test_a_row_stops_at_its_stop_token():
  greedy, _ = _rollout("token", top_k=1)
  stop = int(greedy.tokens[0, 3])
  out, _ = _rollout("token", top_k=1, stop_token_ids=(stop,))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  first = int(np.argmax(tokens[0] == stop))
  assert first <= 3 and mask[0, :first + 1].all() and not mask[0, first + 1:].any()
  assert (tokens[0, first + 1:] == 0).all()  # padded after the stop
  assert int(out.lengths[0]) == first + 1


def _update(tiny, space, trainable, top_layers=0, steps=2):
  system, params, extra = tiny
  out, batch = _rollout(space)
  rewards = np.linspace(0.0, 1.0, out.tokens.shape[0])
  algorithm = algos.get_algorithm("grpo")
  batch = dict(batch, advantages=algos.compute_advantages(algorithm, rewards,
                                                          sampling().group_size)[0],
               loss_params=algos.loss_params(algorithm))
  config = step_lib.RLStepConfig(system, space=space, top_layers=top_layers)
  batch["ref_logp"] = step_lib.reference_logprobs(config, params, batch)
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=1e-3, schedule="constant", trainable=trainable))
  state = state_lib.TrainState.create(params, state_lib.make_optimizer(optimizer, steps),
                                      jax.random.key(0), extra)
  step = jax.jit(functools.partial(step_lib.rl_step, config=config))
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i))
  return params, state, metrics


def _leaves(tree):
  return {state_lib.param_path(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_latent_rl_moves_only_the_policy(tiny):
  before, state, metrics = _update(tiny, "latent", ("policy/.*",))
  a, b = _leaves(before), _leaves(state.params)
  changed = {k for k in a if not np.array_equal(a[k], b[k])}
  assert changed and all(k.startswith("policy/") for k in changed)
  for k in a:  # world model, codebook, backbone, IDM, projectors: bit-identical
    if not k.startswith("policy/"):
      assert a[k].tobytes() == b[k].tobytes(), k
  # The first step is on-policy: ratio 1, KL 0; the second moved away from both.
  assert float(metrics["kl"]) > 0 and float(metrics["logp_mismatch"]) > 0
  assert np.isfinite(float(metrics["loss"]))


def test_token_rl_trains_only_the_top_layers(tiny):
  before, state, _ = _update(tiny, "token", (r"backbone/decoder/.*", r"backbone/embed_tokens/.*",
                                              r"backbone/lm_head/.*"), top_layers=1)
  a, b = _leaves(before), _leaves(state.params)
  layers = [k for k in a if k.startswith("backbone/decoder/layers/")]
  assert layers
  for k in layers:  # stacked [2, ...]: layer 0 frozen, layer 1 (the top one) trains
    assert np.array_equal(a[k][0], b[k][0]), k
  assert any(not np.array_equal(a[k][1], b[k][1]) for k in layers)
  assert not np.array_equal(a["backbone/lm_head/kernel"], b["backbone/lm_head/kernel"])
  for k in a:
    if k.startswith(("backbone/visual/", "policy/", "world_model/")):
      assert a[k].tobytes() == b[k].tobytes(), k


def _ablated(system, switch):
  return LatentSystem.build(system.backbone.config,
                            dataclasses.replace(system.config, **{switch: False}))


def test_an_ablations_system_acts_as_the_full_system(tiny):
  system, params, _ = tiny
  assert system.for_acting() is system
  for switch in ("use_cycle", "use_projector", "use_text_only"):
    ablated = _ablated(system, switch)
    assert ablated != system, switch
    assert ablated.for_acting() == system and hash(ablated.for_acting()) == hash(system), switch
    assert (jax.tree.structure(ablated.abstract(params[BACKBONE])) ==
            jax.tree.structure(system.abstract(params[BACKBONE]))), switch


def test_the_projector_switch_does_not_change_acting(tiny):
  # The only switch with a branch outside the training losses (`text_states`).
  system, params, extra = tiny
  prompts, key = tiny_prompts(2), jax.random.key(1)
  ours, theirs = (ro.jitted_rollout(s, space="latent", sampling=sampling())(
      params, extra, prompts, key) for s in (system, _ablated(system, "use_projector")))
  np.testing.assert_array_equal(ours.actions, theirs.actions)
  np.testing.assert_allclose(ours.logp, theirs.logp, rtol=1e-6)
