"""Run as `python -m tests.cards_sharding_check [SPACE...]` with 8 simulated devices (see
test_cards_agent); SPACE is token or latent, both by default.

Prints "OK ppo <space> fsdp4_tensor2" for each action space whose PPO updates on mesh
fsdp=4 x tensor=2, built as the cards stage builds them (`stages.cards.ppo_learner`: the
state sharded at birth by a `mesh.Layout` of the agent's boxed params, the LatentSystem's
and the value head's; `agent.ppo_step` jitted by `loop.jit_step`; the batch by
`rl.step.place_batch`; inside `Layout.context()`), give the unsharded updates' metrics and
params to fp32 tolerance, with the backbone's and the value head's kernels, Adam's
moments and the batch's rows really split (the packed frames replicated).

The updates' batch has no images (its prompts are text): the vision tower's sharded
forward and backward are the backbone step's to check (`sharding_layout_check`), and
compiling them into these steps too would about double their time. Its responses are
random tokens (codes in latent space); old_logp is the unsharded learner's own sequence
log-prob, shifted, so the ratios start near 1 and both updates move the policy.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from latent_mca.cards import agent as agent_lib
from latent_mca.config_schema import ConfigError
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.rl import ppo
from latent_mca.rl import step as rl_step_lib
from latent_mca.stages import cards
from latent_mca.training import state as state_lib
from tests.rl_fixtures import tiny_system
from tests.sharding_layout_check import compare_params

ROWS, PROMPT, NEW, STEPS = 8, 12, 6, 2
SPACES = ("token", "latent")
MESH = ("fsdp4_tensor2", dict(data=1, fsdp=4, tensor=2))


def _agent(system, space):
  return agent_lib.AgentConfig(system, ppo.ValueHead(),
                               ppo.PPOConfig(num_steps=2, num_envs=4, minibatch_size=ROWS),
                               space=space, temperature=0.7)


def learner_batch(agent, params, space):
  """A PPO minibatch of ROWS text-only transitions (see the module's docstring)."""
  rng = np.random.default_rng(0)
  prompt = np.tile(np.arange(20, 20 + PROMPT, dtype=np.int32), (ROWS, 1))
  tokens = rng.integers(3, 400, (ROWS, NEW)).astype(np.int32)
  lengths = rng.integers(2, NEW + 1, ROWS)
  mask = (np.arange(NEW)[None] < lengths[:, None]).astype(np.int32)
  thought = ((np.arange(NEW)[None] < lengths[:, None] // 2) * mask).astype(np.float32)
  actions = tokens if space == "token" else rng.integers(
      0, agent.system.config.num_codes, (ROWS, NEW)).astype(np.int32)
  batch = {"input_ids": np.concatenate([prompt, tokens], 1),
           "attention_mask": np.concatenate([np.ones_like(prompt), mask], 1),
           "actions": actions, "thought_mask": thought, "action_mask": mask - thought,
           "advantages": np.linspace(-1.0, 1.0, ROWS).astype(np.float32),
           "returns": np.linspace(2.0, -1.0, ROWS).astype(np.float32),
           "old_values": np.zeros(ROWS, np.float32)}
  logp, _, _ = jax.jit(functools.partial(agent_lib.step_logprobs, agent))(params, batch)
  seq = ppo.sequence_logprob(logp, batch["thought_mask"], batch["action_mask"],
                             agent.ppo.thought_coef)
  batch["old_logp"] = np.asarray(seq) + np.linspace(-0.02, 0.02, ROWS, dtype=np.float32)
  return batch


def make_state_fn(extra, space):
  optimizer = state_lib.optimizer_config()
  # eps 1e-3: Adam's update is then smooth in the gradient (see sharding_layout_check).
  optimizer.update(dict(learning_rate=1e-3, schedule="constant", eps=1e-3,
                        trainable=agent_lib.TRAINABLE[space]))
  tx = state_lib.make_optimizer(optimizer, STEPS)
  return functools.partial(state_lib.TrainState.create, tx=tx, rng=jax.random.key(2),
                           extra=extra)


def run_unsharded(agent, make_state, params, batch):
  """As the cards stage stepped before it had a mesh: plain jit, the state donated."""
  state = jax.jit(make_state)(params)
  step = jax.jit(functools.partial(agent_lib.ppo_step, config=agent), donate_argnums=0)
  metrics = []
  for i in range(STEPS):  # the second update is off-policy: ratios move
    state, m = step(state, batch, jax.random.key(i))
    metrics.append(jax.device_get(m))
  return state, metrics


def run_sharded(agent, make_state, params, batch):
  config = mesh_lib.mesh_config()
  config.update(MESH[1])
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.rules(config)
  with pytest.raises(ConfigError, match="config.ppo.num_envs"):
    mesh_lib.check_batch_size(6, mesh, rules, "config.ppo.num_envs")
  assert mesh_lib.batch_parallelism(mesh, rules) == 4
  layout, state, step = cards.ppo_learner(agent, mesh, rules, make_state, params)
  placed = rl_step_lib.place_batch(layout, batch)
  metrics = []
  with layout.context():
    for i in range(1, STEPS + 1):
      state, m = step(state, placed, i)
      metrics.append(jax.device_get(m))
  return layout, state, placed, metrics


def check_split(state, placed, layout, batch_with_frames):
  params = state.params
  kernel = params["backbone"]["decoder"]["layers"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor"), kernel.sharding
  layers, d, q = kernel.shape
  assert {s.data.shape for s in kernel.addressable_shards} == {(layers, d // 4, q // 2)}
  value = params[agent_lib.VALUE_HEAD]["hidden_0"]["kernel"]
  assert value.sharding.spec == P("fsdp", "tensor"), value.sharding
  specs = [x.sharding.spec for x in jax.tree.leaves(state.opt_state)
           if hasattr(x, "sharding") and x.ndim >= 2]
  assert any("fsdp" in str(s) or "tensor" in str(s) for s in specs), specs
  for field in ("input_ids", "actions", "old_logp", "advantages"):
    assert {s.data.shape[0] for s in placed[field].addressable_shards} == {ROWS // 4}, field
  framed = rl_step_lib.place_batch(layout, batch_with_frames)
  assert framed["pixel_values"].sharding.is_fully_replicated
  assert framed["image_grid_thw"].sharding.is_fully_replicated
  assert not framed["input_ids"].sharding.is_fully_replicated


def check(system, params, extra, space):
  began = time.perf_counter()
  agent = _agent(system, space)
  params = dict(params, **{agent_lib.VALUE_HEAD: agent_lib.init_value_head(
      agent, jax.random.key(3))})
  batch = learner_batch(agent, params, space)
  make_state = make_state_fn(extra, space)
  initial = jax.device_get(params)
  ref_state, ref_metrics = run_unsharded(agent, make_state, params, batch)
  layout, state, placed, metrics = run_sharded(agent, make_state, params, batch)
  # The packed frames as `agent.update_batch` gives them (4 patches a frame), not rendered.
  packed = {"pixel_values": np.zeros((ROWS * 4, 1176), np.float32),
            "image_grid_thw": np.tile(np.array([[1, 2, 2]], np.int32), (ROWS, 1))}
  check_split(state, placed, layout, dict(batch, **packed))
  for i, (a, b) in enumerate(zip(ref_metrics, metrics), 1):
    assert set(a) == set(b), (space, set(a) ^ set(b))
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{space} step {i} {key}")
  relative = compare_params(space, initial, ref_state.params, state.params)
  print("OK ppo", space, MESH[0], f"losses {[round(float(m['loss']), 6) for m in metrics]}",
        f"update difference {relative:.1e}", f"{time.perf_counter() - began:.1f} s", flush=True)


def main(spaces):
  assert jax.device_count() == 8, jax.devices()
  unknown = set(spaces) - set(SPACES)
  assert not unknown, f"unknown spaces {unknown}; known: {SPACES}"
  system, params, extra = tiny_system()
  for space in spaces:
    check(system, params, extra, space)


if __name__ == "__main__":
  main(sys.argv[1:] or list(SPACES))
