"""Run as `python -m tests.sharding_layout_check STAGE...` with 8 simulated devices (see
test_sharding_layouts).

For each given stage's train step (the backbone's pretrain / sft step, "pretrain/sft",
and the five latent stages'), runs a few steps unsharded on one device and on the
layouts of STAGE_LAYOUTS (the state created by `Layout.init_state`, batches placed by
`Layout.put_batch`, the step jitted by `loop.jit_step` and run in `Layout.context()`),
and checks that the losses and the final parameters agree to fp32 tolerance, and that
the parameters, Adam's moments and the batch are really split over the mesh. Prints
"OK <stage> <layout>" for each; with "pretrain/sft" also "OK train <layout>" for
`loop.train` on a mesh, and with "constraints", "OK constraints" when the activations'
logical constraints are in the program.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from latent_mca.compilation_cache import enable_compilation_cache
from latent_mca.latent import steps as steps_lib
from latent_mca.latent.config import LatentConfig
from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.stages import backbone, latent
from latent_mca.training import loop, state as state_lib

LAYOUTS = {"fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
           "data8": dict(data=8, fsdp=1, tensor=1),
           "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}
# The backbone step runs on every layout, the latent steps on fsdp=4 x tensor=2 and those
# that train the most on data=2 x fsdp=2 x tensor=2 too: each (step, layout) pair is a
# compilation, most of the check's time.
STAGE_LAYOUTS = {"pretrain/sft": tuple(LAYOUTS),
                 "inverse_warmup": ("fsdp4_tensor2", "data2_fsdp2_tensor2"),
                 "cycle_warmup": ("fsdp4_tensor2",),
                 "inverse_joint": ("fsdp4_tensor2",),
                 "policy_bc": ("fsdp4_tensor2",),
                 "latent_sft": ("fsdp4_tensor2", "data2_fsdp2_tensor2")}
# Rows of 20 tokens: up to 14 of text after a 4x4-patch image (4 tokens between markers).
NUM_STEPS, BATCH, TEXT, GRID = 3, 8, 14, (1, 4, 4)
CFG = qwen2_5_vl.Qwen2_5_VLConfig.tiny()
PAD = CFG.pad_token_id


def _row(rng, image: bool, text_len: int) -> np.ndarray:
  """One left-padded row: [pad..., vision_start, image x 4, vision_end, text] or, without
  the image, [pad..., text] aligned with it token by token."""
  merged = int(np.prod(GRID)) // CFG.vision.spatial_merge_size**2
  head = ([CFG.vision_start_token_id] + [CFG.image_token_id] * merged +
          [CFG.vision_end_token_id]) if image else [PAD] * (merged + 2)
  text = rng.integers(3, 400, size=text_len).tolist()
  return np.array([PAD] * (TEXT - text_len) + head + text, np.int32)


def make_batch(seed: int, image: bool = True) -> dict:
  """A [BATCH, T] batch (one image per row, or none) with rows of different lengths."""
  rng = np.random.default_rng(seed)
  ids = np.stack([_row(rng, image, TEXT - i % 4) for i in range(BATCH)])
  mask = (ids != PAD).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}
  if image:
    patches = int(np.prod(GRID))
    batch["pixel_values"] = rng.normal(size=(BATCH * patches, 1176)).astype(np.float32)
    batch["image_grid_thw"] = np.array([GRID] * BATCH, np.int32)
  return batch


def stage_batch(stage: str, seed: int):
  """The batch a stage's step reads (`steps_lib`'s formats).

  The latent stages' batches hold no images: their backbone is frozen, and the vision
  tower's sharded forward and backward are the backbone step's to check (compiling it
  into every latent step would multiply the check's time). The paired views are two
  random batches: the steps' arithmetic does not depend on their alignment.
  """
  if stage == "pretrain/sft":
    return make_batch(seed)
  if stage == "latent_sft":
    return make_batch(seed, image=False)
  batch = {"paired": {"image": make_batch(seed, image=False),
                      "text": make_batch(seed + 100, image=False)}}
  if stage in ("inverse_joint", "policy_bc"):
    batch["text_only"] = make_batch(seed + 200, image=False)
  return batch


def stage_setup(system: steps_lib.LatentSystem, stage: str):
  """(step, make_state, params, boxed params) of a stage on the tiny system."""
  backbone_params = qwen2_5_vl.init_params(CFG, jax.random.key(0))
  optimizer = state_lib.optimizer_config()
  # eps 1e-3: Adam's update is then smooth in the gradient; at the default 1e-8 it is
  # sign(g) at the first step, so a gradient at the fp32 noise floor (one of tens of
  # thousands of weights) flips its parameter by a whole learning rate.
  optimizer.update(dict(learning_rate=1e-3, schedule="constant", eps=1e-3))
  if stage == "pretrain/sft":
    step = functools.partial(backbone.train_step, model=system.backbone)
    params, extra, boxed = backbone_params, {}, qwen2_5_vl.abstract_params(CFG)
  else:
    optimizer.trainable = latent.TRAINABLE[stage]
    step = functools.partial(steps_lib.STEPS[stage], system=system)
    params, extra = system.init(backbone_params, jax.random.key(1))
    boxed = system.boxed_params()
  tx = state_lib.make_optimizer(optimizer, NUM_STEPS)
  make_state = functools.partial(state_lib.TrainState.create, tx=tx, rng=jax.random.key(2),
                                 extra=extra)
  return step, make_state, params, boxed


def run_unsharded(step, make_state, params, batches):
  state = jax.jit(make_state)(params)  # fresh buffers: the steps donate them
  jitted, losses = loop.jit_step(step), []
  for i, batch in enumerate(batches, 1):
    state, metrics = jitted(state, batch, i)
    losses.append(float(metrics["loss"]))
  return state, losses


def run_sharded(step, make_state, params, boxed, batches, layout_config):
  layout = mesh_lib.Layout.from_config(layout_config, make_state, boxed)
  state = layout.init_state(make_state, params)
  jitted, losses = loop.jit_step(step, layout), []
  with layout.context():
    for i, batch in enumerate(batches, 1):
      state, metrics = jitted(state, layout.put_batch(batch), i)
      losses.append(float(metrics["loss"]))
  return layout, state, losses


def check_split(name, layout, state, sizes):
  """The q_proj kernel is split as the rules say over all 8 devices, every optimizer
  moment is laid out as its parameter, and a batch's rows are split over data x fsdp."""
  params = state.params.get("backbone", state.params)
  kernel = params["decoder"]["layers"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor"), (name, kernel.sharding)
  assert len(kernel.sharding.device_set) == 8, name
  layers, d, q = kernel.shape
  expected = (layers, d // sizes["fsdp"], q // sizes["tensor"])
  assert {s.data.shape for s in kernel.addressable_shards} == {expected}, name
  param_specs = {jax.tree_util.keystr(path): x.sharding.spec
                 for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  moments = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    # Adam's moments: opt_state...mu<param path> and ...nu<param path>.
    starts = [i + 1 for i, key in enumerate(path) if getattr(key, "name", None) in ("mu", "nu")]
    if starts:
      param = jax.tree_util.keystr(path[starts[0]:])
      assert x.sharding.spec == param_specs[param], (name, param, x.sharding.spec)
      moments += 1
  assert moments, name
  batch = layout.put_batch(make_batch(0))
  rows, length = BATCH // (sizes["data"] * sizes["fsdp"]), batch["input_ids"].shape[1]
  assert {s.data.shape for s in batch["input_ids"].addressable_shards} == {(rows, length)}, name


def compare(name, initial, reference, sharded) -> float:
  """Asserts equal losses and parameters; returns the updates' relative difference."""
  (ref_state, ref_losses), (state, losses) = reference, sharded
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
  return compare_params(name, initial, ref_state.params, state.params)


def compare_params(name, initial, reference, params) -> float:
  """Asserts the params equal the reference's (fp32 rounding) and that the updates moved
  something; returns the updates' relative difference |params - reference| / |reference -
  initial|."""
  flat = jax.tree_util.tree_flatten_with_path(reference)[0]
  error, norm = 0.0, 0.0
  for (path, a), b, start in zip(flat, jax.tree.leaves(params), jax.tree.leaves(initial)):
    a, b, start = (np.asarray(jax.device_get(x), np.float64) for x in (a, b, start))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                               err_msg=f"{name} {jax.tree_util.keystr(path)}")
    error += np.sum((b - a) ** 2)
    norm += np.sum((a - start) ** 2)
  assert norm > 0, name  # the updates moved something
  relative = float(np.sqrt(error / norm))
  assert relative < 1e-4, (name, relative)
  return relative


class _ListLoader:
  """The few batches of a check, as the resumable loader `loop.train` reads."""

  def __init__(self, batches):
    self._batches, self._next = batches, 0

  def __next__(self):
    self._next += 1
    return self._batches[self._next - 1]

  def state(self) -> dict:
    return {"next": self._next}

  def restore(self, state: dict) -> None:
    self._next = state["next"]


def check_train_loop(system, reference, layout_config, name):
  """`loop.train` with a layout gives the same losses as the unsharded steps."""
  step, make_state, params, boxed = stage_setup(system, "pretrain/sft")
  layout = mesh_lib.Layout.from_config(layout_config, make_state, boxed)
  batches = [stage_batch("pretrain/sft", seed) for seed in range(NUM_STEPS)]
  with tempfile.TemporaryDirectory() as workdir:
    state, history = loop.train("pretrain", workdir, layout.init_state(make_state, params),
                                step, _ListLoader(batches), NUM_STEPS, log_every=1,
                                layout=layout)
  np.testing.assert_allclose([r["loss"] for r in history], reference[1], rtol=1e-5)
  assert state.params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor"), name
  print("OK train", name, flush=True)


def check_constraints(system):
  """The model's logical constraints become sharding constraints inside the context."""
  step, make_state, params, boxed = stage_setup(system, "pretrain/sft")
  config = mesh_lib.mesh_config()
  config.update(LAYOUTS["fsdp4_tensor2"])
  layout = mesh_lib.Layout.from_config(config, make_state, boxed)
  state = layout.init_state(make_state, params)
  batch = layout.put_batch(make_batch(0))
  outside = loop.jit_step(step, layout).lower(state, batch, 1).as_text()
  with layout.context():
    inside = loop.jit_step(step, layout).lower(state, batch, 1).as_text()
  # The embeddings, and q and the residual stream of the (scanned) decoder layer, in the
  # forward and the backward; none without the rules.
  counts = [text.count("sharding_constraint") for text in (outside, inside)]
  assert counts[0] == 0 and counts[1] >= 3, counts
  print("OK constraints", flush=True)


def main(stages: list[str]):
  """Checks `stages` (names of STAGE_LAYOUTS; "constraints" for `check_constraints`)."""
  assert jax.device_count() == 8, jax.devices()
  unknown = set(stages) - set(STAGE_LAYOUTS) - {"constraints"}
  assert not unknown, f"unknown stages {unknown}; known: {list(STAGE_LAYOUTS)}"
  if os.environ.get("LATENT_MCA_COMPILATION_CACHE"):
    # The test session's cache: `loop.train` then reuses the step compiled before it.
    enable_compilation_cache(os.environ["LATENT_MCA_COMPILATION_CACHE"])
  system = steps_lib.LatentSystem.build(CFG, LatentConfig(num_codes=16, idm_layers=1,
                                                          policy_layers=1))
  for stage in [s for s in STAGE_LAYOUTS if s in stages]:
    step, make_state, params, boxed = stage_setup(system, stage)
    batches = [stage_batch(stage, seed) for seed in range(NUM_STEPS)]
    initial = jax.device_get(params)
    began = time.perf_counter()
    reference = run_unsharded(step, make_state, params, batches)
    print("unsharded", stage, f"{time.perf_counter() - began:.1f} s", flush=True)
    for name in STAGE_LAYOUTS[stage]:
      sizes = LAYOUTS[name]
      config = mesh_lib.mesh_config()
      config.update(sizes)
      began = time.perf_counter()
      layout, state, losses = run_sharded(step, make_state, params, boxed, batches, config)
      seconds = time.perf_counter() - began
      check_split(f"{stage} {name}", layout, state, sizes)
      relative = compare(f"{stage} {name}", initial, reference, (state, losses))
      print("OK", stage, name, f"losses {np.round(losses, 5).tolist()}",
            f"update difference {relative:.1e}", f"{seconds:.1f} s", flush=True)
    if stage == "pretrain/sft":
      config = mesh_lib.mesh_config()
      config.update(LAYOUTS["data2_fsdp2_tensor2"])
      check_train_loop(system, reference, config, "data2_fsdp2_tensor2")
  if "constraints" in stages:
    check_constraints(system)


if __name__ == "__main__":
  main(sys.argv[1:])
