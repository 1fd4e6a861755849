"""The chain-of-thought agent of the card games: prompts, acting, and one pure PPO step.

The policy reads one frame and the game's reference prompt and writes
`{"thoughts": ..., "action": ...}`; the text after `"action":` is parsed into a legal
action (`parser`). Both action spaces act through `rl.rollout` (one sample per
environment): token space samples the backbone's tokens, latent space samples the
policy's codes, which the frozen world model decodes to tokens. Either way each
response step has a log-probability, and

  log pi(a | s) = thought_coef * sum(thought steps) + sum(action steps)

with the action steps located by the tokenizer (`parser.action_token_masks`).

Sequences are laid out as the rollout lays them out: the prompt left-padded to
`prompt_length` tokens (the text is the same for every step of a game; the frame
differs, and each step's own frame is stored and fed back in its update: the
reference reused the first step's prompt there), then `max_new_tokens` response
steps. Every frame becomes the same number of patches (`pixels.frames_to_pixels`).

`ppo_step(state, batch, rng, *, config) -> (state, metrics)` is pure: one clipped
PPO update of the policy (token space: the backbone; latent space: the latent policy,
with the backbone, codebook and world model frozen) and of the value head, an MLP on
the hidden state of the last prompt token (`ppo.ValueHead`). Params are the
`LatentSystem`'s dict plus "value_head".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_mca.cards import pixels as pixels_lib
from latent_mca.cards import prompts as prompts_lib
from latent_mca.data.processor import Processor
from latent_mca.latent.steps import BACKBONE, LatentSystem
from latent_mca.models.qwen2_5_vl.model import Qwen2_5_VL
from latent_mca.rl import ppo
from latent_mca.rl.rollout import LATENT, TOKEN
from latent_mca.training.state import TrainState

VALUE_HEAD = "value_head"
# What each space trains (regexes over parameter paths); the value head always trains.
TRAINABLE = {
    TOKEN: (rf"{BACKBONE}/.*", rf"{VALUE_HEAD}/.*"),
    LATENT: (r"policy/.*", rf"{VALUE_HEAD}/.*"),
}


def game_prompt_ids(processor: Processor, game: str, image_size: int,
                    text: str | None = None) -> np.ndarray:
  """The token ids of a game's prompt (its frame, then `text`, by default the reference's
  prompt of the game), int32 [T_game].

  The chat template's user turn holds the image and the text; the ids end with the
  assistant header, where the response starts.
  """
  text = prompts_lib.prompt(game) if text is None else text
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  frame = np.zeros((image_size, image_size, 3), np.uint8)
  return np.asarray(processor(text, images=[frame])["input_ids"][0], np.int32)


def left_pad(ids: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) int32 [length]: `ids` left-padded with pad_id."""
  if len(ids) > length:
    raise ValueError(f"a prompt of {len(ids)} tokens does not fit prompt_length={length}; "
                     "raise it")
  pad = length - len(ids)
  return (np.concatenate([np.full(pad, pad_id, np.int32), ids]).astype(np.int32),
          np.concatenate([np.zeros(pad, np.int32), np.ones(len(ids), np.int32)]))


def prompt_batch(prompt_ids: np.ndarray, prompt_mask: np.ndarray, frames, image_size: int,
                 shards: int = 1) -> dict:
  """`rollout`'s prompts for B frames of one game: ids / mask [B, T], images packed per shard."""
  b = frames.shape[0]
  if b % shards:
    raise ValueError(f"{b} environments do not split into {shards} shards")
  pixel_values, grid = pixels_lib.frames_to_pixels(frames, image_size)
  return {"input_ids": jnp.broadcast_to(jnp.asarray(prompt_ids), (b, len(prompt_ids))),
          "attention_mask": jnp.broadcast_to(jnp.asarray(prompt_mask), (b, len(prompt_mask))),
          "pixel_values": pixel_values.reshape(shards, -1, pixel_values.shape[-1]),
          "image_grid_thw": grid.reshape(shards, -1, 3)}


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  """Static settings of the value and PPO functions (hashable: bound into jitted steps)."""

  system: LatentSystem
  value_head: ppo.ValueHead
  ppo: ppo.PPOConfig
  space: str = TOKEN
  temperature: float = 0.2  # of the acting distribution, as the sampler's

  def __post_init__(self):
    if self.space not in (TOKEN, LATENT):
      raise ValueError(f"space must be {TOKEN!r} or {LATENT!r}, got {self.space!r}")


def _value_head_variables(config: AgentConfig, rng) -> dict:
  hidden = config.system.backbone.config.text.hidden_size
  return config.value_head.init(rng, jnp.zeros((1, hidden), jnp.float32))["params"]


def init_value_head(config: AgentConfig, rng) -> dict:
  """The value head's params (plain arrays; `boxed_value_head` has their logical axes)."""
  return nn.meta.unbox(_value_head_variables(config, rng))


def boxed_value_head(config: AgentConfig) -> dict:
  """The shapes of `init_value_head`'s params, boxed with their logical axis names
  (nn.Partitioned), for `latent_mca.parallel.mesh.Layout` beside the LatentSystem's."""
  return jax.eval_shape(lambda rng: _value_head_variables(config, rng), jax.random.key(0))


def boxed_params(config: AgentConfig) -> dict:
  """The agent's params (the LatentSystem's and the value head's) as boxed shapes."""
  return dict(config.system.boxed_params(), **{VALUE_HEAD: boxed_value_head(config)})


def _states(config: AgentConfig, params, batch):
  backbone = params[BACKBONE]
  if config.space == LATENT:
    backbone = jax.lax.stop_gradient(backbone)
  return config.system.backbone_states(backbone, batch)


def _value(config: AgentConfig, params, h_last):
  return config.value_head.apply({"params": params[VALUE_HEAD]}, h_last.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames="config")
def prompt_values(config: AgentConfig, params, prompts: dict):
  """V(s) [B] of a prompt batch (from `prompt_batch`): the value head on its last token."""
  pixel_values = prompts["pixel_values"]
  batch = dict(prompts, pixel_values=pixel_values.reshape(-1, pixel_values.shape[-1]),
               image_grid_thw=prompts["image_grid_thw"].reshape(-1, 3))
  states = _states(config, params, batch)
  return _value(config, params, states.h[:, -1])


def step_logprobs(config: AgentConfig, params, batch):
  """(log-probs [N, M] of the response steps' actions, entropies [N, M], values [N]).

  batch: input_ids / attention_mask [N, T + M] (prompt, then response), the images,
  "actions" [N, M] (codes in latent space, else the tokens). Step j is decided at
  position T - 1 + j; the value reads position T - 1, the last prompt token.
  """
  system = config.system
  m = batch["actions"].shape[1]
  t = batch["input_ids"].shape[1] - m
  states = _states(config, params, batch)
  if config.space == LATENT:
    logits = system.policy_logits(params, states)[:, t - 1:t + m - 1]
  else:
    logits = system.backbone.apply({"params": params[BACKBONE]}, states.h[:, t - 1:t + m - 1],
                                   method=Qwen2_5_VL.logits)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / config.temperature, axis=-1)
  logp = jnp.take_along_axis(log_p, batch["actions"][..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  return logp, entropy, _value(config, params, states.h[:, t - 1])


def ppo_step(state: TrainState, batch: dict, rng, *, config: AgentConfig):
  """One PPO update on a minibatch of transitions.

  batch: `step_logprobs`' inputs plus thought_mask / action_mask [N, M] (float),
  old_logp [N] (the sequence log-prob when acting), advantages, returns, old_values [N].
  Metrics: ppo_loss's, entropy (per response step), logp_mismatch (|new - old| of the
  sequence log-prob: ~0 on the first epoch when the sampler and learner agree), grad_norm.
  """
  del rng
  c = config.ppo
  steps = batch["thought_mask"] + batch["action_mask"]
  count = jnp.maximum(jnp.sum(steps), 1.0)

  def loss_fn(params):
    logp, entropy, values = step_logprobs(config, params, batch)
    seq = ppo.sequence_logprob(logp, batch["thought_mask"], batch["action_mask"], c.thought_coef)
    loss, metrics = ppo.ppo_loss(seq, batch["old_logp"], batch["advantages"], values,
                                 batch["old_values"], batch["returns"], c)
    metrics = dict(metrics, entropy=jnp.sum(entropy * steps) / count,
                   logp_mismatch=jnp.mean(jnp.abs(seq - batch["old_logp"])))
    return loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  return state.apply_gradients(grads), metrics


def update_batch(transitions: dict[str, Any], index: np.ndarray, image_size: int) -> dict:
  """A minibatch of stored transitions as `ppo_step` reads it (images from the stored frames)."""
  take = lambda x: x[index]  # noqa: E731
  pixel_values, grid = pixels_lib.frames_to_pixels(jnp.asarray(take(transitions["frames"])),
                                                   image_size)
  prompt_ids, prompt_mask = take(transitions["prompt_ids"]), take(transitions["prompt_mask"])
  tokens, mask = take(transitions["tokens"]), take(transitions["mask"])
  return {"input_ids": np.concatenate([prompt_ids, tokens], 1),
          "attention_mask": np.concatenate([prompt_mask, mask], 1),
          "pixel_values": pixel_values, "image_grid_thw": grid,
          "actions": take(transitions["actions"]),
          **{k: take(transitions[k]) for k in ("thought_mask", "action_mask", "old_logp",
                                               "advantages", "returns", "old_values")}}
