"""Sharded training: layouts equal to the unsharded step, the mesh config, remat and bf16.

The layout-equality checks run in subprocesses with 8 simulated CPU devices
(`tests.sharding_layout_check`); the rest runs on the session's one device.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from latent_mca.config_schema import ConfigError
from latent_mca.jobs import pipeline
from latent_mca.models import qwen2_5_vl
from latent_mca.models.qwen2_5_vl.config import REMAT_POLICIES
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.parallel import sharding
from latent_mca.stages import backbone, latent
from latent_mca.training import loop, precision, state as state_lib
from tests.sharding_layout_check import STAGE_LAYOUTS, make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two workers, about equally long, compile side by side on two cores.
WORKERS = (("pretrain/sft", "cycle_warmup", "latent_sft"),
           ("inverse_warmup", "inverse_joint", "policy_bc", "constraints"))


def test_sharded_steps_equal_the_unsharded_ones_on_8_devices():
  flags = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
  procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding_layout_check", *stages],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for stages in WORKERS]
  outputs = [proc.communicate(timeout=900) for proc in procs]
  for proc, (stdout, stderr) in zip(procs, outputs):
    assert proc.returncode == 0, stdout + stderr[-5000:]
  lines = set(" ".join(line.split()[:3]) for stdout, _ in outputs for line in stdout.splitlines())
  expected = {f"OK {stage} {layout}" for stage, layouts in STAGE_LAYOUTS.items()
              for layout in layouts}
  expected |= {"OK train data2_fsdp2_tensor2", "OK constraints"}
  assert expected <= lines, (expected - lines, outputs)
  # Every latent stage and every layout is covered.
  assert set(STAGE_LAYOUTS) == {"pretrain/sft", *latent.ORDER}
  assert {"fsdp4_tensor2", "data8", "data2_fsdp2_tensor2"} == set(STAGE_LAYOUTS["pretrain/sft"])


# ----------------------------------------------------------------------------- the mesh config


def _mesh_config(**sizes):
  config = mesh_lib.mesh_config()
  config.update(sizes)
  return config


def test_mesh_config_resolves_the_free_axis():
  assert mesh_lib.axis_sizes(mesh_lib.mesh_config(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh_lib.axis_sizes(_mesh_config(data=1, fsdp=-1, tensor=2), 8) == {
      "data": 1, "fsdp": 4, "tensor": 2}
  assert mesh_lib.axis_sizes(_mesh_config(data=2, fsdp=2, tensor=2), 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("sizes, message", [
    (dict(data=2, fsdp=2, tensor=1), r"config\.mesh: data=2 x fsdp=2 x tensor=1 is 4 devices, "
                                     r"but there are 8"),
    (dict(data=-1, fsdp=-1), r"only one axis may be -1, got \['data', 'fsdp'\]"),
    (dict(data=-1, tensor=3), r"config\.mesh\.data=-1: the other axes \(3 devices\) do not "
                              r"divide the 8 devices"),
    (dict(data=8, fsdp=0), r"config\.mesh\.fsdp=0: a mesh axis size is a positive int"),
])
def test_mesh_config_errors_name_the_field(sizes, message):
  with pytest.raises(ConfigError, match=message):
    mesh_lib.axis_sizes(_mesh_config(**sizes), 8)


def test_make_mesh_has_auto_axes_over_the_devices():
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_config())
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ConfigError, match=r"config\.mesh: data=1 x fsdp=2 x tensor=1 is 2"):
    mesh_lib.make_mesh(_mesh_config(data=1, fsdp=2), devices=jax.devices()[:1])


def test_rules_overrides_replace_their_logical_axis():
  rules = dict(mesh_lib.rules(_mesh_config(rules=(("vocab", None), ("embed", ("fsdp", "data"))))))
  assert rules["vocab"] is None and rules["embed"] == ("fsdp", "data")
  assert rules["mlp"] == "tensor"  # untouched
  assert [name for name, _ in mesh_lib.rules(mesh_lib.mesh_config())] == [
      name for name, _ in sharding.DEFAULT_RULES]
  with pytest.raises(ConfigError, match=r"config\.mesh\.rules: unknown logical axis 'vocabulary'"):
    mesh_lib.rules(_mesh_config(rules=(("vocabulary", None),)))
  with pytest.raises(ConfigError, match=r"'mlp' maps to unknown mesh axes \['model'\]"):
    mesh_lib.rules(_mesh_config(rules=(("mlp", "model"),)))


MESH_2X2X2 = jax.sharding.AbstractMesh((2, 2, 2), mesh_lib.MESH_AXES)  # only the shape matters


def test_a_dimension_the_mesh_does_not_divide_is_sharded_less():
  mesh = MESH_2X2X2
  assert sharding.fit_spec(P("fsdp", "tensor"), (6, 7), mesh) == P("fsdp", None)
  assert sharding.fit_spec(P(("data", "fsdp"), None), (6, 3), mesh) == P("data", None)
  assert sharding.fit_spec(P(("data", "fsdp")), (8, 3), mesh) == P(("data", "fsdp"), None)


def test_batch_size_the_mesh_cannot_split_is_named():
  mesh = MESH_2X2X2
  assert mesh_lib.batch_parallelism(mesh) == 4
  mesh_lib.check_batch_size(8, mesh, sharding.DEFAULT_RULES, "config.pretrain.batch_size")
  with pytest.raises(ConfigError, match=r"config\.pretrain\.batch_size=6 must be a multiple of "
                                        r"the 4 ways"):
    mesh_lib.check_batch_size(6, mesh, sharding.DEFAULT_RULES, "config.pretrain.batch_size")


def test_pipeline_defaults_are_one_data_axis_in_fp32():
  config = pipeline.default_config()
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 1, 1)
  assert precision.model_dtypes(config.precision) == {"dtype": jnp.float32,
                                                       "param_dtype": jnp.float32}


# ----------------------------------------------------------------------------- one device

CFG = qwen2_5_vl.Qwen2_5_VLConfig.tiny()


def _text_batch(seed: int = 0) -> dict:
  """A text-only backbone batch (no vision tower in the program: quick to compile)."""
  return {**make_batch(seed, image=False), "pixel_values": None, "image_grid_thw": None}


def _make_state(params):
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=1e-3, schedule="constant"))
  tx = state_lib.make_optimizer(optimizer, 10)
  return state_lib.TrainState.create(params, tx, jax.random.key(0))


def test_the_default_layout_on_one_device_reproduces_the_unsharded_bits():
  step = functools.partial(backbone.train_step, model=qwen2_5_vl.Qwen2_5_VL(CFG))
  params = qwen2_5_vl.init_params(CFG, jax.random.key(0))
  batches = [_text_batch(seed) for seed in range(2)]

  plain, plain_losses = jax.jit(_make_state)(params), []
  jitted = loop.jit_step(step)
  for i, batch in enumerate(batches, 1):
    plain, metrics = jitted(plain, batch, i)
    plain_losses.append(np.asarray(metrics["loss"]))

  layout = mesh_lib.Layout.from_config(mesh_lib.mesh_config(), _make_state,
                                       qwen2_5_vl.abstract_params(CFG))
  laid_out, losses = layout.init_state(_make_state, params), []
  jitted = loop.jit_step(step, layout)
  with layout.context():
    for i, batch in enumerate(batches, 1):
      laid_out, metrics = jitted(laid_out, layout.put_batch(batch), i)
      losses.append(np.asarray(metrics["loss"]))

  np.testing.assert_array_equal(losses, plain_losses)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(laid_out.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- remat, bf16


def _loss_and_grads(config, params, batch):
  model = qwen2_5_vl.Qwen2_5_VL(config)

  def loss_fn(p):
    sums = backbone.next_token_sums(model, p, batch)
    return sums["loss_sum"] / sums["count"]

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_remat_policies_give_the_gradients_of_no_remat():
  params = qwen2_5_vl.init_params(CFG, jax.random.key(0))
  batch = _text_batch()
  loss, grads = _loss_and_grads(CFG.replace(remat="none"), params, batch)

  def rematerialised(config) -> bool:
    grad_fn = jax.grad(lambda p: backbone.next_token_sums(qwen2_5_vl.Qwen2_5_VL(config), p,
                                                          batch)["loss_sum"])
    return "remat" in str(jax.make_jaxpr(grad_fn)(params))

  assert not rematerialised(CFG.replace(remat="none"))
  for policy in REMAT_POLICIES[1:] + (True,):
    config = CFG.replace(remat=policy)
    assert rematerialised(config), policy
    remat_loss, remat_grads = _loss_and_grads(config, params, batch)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=str(policy))


def test_an_unknown_remat_policy_is_named():
  with pytest.raises(qwen2_5_vl.ConfigError, match=r"remat='dots' is not a rematerialisation"):
    CFG.replace(remat="dots")


def test_bf16_compute_keeps_fp32_master_weights_and_an_fp32_loss():
  config = precision.precision_config()
  config.compute_dtype = "bfloat16"
  bf16 = CFG.replace(**precision.model_dtypes(config))
  assert (bf16.dtype, bf16.param_dtype) == (jnp.bfloat16, jnp.float32)
  params = qwen2_5_vl.init_params(bf16, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  batch = _text_batch()
  hidden = qwen2_5_vl.Qwen2_5_VL(bf16).apply({"params": params}, batch["input_ids"],
                                             attention_mask=batch["attention_mask"],
                                             compute_logits=False).hidden_states
  assert hidden.dtype == jnp.bfloat16  # the forward runs in bf16

  state = _make_state(params)
  fp32_loss = float(_loss_and_grads(CFG, params, batch)[0])
  step = jax.jit(functools.partial(backbone.train_step, model=qwen2_5_vl.Qwen2_5_VL(bf16)))
  new_state, metrics = step(state, batch, jax.random.key(1))
  assert metrics["loss"].dtype == jnp.float32
  assert abs(float(metrics["loss"]) - fp32_loss) < 2e-2 * fp32_loss
  dtypes = {x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}  # fp32 master weights and Adam moments
  q_proj = lambda p: np.asarray(p["decoder"]["layers"]["q_proj"]["kernel"])
  assert not np.array_equal(q_proj(new_state.params), q_proj(params))  # the masters move


def test_an_unknown_precision_is_named():
  config = precision.precision_config()
  config.param_dtype = "float16"
  with pytest.raises(ConfigError, match=r"config\.precision\.param_dtype='float16'"):
    precision.model_dtypes(config)
