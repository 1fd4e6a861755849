r"""Writes example frames of the four card games, drawn by the JAX renderer, to a folder.

  python -m experiments.export_card_frames --out docs/examples

Each game is reset with `--seed` and played a few moves, so the frames show real
environment states: NumberLine after one "+", EZPoints with a formula like "5 +"
half typed, Points24 with a parenthesised formula under way, Blackjack before the
player stands (the hole card face down; after a hit if it cannot bust) and, in
`cards_blackjack_end.png`, after standing (the dealer's hand revealed).
`cards_all.png` puts the four in a 2x2 montage, as in the reference's figure.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from latent_mca.cards import envs

_OUT = flags.DEFINE_string("out", "docs/examples", "Output folder.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the episodes shown.")


def _number(value: int) -> str:
  return str(min(value, 10))


def _moves(env: envs.CardEnv, state) -> list[str]:
  """A few plausible moves from the first state: a formula typed part way, a hit."""
  if env.name == "numberline":
    return ["+"]
  if env.name == "blackjack":  # a hit that cannot bust, so the hole card stays face down
    return ["hit"] if env.describe(state)["player_sum"] <= 11 else []
  values = env.describe(state)["values"]
  if env.name == "ezpoints":
    return [_number(values[0]), "+"]
  return ["(", _number(values[0]), "+", _number(values[1]), ")", "*", _number(values[2])]


def _play(env: envs.CardEnv, moves: list[str] | None, seed: int):
  """(frame, state) after `moves` (None: `_moves`) from the episode of `seed`."""
  key = jax.random.key(seed)
  obs, state = jax.jit(env.reset)(key)
  step = jax.jit(env.step)
  moves = _moves(env, state) if moves is None else moves
  for move in moves:
    key, step_key = jax.random.split(key)
    obs, state, *_ = step(step_key, state, env.actions.index(move))
  return np.asarray(obs), state


def _save(frame: np.ndarray, name: str) -> str:
  path = os.path.join(_OUT.value, name)
  Image.fromarray(frame).save(path)
  return path


def montage(frames: list[np.ndarray], border: int = 4) -> np.ndarray:
  """2x2 grid of [300, 300, 3] frames with a light grey border around each."""
  padded = [np.pad(f, ((border, border), (border, border), (0, 0)), constant_values=200)
            for f in frames]
  return np.concatenate([np.concatenate(padded[:2], 1), np.concatenate(padded[2:], 1)], 0)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  frames = []
  for name in envs.GAMES:
    env = envs.make(name)
    frame, state = _play(env, None, _SEED.value)
    frames.append(frame)
    print(_save(frame, f"cards_{name}.png"), env.describe(state))
    if name == "blackjack":
      frame, state = _play(env, ["stand"], _SEED.value)
      print(_save(frame, "cards_blackjack_end.png"), env.describe(state))
  print(_save(montage(frames), "cards_all.png"))


if __name__ == "__main__":
  app.run(main)
