"""The learner side of RL: action log-probs of a rollout, and one pure `rl_step`.

`learner_batch(rollout, images)` turns a rollout into the learner's batch: the
prompt + response sequences (input_ids, attention_mask and the repeated images),
the actions, the sampler's log-probs ("old_logp") and the response mask. The caller
adds "advantages" [N] (`algorithms.compute_advantages` on the judge's rewards),
"loss_params" (`algorithms.loss_params(algorithm)`: the clip ranges, KL weight and
aggregation as arrays, so one compiled step serves every algorithm) and "ref_logp"
(`reference_logprobs` under the frozen reference params).

`rl_step(state, batch, rng, *, config) -> (state, metrics)` recomputes the actions'
log-probs under `state.params`, applies the algorithm's loss, and updates what the
optimizer trains: in latent space the policy (the backbone, codebook and world model
stay bit-identical: their states are computed outside the gradient); in token space
the backbone's top `top_layers` decoder layers, embeddings, final norm and LM head
(lower layers get zero gradients; the optimizer's `trainable` patterns choose the
rest).

On a device mesh (`latent_mca.parallel.mesh.Layout`, as the other stages train):
`place_batch` lays a learner batch out (rows split over the batch axes, images and the
loss's numbers replicated), `sharded_reference_logprobs` and `sharded_step` are
`reference_logprobs` and `rl_step` jitted for the layout (the state sharded as
`layout.state` says, donated); call them inside `layout.context()`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from latent_mca.latent.steps import BACKBONE, LatentSystem
from latent_mca.models.qwen2_5_vl.model import Qwen2_5_VL
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.rl import algorithms as algos
from latent_mca.rl.rollout import LATENT, TOKEN, Rollout
from latent_mca.training import loop
from latent_mca.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class RLStepConfig:
  """Static settings of `rl_step` (hashable); the algorithm is data (batch["loss_params"])."""

  system: LatentSystem
  space: str = LATENT
  temperature: float = 1.0  # of the acting distribution, as the sampler's
  top_layers: int = 0  # token space: decoder layers that train, counted from the top; 0 = all

  def __post_init__(self):
    if self.space not in (TOKEN, LATENT):
      raise ValueError(f"space must be {TOKEN!r} or {LATENT!r}, got {self.space!r}")


def learner_batch(rollout: Rollout, images: dict) -> dict:
  """The learner's view of a rollout; images = `prompts.repeated_images` of its prompts."""
  return {
      "input_ids": jnp.concatenate([rollout.prompt_ids, rollout.tokens], axis=1),
      "attention_mask": jnp.concatenate([rollout.prompt_mask, rollout.mask], axis=1),
      "actions": rollout.actions, "old_logp": rollout.logp, "mask": rollout.mask, **images,
  }


def action_logprobs(config: RLStepConfig, params, batch):
  """(log-probs [N, M] of batch["actions"], entropies [N, M]) of the acting distribution.

  Step j of the response is decided at position T - 1 + j (T = prompt length): by the
  backbone's logits in token space, by the policy's code logits in latent space.
  """
  system = config.system
  m = batch["actions"].shape[1]
  t = batch["input_ids"].shape[1] - m
  if config.space == LATENT:
    states = system.backbone_states(jax.lax.stop_gradient(params[BACKBONE]), batch)
    logits = system.policy_logits(params, states)[:, t - 1:t + m - 1]
  else:
    states = system.backbone_states(params[BACKBONE], batch)
    h = states.h[:, t - 1:t + m - 1]
    logits = system.backbone.apply({"params": params[BACKBONE]}, h, method=Qwen2_5_VL.logits)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / config.temperature, axis=-1)
  logp = jnp.take_along_axis(log_p, batch["actions"][..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  return logp, entropy


def _freeze_lower_layers(grads, top_layers: int):
  """Zeroes the gradients of all but the top `top_layers` stacked decoder layers."""
  if top_layers <= 0:
    return grads
  layers = grads[BACKBONE]["decoder"]["layers"]

  def keep_top(g):
    keep = jnp.arange(g.shape[0]) >= g.shape[0] - top_layers
    return g * keep.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)

  decoder = dict(grads[BACKBONE]["decoder"], layers=jax.tree.map(keep_top, layers))
  return {**grads, BACKBONE: dict(grads[BACKBONE], decoder=decoder)}


def rl_step(state: TrainState, batch: dict, rng, *, config: RLStepConfig):
  """One policy-gradient update on a rollout's learner batch (plus "advantages",
  "loss_params" and "ref_logp").

  Metrics: loss, pg_loss, kl, clip_fraction, ratio_mean (the algorithm's), entropy
  (mean over response tokens of the acting distribution's entropy), logp_mismatch
  (mean |learner - sampler| log-prob of the actions: ~0 when the sampler and the
  learner agree), response_length, grad_norm.
  """
  del rng
  mask = batch["mask"].astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)

  def loss_fn(params):
    logp, entropy = action_logprobs(config, params, batch)
    loss, metrics = algos.policy_loss(batch["loss_params"], logp, batch["old_logp"],
                                      batch["ref_logp"], batch["advantages"], batch["mask"],
                                      max_length=batch["actions"].shape[1])
    metrics = dict(metrics, entropy=jnp.sum(entropy * mask) / tokens,
                   logp_mismatch=jnp.sum(jnp.abs(logp - batch["old_logp"]) * mask) / tokens)
    return loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if config.space == TOKEN:
    grads = _freeze_lower_layers(grads, config.top_layers)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                 response_length=jnp.mean(jnp.sum(mask, axis=1)))
  return state.apply_gradients(grads), metrics


@functools.partial(jax.jit, static_argnames="config")
def reference_logprobs(config: RLStepConfig, ref_params, batch):
  """The frozen reference's log-probs of the actions (for the KL term and its metric)."""
  return action_logprobs(config, ref_params, batch)[0]


# --------------------------------------------------------------------------- on a mesh


def place_batch(layout: mesh_lib.Layout, batch: dict) -> dict:
  """The learner batch on `layout`'s mesh, laid out the same way at every step (so the
  programs reading it compile once, whatever algorithm or selection built it).

  Every per-row field (input_ids ... mask, advantages, ref_logp) is split along its rows
  over the "batch" logical axis (`Layout.batch_shardings`); the packed images
  (`mesh.PACKED_FIELDS`) and "loss_params" (the algorithm's scalars, no batch
  dimension) are replicated. The rows are the global batch (the rollout's, the same in
  every process), so they are placed with `jax.device_put`, not assembled from
  per-process rows as `Layout.put_batch` does.
  """
  rows = {k: v for k, v in batch.items() if k != "loss_params"}
  placed = jax.device_put(rows, layout.batch_shardings(rows))
  if "loss_params" in batch:
    placed["loss_params"] = jax.device_put(batch["loss_params"], layout.replicated)
  return placed


@functools.cache
def _step_fn(config: RLStepConfig):
  """One step object per config, so `loop.jit_step` shares its compilation."""
  return functools.partial(rl_step, config=config)


def sharded_step(config: RLStepConfig, layout: mesh_lib.Layout):
  """`rl_step` on `layout`: fn(state, batch, step) -> (state, metrics) (`loop.jit_step`).

  The state enters and leaves with `layout.state`'s shardings and is donated; the
  metrics come back replicated; the batch keeps the layout `place_batch` gave it; the
  step's key is fold_in(state.rng, step) (rl_step draws none). Call it inside
  `layout.context()`, so the activations' logical constraints shard them. One program
  per (config, mesh, rules, state layout) in the process: every run with equal
  settings (run_all's algorithms of a space) shares its compilation.
  """
  return loop.jit_step(_step_fn(config), layout)


@functools.cache
def _sharded_reference(config: RLStepConfig, mesh, rules):
  rows = NamedSharding(mesh, PartitionSpec(mesh_lib.batch_axes(rules) or None))
  return jax.jit(lambda params, batch: action_logprobs(config, params, batch)[0],
                 out_shardings=rows)


def sharded_reference_logprobs(config: RLStepConfig, layout: mesh_lib.Layout):
  """`reference_logprobs` on `layout`: fn(ref_params, batch) -> [N, M] log-probs, rows
  split like the batch's (`place_batch`), so the step reads them where their rows are.

  Pass the reference params laid out as the state's (`layout.state.params`) and the
  batch from `place_batch`, and call it inside `layout.context()`: one compilation.
  """
  return _sharded_reference(config, layout.mesh, layout.rules)
