"""Group rollouts in both action spaces, with KV caches and static shapes.

Token space: the backbone samples each response token (temperature, top-k, top-p).
Latent space: at each step the policy samples a code from its logits at the current
token (top-k 32, temperature 1 by default), and the frozen world model decodes the
next token greedily from (h_t, codebook[code]). The backbone and the policy keep KV
caches; the world model is position-wise (no cache).

Prompts arrive as B rows, left-padded to one length, with their images packed per
shard (`prompts.collate_prompts`: pixel_values [S, P, D], image_grid_thw [S, K, 3],
shard s holding the real images of its B / S rows in order, then dummy fill). Each
prompt is prefilled once; its caches are then repeated G times (rows [g * G,
(g + 1) * G) are prompt g's group). Row r samples with the key fold_in(rng, r) for its
global index r, so a result does not depend on how the rows are split over devices:
`sharded_rollout` runs the same program under `jax.shard_map` over a mesh's batch axes
("data" x "fsdp"), each shard taking whole groups and its own image pack.

A `Rollout` records the response tokens, the sampled actions (codes, or the tokens
themselves) and their log-probabilities under the sampler's temperature-scaled,
unfiltered distribution, which is what the learner recomputes (`rl.step`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from latent_mca.generation.decode import init_kv_cache
from latent_mca.generation.sampling import filter_logits
from latent_mca.latent.heads import init_kv_cache as head_kv_cache
from latent_mca.latent.steps import BACKBONE, LatentSystem
from latent_mca.models.qwen2_5_vl.positions import mrope_positions, text_positions

TOKEN, LATENT = "token", "latent"
# The mesh axes `sharded_rollout` splits prompt groups over by default (those a mesh has):
# the axes of the "batch" logical axis under the default rules (`parallel.sharding`).
BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class Rollout:
  """G samples of each prompt, rows grouped.

  prompt_ids, prompt_mask [N, T] (the prompts, repeated); tokens [N, M] (response,
  pad after the stop token); actions [N, M] (codes in latent space, else = tokens);
  logp [N, M] (the sampler's log-prob of each action); mask [N, M] (1 on response
  tokens up to and including the stop token); lengths [N].
  """

  prompt_ids: Any
  prompt_mask: Any
  tokens: Any
  actions: Any
  logp: Any
  mask: Any
  lengths: Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a rollout samples: group size, length, sampler settings, stop and pad tokens.

  temperature / top_k / top_p apply to the acting distribution: tokens in token space,
  codes in latent space (the world model then decodes greedily). Defaults: SPEC
  section 2 (top-k 32, temperature 1 over codes).
  """

  group_size: int = 8
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 32
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    if self.group_size < 1 or self.max_new_tokens < 1:
      raise ValueError(f"group_size={self.group_size} and max_new_tokens="
                       f"{self.max_new_tokens} must be positive")
    if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"bad sampling settings: temperature={self.temperature}, "
                       f"top_k={self.top_k}, top_p={self.top_p}")


def _flat_images(prompts: dict):
  """This shard's image pack as the model takes it: ([N, D], [K, 3]), or (None, None)."""
  if "pixel_values" not in prompts:
    return None, None
  pixels, grid = prompts["pixel_values"], prompts["image_grid_thw"]
  return pixels.reshape(-1, pixels.shape[-1]), grid.reshape(-1, 3)


def _repeat(tree, group_size: int, axis: int = 0):
  return jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=axis), tree)


def _sample(keys_b, logits_bv, sampling: SamplingConfig):
  """Per-row sample from the filtered distribution, and its log-prob under the unfiltered one."""
  filtered = filter_logits(logits_bv, sampling.temperature, sampling.top_k, sampling.top_p)
  action = jax.vmap(jax.random.categorical)(keys_b, filtered).astype(jnp.int32)
  log_p = jax.nn.log_softmax(logits_bv.astype(jnp.float32) / sampling.temperature, axis=-1)
  return action, jnp.take_along_axis(log_p, action[:, None], axis=-1)[:, 0]


def rollout(system: LatentSystem, params, extra, prompts: dict, rng, *, space: str,
            sampling: SamplingConfig, row_offset=0) -> Rollout:
  """G samples per prompt in `space` ("token" or "latent"); jit it with the static arguments.

  Args:
    system: the backbone and latent modules (latent space uses the policy, the
      codebook and the world model; token space only the backbone).
    params, extra: `LatentSystem` variables.
    prompts: input_ids, attention_mask [B, T] (left-padded) and the image pack
      pixel_values [S, P, D], image_grid_thw [S, K, 3] (`collate_prompts` with S = 1
      here, or S = the batch shards of `sharded_rollout`), or no images.
    rng: key; row r (global index row_offset + r) samples with fold_in(rng, r), then
      fold_in(., step).
    row_offset: the global index of this call's first row (under shard_map).
  """
  if space not in (TOKEN, LATENT):
    raise ValueError(f"space must be {TOKEN!r} or {LATENT!r}, got {space!r}")
  g, m = sampling.group_size, sampling.max_new_tokens
  pixels, grid = _flat_images(prompts)
  b, t = prompts["input_ids"].shape
  model, cfg = system.backbone, system.backbone.config
  backbone = {"params": params[BACKBONE]}
  # Prefill each prompt once, then repeat its state for the G rows of its group.
  positions, next_position = mrope_positions(prompts["input_ids"], prompts["attention_mask"],
                                             grid, cfg)
  cache_mask = jnp.zeros((b, t + m), jnp.int32).at[:, :t].set(prompts["attention_mask"])
  out = model.apply(backbone, prompts["input_ids"], attention_mask=prompts["attention_mask"],
                    pixel_values=pixels, image_grid_thw=grid, position_ids=positions,
                    kv_cache=init_kv_cache(cfg, b, t + m), cache_index=0, cache_mask=cache_mask,
                    compute_logits=space == TOKEN)
  last = out.logits[:, -1] if space == TOKEN else out.hidden_states[:, -1]
  policy_last = policy_cache = None
  if space == LATENT:
    policy_cache = head_kv_cache(cfg.text, system.config.policy_layers, b, t + m, cfg.dtype)
    policy_logits, policy_cache = system.modules.policy.apply(
        {"params": params["policy"]}, out.hidden_states, positions, cache_mask, policy_cache, 0)
    policy_last = policy_logits[:, -1]
    policy_cache = _repeat(policy_cache, g, axis=1)
  kv_cache = _repeat(out.kv_cache, g, axis=1)
  last, policy_last, next_position, cache_mask = _repeat(
      (last, policy_last, next_position, cache_mask), g)
  ids, mask = _repeat((prompts["input_ids"], prompts["attention_mask"]), g)
  n = b * g
  row_keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(row_offset + jnp.arange(n))
  stops = jnp.array(sampling.stop_token_ids or (-1,), jnp.int32)

  def act(i, logits_or_h, policy_logits, done):
    """(token, action, logp) of step i from the backbone's logits / state at the last token."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
    if space == TOKEN:
      token, logp = _sample(keys, logits_or_h, sampling)
      action = token
    else:
      action, logp = _sample(keys, policy_logits, sampling)
      h = logits_or_h[:, None]
      wm_logits = system.code_logits(params, extra, h, action[:, None])
      token = jnp.argmax(wm_logits[:, 0], axis=-1).astype(jnp.int32)
    live = ~done
    token = jnp.where(live, token, sampling.pad_token_id)
    return token, jnp.where(live, action, 0), jnp.where(live, logp, 0.0), live

  def last_inputs(o, pol):
    last = o.logits[:, -1] if space == TOKEN else o.hidden_states[:, -1]
    return last, None if pol is None else pol[:, -1]

  done = jnp.zeros((n,), bool)
  token, action, logp, live = act(0, last, policy_last, done)
  done = done | jnp.isin(token, stops)
  record = lambda buf, i, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype),
                                                         (0, i))
  zeros_i = jnp.zeros((n, m), jnp.int32)
  tokens = record(jnp.full((n, m), sampling.pad_token_id, jnp.int32), 0, token)
  actions, logps = record(zeros_i, 0, action), record(jnp.zeros((n, m), jnp.float32), 0, logp)
  masks = record(zeros_i, 0, live)

  def cond(state):
    i, *_, done, _, _, _ = state
    return (i < m) & ~jnp.all(done)

  def body(state):
    i, tokens, actions, logps, masks, done, kv_cache, policy_cache, cache_mask = state
    slot = t + i - 1  # the previous token's slot
    cache_mask = jax.lax.dynamic_update_slice(cache_mask, jnp.ones((n, 1), jnp.int32), (0, slot))
    step_positions = text_positions(next_position + i - 1, 1)
    step = model.apply(backbone, jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1),
                       position_ids=step_positions, kv_cache=kv_cache, cache_index=slot,
                       cache_mask=cache_mask, compute_logits=space == TOKEN)
    pol = None
    if space == LATENT:
      pol, policy_cache = system.modules.policy.apply(
          {"params": params["policy"]}, step.hidden_states, step_positions, cache_mask,
          policy_cache, slot)
    last, pol_last = last_inputs(step, pol)
    token, action, logp, live = act(i, last, pol_last, done)
    done = done | jnp.isin(token, stops)
    return (i + 1, record(tokens, i, token), record(actions, i, action), record(logps, i, logp),
            record(masks, i, live), done, step.kv_cache, policy_cache, cache_mask)

  state = (jnp.int32(1), tokens, actions, logps, masks, done, kv_cache, policy_cache, cache_mask)
  _, tokens, actions, logps, masks, *_ = jax.lax.while_loop(cond, body, state)
  return Rollout(prompt_ids=ids, prompt_mask=mask, tokens=tokens, actions=actions, logp=logps,
                 mask=masks, lengths=masks.sum(-1))


@functools.cache
def sharded_rollout(system: LatentSystem, mesh: Mesh, *, space: str, sampling: SamplingConfig,
                    axes: str | tuple[str, ...] | None = None):
  """`rollout` as one jitted program over `mesh`, groups split over its batch `axes`.

  Returns fn(params, extra, prompts, rng, row_offset=0) -> Rollout, rows in global
  order (one compiled program per argument set: later calls with equal arguments reuse
  it). Each of the S = prod(mesh.shape[axes]) batch shards takes B / S whole prompts
  (B must divide) and its own image pack (`collate_prompts` with shards=S); the result
  equals the single-device `rollout` (per-row keys use global row indices).

  row_offset (a Python int, traced: every offset runs one program) is the global index
  of the call's first row: a pool of prompts sampled in chunks, chunk c at offset
  c * B * G, gets the rows (and keys) that one call over the whole pool would give,
  from the program of one chunk's shape.

  axes: the mesh axes the prompts are split over, major to minor; None: those of
    `BATCH_AXES` ("data", "fsdp") the mesh has, i.e. the axes the "batch" logical axis
    maps to by default. The other axes (e.g. "tensor") do not split the rollout: every
    device along them computes the same rows (redundant work, for a decode loop without
    a collective per token), and the output is replicated over them.

  Params and extra enter replicated (P()): params laid out otherwise (e.g. a
  TrainState's fsdp- or tensor-sharded weights) are all-gathered on the way in by the
  program, so callers pass their arrays as they are, and each device holds all the
  params while it decodes. Every call should use one placement of each input (the same
  shardings as the call before), or it compiles again.
  """
  if axes is None:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = set(axes) - set(mesh.axis_names)
  if unknown:
    raise ValueError(f"sharded_rollout: axes {sorted(unknown)} are not axes of the mesh "
                     f"{dict(mesh.shape)}")
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  rows_spec = P(axes) if axes else P()

  def local(params, extra, prompts, rng, row_offset):
    rows = prompts["input_ids"].shape[0] * sampling.group_size
    offset = row_offset + (jax.lax.axis_index(axes) * rows if axes else 0)
    return rollout(system, params, extra, prompts, rng, space=space, sampling=sampling,
                   row_offset=offset)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), rows_spec, P(), P()),
                          out_specs=rows_spec, check_vma=False)

  @jax.jit
  def jitted(params, extra, prompts, rng, row_offset):
    b = prompts["input_ids"].shape[0]
    if b % shards:
      raise ValueError(f"{b} prompts do not split over the {shards} shards of mesh axes "
                       f"{axes}")
    if "pixel_values" in prompts and prompts["pixel_values"].shape[0] != shards:
      raise ValueError(f"the image pack has {prompts['pixel_values'].shape[0]} shards; collate "
                       f"the prompts with shards={shards}")
    return sharded(params, extra, prompts, rng, row_offset)

  def run(params, extra, prompts, rng, row_offset: int = 0):
    # Always a weakly typed int32 scalar: one trace whatever the offset.
    return jitted(params, extra, prompts, rng, int(row_offset))

  run.jitted = jitted  # the jitted program (its compilations: run.jitted._cache_size())
  return run


def jitted_rollout(system: LatentSystem, *, space: str, sampling: SamplingConfig):
  """fn(params, extra, prompts, rng) -> Rollout on one device (the reference for sharding)."""
  return jax.jit(functools.partial(rollout, system, space=space, sampling=sampling))


def response_texts(rollout_: Rollout, decode) -> list[str]:
  """Decodes each row's response tokens (up to its stop token, excluded) with `decode`."""
  tokens = np.asarray(jax.device_get(rollout_.tokens))
  mask = np.asarray(jax.device_get(rollout_.mask))
  return [decode(row[m == 1].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]
