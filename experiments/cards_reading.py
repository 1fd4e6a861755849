r"""Can the cards job's tiny VLM learn to read its frames? Reading pretraining, measured.

  python -m experiments.cards_reading --workdir W [--games numberline] [--steps 400]
      [--batch 16] [--lr 2e-3] [--rope_theta 10000] [--image_size 168] [--probe_steps 100 [--probe_first]]
      [--control_steps 100 [--controls colour,band,digit,target]]

W is a cards workdir with its tokenizer (`--config.stages=expert,tokenizer`). The backbone
(the cards job's sizes) is trained from scratch on fresh frames, never repeated, with a
short prompt ("Read the <game> frame.") and, as the target, the opening of the expert's
response: what can be read off the frame (NumberLine's two numbers, the points games'
card values and typed formula, Blackjack's hand and up-card). Frames come from resets
followed by 0-4 random actions, so formulas in progress and grown hands appear too.

Every `--eval_every` steps, on 64 held-out frames per game: next-token accuracy over the
reading's *value* tokens (those holding a digit or a card letter), with the true frames
and with the frames shuffled across the batch. Equal accuracies mean the model answers
from priors and ignores the image. `--probe_steps` also trains the vision tower alone,
with a linear readout of NumberLine's two numbers from its flattened output, as a check
that the frames carry the numbers at this resolution (`--probe_first` then starts the
reading from that vision tower). `--control_steps` trains control tasks first, each from
scratch, whose one-token answer is only in the image (`--controls`): the frame's colour
(global), the row of a black band (positional), one digit alone (a glyph's shape) and
NumberLine's target number (a glyph at a place, beside a distracting one). Writes W/cards_reading.{json,md}.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from latent_mca.cards import agent as agent_lib
from latent_mca.cards import envs as envs_lib
from latent_mca.cards import experts
from latent_mca.cards import glyphs
from latent_mca.cards import pixels as pixels_lib
from latent_mca.cards import render as render_lib
from latent_mca.jobs import cards as cards_job
from latent_mca.models import qwen2_5_vl
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import state as state_lib

CONTROLS = ("colour", "band", "digit", "bigdigit", "shrink", "shrink_anywhere", "target")
_WORKDIR = flags.DEFINE_string("workdir", None, "A cards workdir with a tokenizer.",
                               required=True)
_GAMES = flags.DEFINE_string("games", ",".join(envs_lib.GAMES), "Games, comma-separated.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps (one game per step in turn).")
_BATCH = flags.DEFINE_integer("batch", 16, "Frames per step.")
_LR = flags.DEFINE_float("lr", 2e-3, "Peak AdamW learning rate (cosine, 30 warmup steps).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "The frames' side fed to the model "
                                   "(a multiple of 28; default: the cards job's).")
_THETA = flags.DEFINE_float("rope_theta", 10000.0, "The language model's RoPE base.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Steps between evaluations.")
_PROBE = flags.DEFINE_integer("probe_steps", 0, "Steps of the vision-only linear probe (0: none).")
_PROBE_FIRST = flags.DEFINE_bool("probe_first", False, "Start the reading from the probe's "
                                  "vision tower.")
_CONTROLS = flags.DEFINE_integer("control_steps", 0, "Steps of each control task (0: none).")
_CONTROL_KINDS = flags.DEFINE_string("controls", "colour,band",
                                     "Control tasks, comma-separated: " + ", ".join(CONTROLS))
_CHAIN = flags.DEFINE_bool("chain", False, "Each control task starts from the previous one's "
                           "backbone, and the reading from the last one's (a curriculum).")
_MAX_READING = 32  # tokens: the longest reading (Blackjack, a 5-card hand) takes ~26
_VALUE = re.compile(r"[0-9AJQK]")


def reading(game: str, view: dict) -> str:
  """The part of the expert's response that restates the frame."""
  text, _ = experts.expert_response(game, view)
  if game == "blackjack":
    return text[:text.index(". ", text.index("Dealer has")) + 1]
  return text[:text.index('"thoughts"')]


def random_states(env: envs_lib.CardEnv, key, n: int, max_actions: int = 4):
  """n states: a reset, then 0..max_actions uniformly random actions (auto-resetting)."""

  def one(key):
    k_reset, k_len, key = jax.random.split(key, 3)
    state = env.reset_state(k_reset)
    length = jax.random.randint(k_len, (), 0, max_actions + 1)

    def body(i, carry):
      state, key = carry
      key, k_action, k_step = jax.random.split(key, 3)
      action = jax.random.randint(k_action, (), 0, env.num_actions)
      _, stepped, _, _, _ = env.step_autoreset(k_step, state, action)
      state = jax.tree.map(lambda old, new: jnp.where(i < length, new, old), state, stepped)
      return state, key

    return jax.lax.fori_loop(0, max_actions, body, (state, key))[0]

  return jax.vmap(one)(jax.random.split(key, n))


def prompt_ids(processor, config, game: str) -> np.ndarray:
  """The reading prompt: the frame, then "Read the <game> frame."."""
  return agent_lib.game_prompt_ids(processor, game, config.image_size,
                                   text=f"Read the {game} frame.")


def lm_batch(prompt: tuple[np.ndarray, np.ndarray], ids: np.ndarray, mask: np.ndarray,
             frames, size: int) -> dict:
  """A `backbone.train_step` batch: the (ids, mask) prompt tiled over the rows, then the
  targets `ids` [B, M] learned where `mask`, and the frames' patches."""
  n, zeros = len(ids), np.zeros((len(ids), len(prompt[0])), np.int32)
  pixel_values, grid = pixels_lib.frames_to_pixels(frames, size)
  return {"input_ids": np.concatenate([np.tile(prompt[0], (n, 1)), ids], 1),
          "attention_mask": np.concatenate([np.tile(prompt[1], (n, 1)), mask], 1),
          "loss_mask": np.concatenate([zeros, mask], 1),
          "pixel_values": pixel_values, "image_grid_thw": grid}


class Frames:
  """Batches of (short prompt, reading) on fresh frames of one game."""

  def __init__(self, processor, config, game: str, prompt_length: int):
    self.processor, self.size, self.game = processor, config.image_size, game
    self.env = cards.make_env(config, game)
    self.prompt = agent_lib.left_pad(prompt_ids(processor, config, game), prompt_length,
                                     processor.pad_token_id)
    self.states = jax.jit(functools.partial(random_states, self.env), static_argnums=1)
    self.observe = jax.jit(jax.vmap(self.env.observe))

  def batch(self, key, n: int, shuffle_frames: bool = False) -> dict:
    states = self.states(key, n)
    host = jax.device_get(states)
    ids = np.full((n, _MAX_READING), self.processor.pad_token_id, np.int32)
    mask = np.zeros((n, _MAX_READING), np.int32)
    value = np.zeros((n, _MAX_READING), np.int32)
    tokenizer = self.processor.tokenizer
    for row in range(n):
      text = reading(self.game, self.env.describe(jax.tree.map(lambda x: x[row], host)))
      tokens = tokenizer(text)["input_ids"][:_MAX_READING]
      ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
      value[row, :len(tokens)] = [bool(_VALUE.search(tokenizer.decode([t]))) for t in tokens]
    frames = self.observe(states)
    if shuffle_frames:
      frames = frames[np.roll(np.arange(n), 1)]
    batch = lm_batch(self.prompt, ids, mask, frames, self.size)
    batch["value_mask"] = np.concatenate([np.zeros((n, len(self.prompt[0])), np.int32), value], 1)
    return batch


def train_reading(config, processor, names: list[str], params=None) -> list[dict]:
  """The backbone (from `params`, else fresh) trained on readings; the evaluation rows."""
  model_cfg = backbone_lib.model_config(config, processor)
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  length = max(len(prompt_ids(processor, config, g)) for g in names)
  data = {g: Frames(processor, config, g, length) for g in names}
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=_LR.value, warmup_steps=30, final_fraction=0.05,
                        weight_decay=0.01))
  state = state_lib.TrainState.create(
      params if params is not None else qwen2_5_vl.init_params(model_cfg, jax.random.key(0)),
      state_lib.make_optimizer(optimizer, _STEPS.value), jax.random.key(0))
  step = jax.jit(functools.partial(backbone_lib.train_step, model=model))
  sums = jax.jit(functools.partial(backbone_lib.next_token_sums, model))

  def value_accuracy(params, batch) -> float:
    s = sums(params, dict(batch, loss_mask=batch["value_mask"]))
    return float(s["correct"] / s["count"])

  rows, start = [], time.time()
  for i in range(_STEPS.value + 1):
    if i % _EVAL_EVERY.value == 0 or i == _STEPS.value:
      for g in names:
        key = jax.random.key(10_000 + envs_lib.GAMES.index(g))  # the same frames each time
        rows.append({"step": i, "game": g,
                     "value_accuracy": value_accuracy(state.params, data[g].batch(key, 64)),
                     "shuffled_frames": value_accuracy(state.params,
                                                       data[g].batch(key, 64, True))})
        print(json.dumps(rows[-1]), f"{time.time() - start:.0f}s", flush=True)
    if i < _STEPS.value:
      batch = data[names[i % len(names)]].batch(jax.random.key(i), _BATCH.value)
      batch.pop("value_mask")
      state, _ = step(state, batch, jax.random.key(0))
  return rows


def train_probe(config, processor) -> tuple[list[dict], dict]:
  """The vision tower alone + a linear readout of NumberLine's (current, target).

  Returns the evaluation rows and the backbone's params (only the vision tower trained).
  """
  model_cfg = backbone_lib.model_config(config, processor)
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  env = envs_lib.make("numberline")
  classes, tokens = env.max_position + 1, pixels_lib.tokens_per_frame(config.image_size)
  width = model_cfg.vision.out_hidden_size
  theta = {"backbone": nn.meta.unbox(qwen2_5_vl.init_params(model_cfg, jax.random.key(0))),
           "readout": jnp.zeros((tokens * width, 2 * classes))}
  tx = optax.adam(1e-3)

  def loss_fn(theta, key):
    obs, state = jax.vmap(env.reset)(jax.random.split(key, _BATCH.value))
    pixel_values, grid = pixels_lib.frames_to_pixels(obs, config.image_size)
    features = model.apply({"params": theta["backbone"]}, pixel_values, grid,
                           method=model.encode_images)
    logits = (features.reshape(_BATCH.value, -1) @ theta["readout"]).reshape(-1, 2, classes)
    labels = jnp.stack([state.current, state.target], 1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(logits.argmax(-1) == labels)

  @jax.jit
  def update(theta, opt_state, key):
    (_, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta, key)
    updates, opt_state = tx.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, accuracy

  opt_state, rows = tx.init(theta), []
  for i in range(1, _PROBE.value + 1):
    theta, opt_state, accuracy = update(theta, opt_state, jax.random.key(i))
    if i % 25 == 0 or i == _PROBE.value:
      held_out = float(loss_fn(theta, jax.random.key(10_000))[1])
      rows.append({"step": i, "game": "numberline", "probe_accuracy": held_out})
      print(json.dumps(rows[-1]), flush=True)
  return rows, theta["backbone"]


_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                     [255, 0, 255]], np.uint8)
_render_numberline = jax.jit(jax.vmap(render_lib.render_numberline))


def digit_frame(digit: int, size: int = render_lib.NUMBER_TEXT,
                rng: np.random.Generator | None = None) -> np.ndarray:
  """A white 300x300 frame with one digit in NumberLine's glyph at font `size`: centred, or
  anywhere it fits if `rng` is given."""
  frame = np.full((300, 300, 3), 255, np.uint8)
  ink = glyphs.ink_mask(str(digit), size, True)
  h, w = ink.shape
  top, left = ((300 - h) // 2, (300 - w) // 2) if rng is None else (
      rng.integers(0, 300 - h + 1), rng.integers(0, 300 - w + 1))
  region = frame[top:top + h, left:left + w].astype(np.float32)
  frame[top:top + h, left:left + w] = np.round(region * (1 - ink[..., None])).astype(np.uint8)
  return frame


def shrink_scale(i: int, steps: int, start: float = 4.0) -> float:
  """The "shrink" control's glyph scale at step i: `start` down to 1 over 2/3 of `steps`."""
  return max(1.0, start - (start - 1.0) * i / max(1.0, 2 * steps / 3))


def feature_spread(config, processor) -> dict:
  """How much the freshly initialised vision tower's output tells 6 frames apart.

  For 6 centred digits (NumberLine's glyph, and 4 times larger) and 6 colours: the norm of
  each image token's deviation from its mean over the 6 frames, over the token's norm,
  taken at the token where it is largest (the glyph's). A small ratio is a weak signal
  for the language model to pick out.
  """
  model_cfg = backbone_lib.model_config(config, processor)
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  params = nn.meta.unbox(qwen2_5_vl.init_params(model_cfg, jax.random.key(0)))
  colours = np.broadcast_to(_COLOURS[:, None, None], (6, 300, 300, 3))
  sets = {"digit": np.stack([digit_frame(d) for d in range(1, 7)]),
          "bigdigit": np.stack([digit_frame(d, 4 * render_lib.NUMBER_TEXT) for d in range(1, 7)]),
          "colour": np.ascontiguousarray(colours)}
  spread = {}
  for name, frames in sets.items():
    pixel_values, grid = pixels_lib.frames_to_pixels(jnp.asarray(frames), config.image_size)
    features = model.apply({"params": params}, pixel_values, grid, method=model.encode_images)
    features = np.asarray(features).reshape(6, pixels_lib.tokens_per_frame(config.image_size), -1)
    deviation = np.linalg.norm(features - features.mean(0), axis=-1).mean(0)
    spread[name] = float((deviation / np.linalg.norm(features, axis=-1).mean(0)).max())
  return spread


def train_control(config, processor, kind: str, params=None) -> tuple[list[dict], dict]:
  """The backbone (from `params`, else fresh) on a control task: name one of 6 classes
  shown by the frame.

  "colour": the whole frame is one of 6 colours (a global feature); "band": a white frame
  with a black band across rows [50c, 50c + 50) (a positional one); "digit": a white
  frame with the digit c in NumberLine's glyph at its centre (a shape), "bigdigit" the
  same 4 times larger, "shrink" a curriculum: the centred digit's glyph shrinking from 4
  times NumberLine's size to NumberLine's over the first 2/3 of the steps,
  "shrink_anywhere" the same with the digit anywhere in the frame; "target":
  NumberLine's frame, "Target: c" over a random "Current: k" (a shape at a place, with a
  distractor). The answer is one token, a digit 1-6. Returns the rows (step, training
  accuracy of the answer token, glyph scale) and the trained params.
  """
  model_cfg = backbone_lib.model_config(config, processor)
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  ids = prompt_ids(processor, config, "numberline")
  prompt = (ids, np.ones(len(ids), np.int32))
  answers = [processor.tokenizer(str(c + 1))["input_ids"] for c in range(6)]
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=_LR.value, warmup_steps=10, final_fraction=0.05,
                        weight_decay=0.01))
  state = state_lib.TrainState.create(
      params if params is not None else qwen2_5_vl.init_params(model_cfg, jax.random.key(0)),
      state_lib.make_optimizer(optimizer, _CONTROLS.value), jax.random.key(0))
  step = jax.jit(functools.partial(backbone_lib.train_step, model=model))
  n, width, rows = _BATCH.value, max(len(a) for a in answers), []
  for i in range(1, _CONTROLS.value + 1):
    rng = np.random.default_rng(i)
    classes, scale = rng.integers(0, 6, n), 1.0
    if kind == "colour":
      frames = np.broadcast_to(_COLOURS[classes][:, None, None], (n, 300, 300, 3)).copy()
    elif kind == "band":
      frames = np.full((n, 300, 300, 3), 255, np.uint8)
      for row, c in enumerate(classes):
        frames[row, 50 * c:50 * c + 50] = 0
    elif kind in ("digit", "bigdigit"):
      size = render_lib.NUMBER_TEXT * (4 if kind == "bigdigit" else 1)
      frames = np.stack([digit_frame(c + 1, size) for c in classes])
    elif kind in ("shrink", "shrink_anywhere"):
      scale = shrink_scale(i, _CONTROLS.value)
      size = round(render_lib.NUMBER_TEXT * scale)
      where = rng if kind == "shrink_anywhere" else None
      frames = np.stack([digit_frame(c + 1, size, where) for c in classes])
    else:  # "target": NumberLine's frame, with a random current number below
      others = np.random.default_rng(10_000 + i).integers(1, 7, n)
      frames = np.asarray(_render_numberline(jnp.asarray(classes + 1), jnp.asarray(others)))
    ids = np.full((n, width), processor.pad_token_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    for row, c in enumerate(classes):
      ids[row, :len(answers[c])], mask[row, :len(answers[c])] = answers[c], 1
    batch = lm_batch(prompt, ids, mask, jnp.asarray(frames), config.image_size)
    state, metrics = step(state, batch, jax.random.key(0))
    if i % 25 == 0 or i == _CONTROLS.value:
      rows.append({"step": i, "control": kind, "accuracy": float(metrics["accuracy"]),
                   "scale": scale})
      print(json.dumps(rows[-1]), flush=True)
  return rows, state.params


def main(argv):
  del argv
  config = cards_job.default_config()
  config.backbone.text.rope_theta = _THETA.value
  if _IMAGE_SIZE.value:
    config.image_size = _IMAGE_SIZE.value
  names = [g.strip() for g in _GAMES.value.split(",") if g.strip()]
  processor = cards.load_processor(config, _WORKDIR.value)
  spread = feature_spread(config, processor)
  print("feature spread at initialisation:", json.dumps(spread), flush=True)
  probe, params = train_probe(config, processor) if _PROBE.value else ([], None)
  kinds = [k.strip() for k in _CONTROL_KINDS.value.split(",") if k.strip()]
  unknown = [k for k in kinds if k not in CONTROLS]
  if unknown:
    raise app.UsageError(f"--controls: unknown {unknown}; known: {', '.join(CONTROLS)}")
  controls, start = [], None
  for kind in kinds if _CONTROLS.value else ():
    rows, trained = train_control(config, processor, kind, start if _CHAIN.value else None)
    controls += rows
    start = trained
  if _PROBE_FIRST.value:
    start = params
  rows = (train_reading(config, processor, names,
                        start if _PROBE_FIRST.value or _CHAIN.value else None)
          if _STEPS.value else [])
  settings = {"games": names, "probe_first": _PROBE_FIRST.value, "steps": _STEPS.value,
              "controls": kinds if _CONTROLS.value else [], "control_steps": _CONTROLS.value,
              "chain": _CHAIN.value,
              "batch": _BATCH.value, "lr": _LR.value,
              "rope_theta": _THETA.value, "image_size": config.image_size}
  lines = ["# Reading pretraining of the cards backbone", "",
           f"Settings: {json.dumps(settings)}. Value-token accuracy on 64 held-out frames "
           "per game, with the true frames / with the frames shuffled across the batch.", "",
           "| step | game | true frames | shuffled frames |", "|---:|---|---:|---:|"]
  lines += [f"| {r['step']} | {r['game']} | {r['value_accuracy']:.3f} | "
            f"{r['shuffled_frames']:.3f} |" for r in rows]
  lines += ["", "The fresh vision tower's output over 6 frames of each set: the largest, over "
            "image tokens, of the spread across the frames over the token's norm "
            "(`feature_spread`): " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items()) + "."]
  if probe:
    lines += ["", "Vision tower + linear readout of NumberLine's two numbers (held-out "
              "accuracy):", "", "| step | accuracy |", "|---:|---:|"]
    lines += [f"| {r['step']} | {r['probe_accuracy']:.3f} |" for r in probe]
  if controls:
    lines += ["", "Controls, the answer a digit naming one of 6 classes (training accuracy; "
              "each from scratch, or from the previous one with --chain); the scale is the "
              "glyph's, relative to NumberLine's:", "",
              "| step | control | accuracy | scale |", "|---:|---|---:|---:|"]
    lines += [f"| {r['step']} | {r['control']} | {r['accuracy']:.3f} | {r['scale']:.2f} |"
              for r in controls]
  with open(os.path.join(_WORKDIR.value, "cards_reading.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  backbone_lib.write_json(os.path.join(_WORKDIR.value, "cards_reading.json"),
                          {"settings": settings, "feature_spread": spread,
                           "reading": rows, "probe": probe,
                           "controls": controls})
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
