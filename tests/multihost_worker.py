"""One process of the multi-host test (`tests/test_multihost.py`); run by it, not by pytest.

  python -m tests.multihost_worker --workdir DIR

Trains the tiny backbone for NUM_STEPS steps of `stages.backbone.train_step` on a mesh
of all global devices (data=1, fsdp=4, tensor=2: FSDP spans the processes, so every
process holds only part of each parameter), each process reading its own rows of each
global batch through `DataLoader(**process_shard())` and `global_batch`. Then every
process saves the state with the library's `Checkpointer` under DIR/STAGE, and
process 0 writes

  DIR/result.json   {"losses": [...], "loader_state": ..., "history": [...]}
  DIR/params.npz    the final params, gathered from all processes, by parameter path.

Every process prints "LOSSES <json>", "READ <json>" (the source indices of the rows it
read, by step) and, with several processes, "REFUSED <case>" for each batch layout
`global_batch` must refuse. Processes and devices come from the
environment: LATENT_MCA_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID (unset: one
process) and XLA_FLAGS=--xla_force_host_platform_device_count=N.

The step is jitted here with explicit in/out shardings (`sharded_step`, the state's
from `state_shardings`), independently of `latent_mca.training.loop`. The loop does
the same given a `latent_mca.parallel.mesh.Layout`: `run` can hand
`loop.train(STAGE, workdir, state, train_step, loader, NUM_STEPS, layout=layout)` the
state, the backbone step and the DataLoader instead (the layout places each batch).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from latent_mca.data.batching import DataLoader, collate
from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import distributed, sharding as sharding_lib
from latent_mca.stages import backbone
from latent_mca.training import checkpoint, state as state_lib

NUM_DEVICES = 8
MESH_SHAPE = {"data": 1, "fsdp": 4, "tensor": 2}
NUM_STEPS, GLOBAL_BATCH, SEQ_LEN, NUM_EXAMPLES = 3, 8, 24, 32
STAGE = "multihost"
MODEL = qwen2_5_vl.Qwen2_5_VLConfig.tiny()


def token_source() -> list[dict]:
  """NUM_EXAMPLES text examples of 8..SEQ_LEN random ordinary tokens; the same in every process."""
  rng = np.random.default_rng(0)
  ordinary = min(MODEL.image_token_id, MODEL.video_token_id, MODEL.vision_start_token_id)
  return [{"input_ids": rng.integers(3, ordinary, rng.integers(8, SEQ_LEN + 1))}
          for _ in range(NUM_EXAMPLES)]


def host_params() -> dict:
  """Deterministic params on the host, the same in every process: normal(0.02) weights,
  unit norm scales, zero biases (as the model's init, without compiling it)."""
  rng = np.random.default_rng(1)

  def init(path, leaf):
    name = state_lib.param_path(path)
    if name.endswith("/scale"):
      return np.ones(leaf.shape, leaf.dtype)
    if name.endswith("/bias"):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  abstract = nn.meta.unbox(qwen2_5_vl.abstract_params(MODEL))
  return jax.tree_util.tree_map_with_path(init, abstract)


def make_tx():
  """AdamW at a constant rate, clipped, on every parameter."""
  optimizer = state_lib.optimizer_config()
  optimizer.learning_rate, optimizer.schedule = 3e-3, "constant"
  return state_lib.make_optimizer(optimizer, NUM_STEPS)


def abstract_state(tx) -> state_lib.TrainState:
  """Shapes and dtypes of the TrainState (a restore target once given shardings)."""
  params = nn.meta.unbox(qwen2_5_vl.abstract_params(MODEL))
  return jax.eval_shape(lambda p: state_lib.TrainState.create(p, tx, jax.random.key(1)), params)


class GlobalBatches:
  """A `DataLoader` of this process's rows, serving global batches for a sharded step.

  `read` lists the source indices of the rows each batch took from this process.
  """

  def __init__(self, loader: DataLoader, batch_sharding: NamedSharding):
    self._loader, self._sharding = loader, batch_sharding
    self.read: list[list[int]] = []

  def __next__(self) -> dict:
    position = self._loader.state()
    indices = self._loader.batch_indices(position["epoch"], position["step"])
    # The backbone step reads the image inputs; a text batch has none.
    local = {**next(self._loader), "pixel_values": None, "image_grid_thw": None}
    self.read.append([int(i) for i in indices])
    return distributed.global_batch(local, self._sharding)

  def state(self) -> dict:
    return self._loader.state()

  def restore(self, state: dict) -> None:
    self._loader.restore(state)


def state_shardings(abstract: state_lib.TrainState, param_shardings, replicated):
  """The TrainState's shardings: params, and the optimizer moments of each param (the leaves
  of opt_state whose path ends in the param's), by the rules; the rest replicated."""
  by_path = {tuple(path): sharding for path, sharding
             in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def opt_sharding(path, _):
    suffixes = (tuple(path[start:]) for start in range(len(path)))
    return next((by_path[s] for s in suffixes if s in by_path), replicated)

  opt_state = jax.tree_util.tree_map_with_path(opt_sharding, abstract.opt_state)
  return abstract.replace(step=replicated, params=param_shardings, opt_state=opt_state,
                          rng=replicated, extra={})


def sharded_step(train_step, shardings, batch_sharding, replicated):
  """`train_step` as the loop runs it (key fold_in(state.rng, step)), jitted with shardings."""

  def step_fn(state, batch, step):
    return train_step(state, batch, jax.random.fold_in(state.rng, step))

  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def flat_params(params) -> dict[str, np.ndarray]:
  """Host copies of fully addressable params, by parameter path ("decoder/norm/scale")."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {state_lib.param_path(path): np.asarray(value) for path, value in flat}


def check_refusals(batch: dict) -> None:
  """Prints REFUSED <case> for each layout that `global_batch` must refuse across processes."""
  # Devices alternating between the processes: each process's devices hold every other
  # row block, not the contiguous rows it read.
  by_process = [[d for d in jax.devices() if d.process_index == p]
                for p in range(jax.process_count())]
  alternating = [device for devices in zip(*by_process) for device in devices]
  mesh = Mesh(np.array(alternating), ("data",))
  cases = {"alternating": (batch, NamedSharding(mesh, P("data"))),
           "images": ({**batch, "pixel_values": np.zeros((16, 1176), np.float32),
                       "image_grid_thw": np.array([[1, 4, 4]], np.int32)},
                      NamedSharding(mesh, P()))}
  for case, (local, sharding) in cases.items():
    try:
      distributed.global_batch(local, sharding)
    except ValueError as e:
      print("REFUSED", case, "|", e, flush=True)


def run(workdir: str) -> None:
  """Trains and checkpoints; see the module docstring."""
  if jax.device_count() != NUM_DEVICES:
    raise SystemExit(f"expected {NUM_DEVICES} devices over all processes, got "
                     f"{jax.device_count()}: set XLA_FLAGS")
  mesh = Mesh(np.array(jax.devices()).reshape(tuple(MESH_SHAPE.values())), tuple(MESH_SHAPE))
  rules = sharding_lib.DEFAULT_RULES
  replicated = NamedSharding(mesh, P())
  batch_sharding = nn.logical_to_mesh_sharding(P("batch", "length"), mesh, rules)
  param_shardings = sharding_lib.boxed_shardings(qwen2_5_vl.abstract_params(MODEL), mesh, rules)
  tx = make_tx()
  shardings = state_shardings(abstract_state(tx), param_shardings, replicated)

  # Each process gives the devices it holds their blocks of the (identical) host params.
  params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      host_params(), param_shardings)
  embedding = params["embed_tokens"]["embedding"]
  if jax.process_count() > 1 and embedding.is_fully_addressable:
    raise SystemExit(f"the embedding {embedding.sharding} is not split between the "
                     "processes: the checkpoint would not need them all")
  init_state = jax.jit(lambda p: state_lib.TrainState.create(p, tx, jax.random.key(1)),
                       in_shardings=(param_shardings,), out_shardings=shardings)
  step_fn = sharded_step(functools.partial(backbone.train_step, model=qwen2_5_vl.Qwen2_5_VL(MODEL)),
                         shardings, batch_sharding, replicated)
  collate_fn = functools.partial(collate, pad_id=MODEL.pad_token_id, pad_to=SEQ_LEN)
  data = DataLoader(token_source(), GLOBAL_BATCH, seed=0, collate_fn=collate_fn,
                    **distributed.process_shard())
  if jax.process_count() > 1:
    check_refusals(collate_fn(token_source()[:GLOBAL_BATCH // jax.process_count()]))
  loader = GlobalBatches(data, batch_sharding)

  state, losses, history = init_state(params), [], []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for step in range(1, NUM_STEPS + 1):
      state, metrics = step_fn(state, next(loader), step)
      losses.append(float(metrics["loss"]))
      history.append({"step": step, "loss": losses[-1]})
  print("LOSSES", json.dumps(losses), flush=True)
  print("READ", json.dumps(loader.read), flush=True)

  with checkpoint.Checkpointer(os.path.join(workdir, STAGE)) as checkpointer:
    checkpointer.save(NUM_STEPS, state, loader_state=loader.state(), history=history,
                      num_steps=NUM_STEPS)
  params = flat_params(multihost_utils.process_allgather(state.params, tiled=True))
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "params.npz"), **params)
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump({"losses": losses, "loader_state": loader.state(), "history": history}, f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  distributed.initialize({"initialization_timeout": 60})  # before anything uses a device
  run(args.workdir)


if __name__ == "__main__":
  main()
