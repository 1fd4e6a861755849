"""The card agent's learner against its sampler, its value head, and what a PPO step trains."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.cards import agent as agent_lib
from latent_mca.cards import pixels
from latent_mca.latent.steps import BACKBONE
from latent_mca.models import qwen2_5_vl
from latent_mca.rl import ppo
from latent_mca.rl import rollout as rollout_lib
from latent_mca.training import state as state_lib
from tests.rl_fixtures import PAD, STOP, tiny_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 112  # 8 x 8 patches: the tiny model's 16 image tokens
ENVS, NEW = 4, 10


@pytest.fixture(scope="module")
def tiny():
  system, params, extra = tiny_system()
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.tiny()
  ids = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 16,
                        [cfg.vision_end_token_id], np.arange(20, 32)]).astype(np.int32)
  frames = np.random.default_rng(0).integers(0, 256, (ENVS, 300, 300, 3), dtype=np.uint8)
  return system, params, extra, ids, frames


def _agent(system, space):
  return agent_lib.AgentConfig(system, ppo.ValueHead(), ppo.PPOConfig(num_steps=2, num_envs=2,
                                                                      minibatch_size=4),
                               space=space, temperature=0.7)


@functools.cache
def _logprobs_fn(agent):
  return jax.jit(functools.partial(agent_lib.step_logprobs, agent))


@pytest.fixture(scope="module")
def acted(tiny):
  """space -> (agent, params with a value head, extra, prompts, rollout, learner batch)."""
  return {space: _act(tiny, space) for space in ("token", "latent")}


def _act(tiny, space):
  system, params, extra, ids, frames = tiny
  agent = _agent(system, space)
  params = dict(params, value_head=agent_lib.init_value_head(agent, jax.random.key(3)))
  prompts = agent_lib.prompt_batch(ids, np.ones(len(ids), np.int32), frames, SIZE)
  sampling = rollout_lib.SamplingConfig(group_size=1, max_new_tokens=NEW, temperature=0.7,
                                        top_k=0, stop_token_ids=(STOP,), pad_token_id=PAD)
  out = rollout_lib.jitted_rollout(system, space=space, sampling=sampling)(
      params, extra, prompts, jax.random.key(5))
  mask = np.asarray(out.mask)
  # Any split of the response into thought and action: the first half of each reply thinks.
  thought = (np.arange(NEW)[None] < mask.sum(1, keepdims=True) // 2) * mask
  action = mask - thought
  logp = np.asarray(out.logp)
  transitions = {
      "frames": frames, "prompt_ids": np.tile(ids, (ENVS, 1)),
      "prompt_mask": np.ones((ENVS, len(ids)), np.int32), "tokens": np.asarray(out.tokens),
      "mask": mask, "actions": np.asarray(out.actions),
      "thought_mask": thought.astype(np.float32), "action_mask": action.astype(np.float32),
      "old_logp": 0.5 * (logp * thought).sum(1) + (logp * action).sum(1),
      "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
      "returns": np.array([1.0, 0.0, 2.0, -1.0], np.float32),
      "old_values": np.zeros(ENVS, np.float32)}
  batch = agent_lib.update_batch(transitions, np.arange(ENVS), SIZE)
  return agent, params, extra, prompts, out, batch


@pytest.mark.parametrize("space", ["token", "latent"])
def test_learner_recomputes_the_samplers_sequence_logprob(acted, space):
  agent, params, _, _, out, batch = acted[space]
  assert np.asarray(out.mask).sum() > ENVS  # real responses, more than one step each
  logp, _, _ = _logprobs_fn(agent)(params, batch)
  np.testing.assert_allclose(np.asarray(logp) * np.asarray(out.mask), np.asarray(out.logp),
                             atol=2e-4)
  seq = ppo.sequence_logprob(logp, batch["thought_mask"], batch["action_mask"], 0.5)
  np.testing.assert_allclose(np.asarray(seq), batch["old_logp"], atol=1e-3)


def test_the_value_reads_the_last_prompt_token_only(acted):
  agent, params, _, prompts, _, batch = acted["token"]
  values = agent_lib.prompt_values(agent, params, prompts)
  other = dict(batch, input_ids=batch["input_ids"].copy())
  other["input_ids"][:, -NEW:] = 7  # another response: V(s) must not see it
  other["attention_mask"] = batch["attention_mask"].copy()
  other["attention_mask"][:, -NEW:] = 1
  for b in (batch, other):
    _, _, v = _logprobs_fn(agent)(params, b)
    np.testing.assert_allclose(np.asarray(v), np.asarray(values), atol=1e-4)


def _changed(before, after) -> set[str]:
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
  return {state_lib.param_path(path).split("/")[0] for path, x in flat_before
          if not np.array_equal(np.asarray(x), np.asarray(flat_after[path]))}


@pytest.mark.parametrize("space,trained", [
    ("latent", {"policy", "value_head"}),
    ("token", {BACKBONE, "value_head"}),
])
def test_a_ppo_step_trains_what_its_space_says(acted, space, trained):
  agent, params, extra, _, _, batch = acted[space]
  opt = state_lib.optimizer_config()
  opt.update(learning_rate=1e-2, trainable=agent_lib.TRAINABLE[space])
  state = state_lib.TrainState.create(params, state_lib.make_optimizer(opt, 4),
                                      jax.random.key(0), extra)
  before = jax.device_get(state.params)
  step = jax.jit(functools.partial(agent_lib.ppo_step, config=agent))
  state, metrics = step(state, batch, jax.random.key(1))
  assert _changed(before, state.params) == trained
  assert np.isfinite(float(metrics["loss"])) and float(metrics["logp_mismatch"]) < 1e-2
  assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-2)


def test_prompt_batches_pack_each_frame_as_the_pixels_path_does(tiny):
  *_, ids, frames = tiny
  prompts = agent_lib.prompt_batch(ids, np.ones(len(ids), np.int32), frames, SIZE, shards=2)
  values, grid = pixels.frames_to_pixels(frames, SIZE)
  assert prompts["pixel_values"].shape == (2, 2 * 64, values.shape[-1])
  np.testing.assert_array_equal(np.asarray(prompts["pixel_values"]).reshape(values.shape),
                                np.asarray(values))
  np.testing.assert_array_equal(np.asarray(prompts["image_grid_thw"]).reshape(-1, 3),
                                np.asarray(grid))
  with pytest.raises(ValueError, match="do not split"):
    agent_lib.prompt_batch(ids, np.ones(len(ids), np.int32), frames[:3], SIZE, shards=2)
  with pytest.raises(ValueError, match="prompt_length"):
    agent_lib.left_pad(ids, len(ids) - 1, PAD)


def test_the_value_head_has_logical_axes_for_the_mesh(tiny):
  system, *_ = tiny
  agent = _agent(system, "token")
  params = agent_lib.init_value_head(agent, jax.random.key(0))
  boxed = agent_lib.boxed_value_head(agent)
  assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(boxed))
  assert boxed["hidden_0"]["kernel"].names == ("embed", "mlp")
  assert set(agent_lib.boxed_params(agent)) == set(system.boxed_params()) | {"value_head"}


def test_sharded_ppo_steps_equal_single_device_on_8_devices():
  """`tests.cards_sharding_check`: two PPO updates on fsdp=4 x tensor=2, built as the cards
  stage builds them, equal the unsharded ones. Token space only (it trains the sharded
  backbone; `python -m tests.cards_sharding_check latent` checks the latent policy's too:
  each space's programs add ~20 s on two cores). With the session's XLA flags."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
  proc = subprocess.run([sys.executable, "-m", "tests.cards_sharding_check", "token"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "OK ppo token fsdp4_tensor2" in proc.stdout, proc.stdout
