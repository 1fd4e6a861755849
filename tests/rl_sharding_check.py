"""Run as `python -m tests.rl_sharding_check [SPACE...]` with 8 simulated devices (see
test_rl_rollout); SPACE is latent or token, both by default.

Rollouts: prints "OK rollout <space> <mesh>" for each action space whose sharded
rollout (`rollout.sharded_rollout`, prompt groups split over the mesh's batch axes
data x fsdp) equals the single-device one, bit for bit on the sampled tokens and
actions: latent space on data=2 x fsdp=2 x tensor=2 with the params laid out as the RL
TrainState's (fsdp- and tensor-sharded, gathered by the program; the two devices of a
tensor group sample the same rows), token space on the default mesh (data=8).

Learner: prints "OK step <space> fsdp4_tensor2" for each space whose RL updates on mesh
fsdp=4 x tensor=2, built as the rl stage builds them (the state by `Layout.init_state`
on the LatentSystem's boxed params, the batch by `step.place_batch`, the reference
log-probs and the step by `step.sharded_reference_logprobs` / `step.sharded_step`,
inside `Layout.context()`), give the unsharded updates' metrics and params to fp32
tolerance, with the params, Adam's moments and the batch's rows really split (and the
packed images and loss_params replicated). The updates' batch leaves the rollout's images
out (its image tokens then embed as text): the vision tower's sharded forward and
backward are the backbone step's to check (`sharding_layout_check`), and compiling them
into these steps too would add about half to their time.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from latent_mca.parallel import mesh as mesh_lib
from latent_mca.parallel import sharding
from latent_mca.rl import algorithms as algos
from latent_mca.rl import prompts as prompts_lib
from latent_mca.rl import rollout as ro
from latent_mca.rl import step as step_lib
from latent_mca.stages.rl import TRAINABLE
from latent_mca.training import loop, state as state_lib
from tests.rl_fixtures import sampling, tiny_examples, tiny_prompts, tiny_system
from tests.sharding_layout_check import compare_params

PROMPTS, STEPS = 8, 2
ROLLOUT_MESHES = {"latent": ("data2_fsdp2_tensor2", dict(data=2, fsdp=2, tensor=2)),
                  "token": ("data8", dict(data=-1, fsdp=1, tensor=1))}
STEP_MESH = ("fsdp4_tensor2", dict(data=1, fsdp=4, tensor=2))


def _mesh_config(sizes: dict):
  config = mesh_lib.mesh_config()
  config.update(sizes)
  return config


def check_rollout(system, params, extra, space: str):
  """The sharded rollout equals the single-device one; returns the single-device rollout."""
  name, sizes = ROLLOUT_MESHES[space]
  config = _mesh_config(sizes)
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.rules(config)
  shards = mesh_lib.batch_parallelism(mesh, rules)
  # The second chunk of a pool (`RLRunner.sample`): each shard's rows start at the chunk's
  # offset plus its own.
  offset = PROMPTS * sampling().group_size
  single = ro.jitted_rollout(system, space=space, sampling=sampling())(
      params, extra, tiny_prompts(PROMPTS), jax.random.key(3), row_offset=offset)
  # As RLRunner.sample: params laid out as the TrainState's, extra and the key replicated.
  placed = jax.device_put(params, sharding.boxed_shardings(system.boxed_params(), mesh,
                                                           rules))
  replicated = jax.sharding.NamedSharding(mesh, P())
  sharded = ro.sharded_rollout(system, mesh, space=space, sampling=sampling(),
                               axes=mesh_lib.batch_axes(rules))(
      placed, jax.device_put(extra, replicated), tiny_prompts(PROMPTS, shards=shards),
      jax.device_put(jax.random.key(3), replicated), row_offset=offset)
  assert len(sharded.tokens.sharding.device_set) == 8
  rows = PROMPTS * sampling().group_size // shards
  assert {s.data.shape[0] for s in sharded.tokens.addressable_shards} == {rows}
  if space == "latent":
    kernel = placed["backbone"]["decoder"]["layers"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor"), kernel.sharding
  for field in ("prompt_ids", "tokens", "actions", "mask"):
    np.testing.assert_array_equal(getattr(single, field), getattr(sharded, field), field)
  np.testing.assert_allclose(single.logp, sharded.logp, atol=1e-5)
  print("OK rollout", space, name, int(single.mask.sum()), flush=True)
  return single


def learner_setup(system, params, extra, space: str, out):
  """(step config, make_state, the learner batch without ref_logp) of a rollout."""
  g = sampling().group_size
  batch = step_lib.learner_batch(out, prompts_lib.repeated_images(tiny_examples(PROMPTS), g,
                                                                  64))
  algorithm = algos.get_algorithm("grpo")
  rewards = np.linspace(0.0, 1.0, out.tokens.shape[0]) ** 2
  batch = dict(jax.device_get(batch),
               advantages=np.asarray(algos.compute_advantages(algorithm, rewards, g)[0]),
               loss_params=algos.loss_params(algorithm))
  config = step_lib.RLStepConfig(system, space=space, top_layers=1 if space == "token" else 0)
  optimizer = state_lib.optimizer_config()
  # eps 1e-3: Adam's update is then smooth in the gradient (see sharding_layout_check).
  optimizer.update(dict(learning_rate=1e-3, schedule="constant", eps=1e-3,
                        trainable=TRAINABLE[space]))
  tx = state_lib.make_optimizer(optimizer, STEPS)
  make_state = functools.partial(state_lib.TrainState.create, tx=tx, rng=jax.random.key(2),
                                 extra=extra)
  return config, make_state, batch


def run_unsharded(config, make_state, params, batch):
  """(state, metrics of each update, reference log-probs) on one device."""
  batch = dict(batch, ref_logp=step_lib.reference_logprobs(config, params, batch))
  state = jax.jit(make_state)(params)  # fresh buffers: the step donates them
  step, metrics = loop.jit_step(functools.partial(step_lib.rl_step, config=config)), []
  for i in range(1, STEPS + 1):  # the second update is off-policy: ratios and KL move
    state, m = step(state, batch, i)
    metrics.append(jax.device_get(m))
  return state, metrics, batch["ref_logp"]


def run_sharded(system, config, make_state, params, batch):
  layout = mesh_lib.Layout.from_config(_mesh_config(STEP_MESH[1]), make_state,
                                       system.boxed_params())
  reference = jax.device_put(params, layout.state.params)
  state = layout.init_state(make_state, params)
  batch = step_lib.place_batch(layout, batch)
  step, metrics = step_lib.sharded_step(config, layout), []
  with layout.context():
    batch["ref_logp"] = step_lib.sharded_reference_logprobs(config, layout)(reference, batch)
    for i in range(1, STEPS + 1):
      state, m = step(state, batch, i)
      metrics.append(jax.device_get(m))
  return layout, state, batch, metrics


def check_split(space, state, batch):
  """Weights, Adam's moments and the batch's rows are split over the mesh."""
  params = state.params
  kernel = params["backbone"]["decoder"]["layers"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor"), kernel.sharding
  layers, d, q = kernel.shape
  assert {s.data.shape for s in kernel.addressable_shards} == {(layers, d // 4, q // 2)}
  policy = params["policy"]["decoder"]["layers"]["q_proj"]["kernel"]
  assert policy.sharding.spec == P(None, "fsdp", "tensor"), policy.sharding
  specs = [x.sharding.spec for x in jax.tree.leaves(state.opt_state)
           if hasattr(x, "sharding") and x.ndim >= 2]
  assert any("fsdp" in str(s) or "tensor" in str(s) for s in specs), (space, specs)
  rows = batch["input_ids"].shape[0] // 4
  for field in ("input_ids", "advantages", "ref_logp"):
    assert {s.data.shape[0] for s in batch[field].addressable_shards} == {rows}, field
  assert batch["loss_params"].eps_low.sharding.is_fully_replicated


def compare(space, initial, reference, sharded):
  """Equal metrics (every one, every step) and params; returns the updates' relative
  difference."""
  (ref_state, ref_metrics), (state, metrics) = reference, sharded
  for i, (a, b) in enumerate(zip(ref_metrics, metrics), 1):
    assert set(a) == set(b), (space, set(a) ^ set(b))
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{space} step {i} {key}")
  return compare_params(space, initial, ref_state.params, state.params)


def check_step(system, params, extra, space: str, out):
  began = time.perf_counter()
  config, make_state, with_images = learner_setup(system, params, extra, space, out)
  batch = {k: v for k, v in with_images.items() if k not in mesh_lib.PACKED_FIELDS}
  initial = jax.device_get(params)
  reference = run_unsharded(config, make_state, params, batch)
  layout, state, placed, metrics = run_sharded(system, config, make_state, params, batch)
  check_split(space, state, placed)
  images = step_lib.place_batch(layout, with_images)
  assert images["pixel_values"].sharding.is_fully_replicated
  assert images["image_grid_thw"].sharding.is_fully_replicated
  np.testing.assert_allclose(placed["ref_logp"], reference[2], rtol=1e-5, atol=1e-6)
  relative = compare(space, initial, reference[:2], (state, metrics))
  print("OK step", space, STEP_MESH[0],
        f"losses {[round(float(m['loss']), 6) for m in metrics]}",
        f"kl {float(metrics[-1]['kl']):.2e}", f"update difference {relative:.1e}",
        f"{time.perf_counter() - began:.1f} s", flush=True)


def main(spaces: list[str]):
  """Checks the rollout and the learner of each of `spaces` ("latent", "token")."""
  assert jax.device_count() == 8, jax.devices()
  unknown = set(spaces) - set(ROLLOUT_MESHES)
  assert not unknown, f"unknown spaces {unknown}; known: {list(ROLLOUT_MESHES)}"
  system, params, extra = tiny_system()
  for space in spaces:
    out = check_rollout(system, params, extra, space)
    check_step(system, params, extra, space, out)


if __name__ == "__main__":
  main(sys.argv[1:] or list(ROLLOUT_MESHES))
