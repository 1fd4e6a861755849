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

The frames, readings and batches are `latent_mca.cards.reading`'s, which the cards job's
`reading` stage trains on (the glyph curriculum, then the readings).
"""

from __future__ import annotations

import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from latent_mca.cards import envs as envs_lib
from latent_mca.cards import pixels as pixels_lib
from latent_mca.cards import reading as reading_lib
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
def train_reading(config, processor, names: list[str], params=None) -> list[dict]:
  """The backbone (from `params`, else fresh) trained on readings; the evaluation rows."""
  model_cfg = backbone_lib.model_config(config, processor)
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  length = max(len(reading_lib.prompt_ids(processor, config.image_size, g)) for g in names)
  data = {g: reading_lib.GameFrames(processor, cards.make_env(config, g), g, config.image_size,
                                    length) for g in names}
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=_LR.value, warmup_steps=30, final_fraction=0.05,
                        weight_decay=0.01))
  state = state_lib.TrainState.create(
      params if params is not None else qwen2_5_vl.init_params(model_cfg, jax.random.key(0)),
      state_lib.make_optimizer(optimizer, _STEPS.value), jax.random.key(0))
  step = jax.jit(functools.partial(backbone_lib.train_step, model=model))
  sums = jax.jit(functools.partial(backbone_lib.next_token_sums, model))

  rows, start = [], time.time()
  for i in range(_STEPS.value + 1):
    if i % _EVAL_EVERY.value == 0 or i == _STEPS.value:
      for g in names:
        key = jax.random.key(10_000 + envs_lib.GAMES.index(g))  # the same frames each time
        rows.append({"step": i, "game": g,
                     "value_accuracy": reading_lib.value_accuracy(sums, state.params, data[g].batch(key, 64)),
                     "shuffled_frames": reading_lib.value_accuracy(sums, state.params,
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
  big = 4 * render_lib.NUMBER_TEXT
  sets = {"digit": np.stack([reading_lib.glyph_frame(d) for d in range(1, 7)]),
          "bigdigit": np.stack([reading_lib.glyph_frame(d, big) for d in range(1, 7)]),
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
  ids = reading_lib.prompt_ids(processor, config.image_size, "numberline")
  prompt = (ids, np.ones(len(ids), np.int32))
  width = max(len(processor.tokenizer(str(c + 1))["input_ids"]) for c in range(6))
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=_LR.value, warmup_steps=10, final_fraction=0.05,
                        weight_decay=0.01))
  state = state_lib.TrainState.create(
      params if params is not None else qwen2_5_vl.init_params(model_cfg, jax.random.key(0)),
      state_lib.make_optimizer(optimizer, _CONTROLS.value), jax.random.key(0))
  step = jax.jit(functools.partial(backbone_lib.train_step, model=model))
  n, rows = _BATCH.value, []
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
      frames = np.stack([reading_lib.glyph_frame(c + 1, size) for c in classes])
    elif kind in ("shrink", "shrink_anywhere"):
      scale = reading_lib.shrink_scale(i, _CONTROLS.value)
      size = round(render_lib.NUMBER_TEXT * scale)
      where = rng if kind == "shrink_anywhere" else None
      frames = np.stack([reading_lib.glyph_frame(c + 1, size, where) for c in classes])
    else:  # "target": NumberLine's frame, with a random current number below
      others = np.random.default_rng(10_000 + i).integers(1, 7, n)
      frames = np.asarray(_render_numberline(jnp.asarray(classes + 1), jnp.asarray(others)))
    batch = reading_lib.target_batch(processor, prompt, [str(c + 1) for c in classes],
                                     jnp.asarray(frames), config.image_size, width)
    batch.pop("value_mask")
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
