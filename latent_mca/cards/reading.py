"""Reading pretraining of the cards backbone: glyph frames, game readings, their batches.

What the cards job's `reading` stage (`latent_mca.stages.cards.reading`) and the
measurements of `experiments/cards_reading.py` share. A tiny VLM trained from scratch
does not learn to read the games' frames (results/cards_reading/): its language model
settles on the priors before it finds the one image token that holds a small glyph. A
curriculum does: first one symbol alone at the frame's centre, its glyph shrinking from
several times NumberLine's size to NumberLine's (`glyph_frame`, `shrink_scale`,
`glyph_batch`), then the games' frames with, as the target, the part of the expert's
response that restates the frame (`reading`, `GameFrames`).

Batches are in `latent_mca.stages.backbone.train_step`'s format (input_ids,
attention_mask, loss_mask, pixel_values, image_grid_thw), every one of the same shape
for a given prompt length (the prompt left-padded, then `MAX_READING` target tokens), so
one compiled step serves both phases. Each also holds a `value_mask`: the target tokens
that carry a value (a digit or a card letter), over which `value_accuracy` counts; pop
it before the training step.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.cards import agent as agent_lib
from latent_mca.cards import envs as envs_lib
from latent_mca.cards import experts
from latent_mca.cards import glyphs
from latent_mca.cards import pixels as pixels_lib
from latent_mca.cards import render as render_lib

# Every symbol a reading's values are written with: the digits, and the card ranks' names
# that are not one digit (glyphs.RANK_NAMES: A, 10, J, Q, K).
SYMBOLS = tuple("0123456789") + ("10", "A", "J", "Q", "K")
MAX_READING = 32  # target tokens: the longest reading (Blackjack, a 5-card hand) takes ~26
VALUE = re.compile(r"[0-9AJQK]")  # a value token holds one of these
FRAME = 300  # the games' frames are 300x300
GLYPH_PROMPT = "Read the symbol."


def glyph_frame(symbol, size: int = render_lib.NUMBER_TEXT,
                rng: np.random.Generator | None = None) -> np.ndarray:
  """A white 300x300 uint8 frame with `symbol` (str(symbol): a digit, "10", or a card
  letter) in NumberLine's bold glyph at font `size`: centred, or anywhere it fits if
  `rng` is given."""
  frame = np.full((FRAME, FRAME, 3), 255, np.uint8)
  ink = glyphs.ink_mask(str(symbol), size, True)
  h, w = ink.shape
  if h > FRAME or w > FRAME:
    raise ValueError(f"the glyph of {symbol!r} at font size {size} ({h}x{w}) does not fit "
                     f"a {FRAME}x{FRAME} frame")
  top, left = ((FRAME - h) // 2, (FRAME - w) // 2) if rng is None else (
      rng.integers(0, FRAME - h + 1), rng.integers(0, FRAME - w + 1))
  region = frame[top:top + h, left:left + w].astype(np.float32)
  frame[top:top + h, left:left + w] = np.round(region * (1 - ink[..., None])).astype(np.uint8)
  return frame


def shrink_scale(i: int, steps: int, start: float = 4.0) -> float:
  """The glyph curriculum's scale (relative to NumberLine's glyph) at step i of `steps`:
  `start` down to 1 over the first 2/3 of the steps, then 1."""
  return max(1.0, start - (start - 1.0) * i / max(1.0, 2 * steps / 3))


def reading(game: str, view: dict) -> str:
  """The part of the expert's response that restates the frame (`view`: env.describe's)."""
  text, _ = experts.expert_response(game, view)
  if game == "blackjack":
    return text[:text.index(". ", text.index("Dealer has")) + 1]
  return text[:text.index('"thoughts"')]


def random_states(env: envs_lib.CardEnv, key, n: int, max_actions: int = 4,
                  formula_symbols: int = 0):
  """n states: a reset, then 0..max_actions uniformly random actions (auto-resetting).

  formula_symbols > 0 (EZPoints, Points24): instead a formula of 0..formula_symbols
  symbols (at most the game's `max_formula_length`; each length equally likely) typed
  with legal actions only and never "=": each symbol is, with even odds, one of the
  numbers on unused cards (while any is left) or an operator, uniformly within its kind.
  """
  # choose(state, *choice_keys keys) -> action; advance(key, state, action) -> state
  if formula_symbols and env.name in envs_lib.POINTS_GAMES:
    steps = min(formula_symbols, env.max_formula_length)
    choose, choice_keys = _formula_symbol(env), 2
    advance = lambda key, state, action: env.step_state(key, state, action)[0]
  else:
    steps, choice_keys = max_actions, 1
    choose = lambda state, key: jax.random.randint(key, (), 0, env.num_actions)
    advance = lambda key, state, action: env.step_autoreset(key, state, action)[1]

  def one(key):
    k_reset, k_len, key = jax.random.split(key, 3)
    state = env.reset_state(k_reset)
    length = jax.random.randint(k_len, (), 0, steps + 1)

    def body(i, carry):
      state, key = carry
      key, *k_choose, k_step = jax.random.split(key, 2 + choice_keys)
      stepped = advance(k_step, state, choose(state, *k_choose))
      state = jax.tree.map(lambda old, new: jnp.where(i < length, new, old), state, stepped)
      return state, key

    return jax.lax.fori_loop(0, steps, body, (state, key))[0]

  return jax.vmap(one)(jax.random.split(key, n))


def _formula_symbol(env: envs_lib.CardEnv):
  """choose(state, k_kind, k_action): `random_states`' choice of a points game's next
  formula symbol, a legal number or an operator with even odds (an operator once no
  number is legal), uniform within its kind."""
  is_number = jnp.asarray([a in envs_lib.NUMBERS for a in env.actions])
  is_operator = jnp.asarray([a not in envs_lib.NUMBERS and a != "=" for a in env.actions])

  def choose(state, k_kind, k_action):
    numbers = is_number & env.legal_actions(state)
    pick_number = jax.random.bernoulli(k_kind) & jnp.any(numbers)
    allowed = jnp.where(pick_number, numbers, is_operator)
    return jax.random.categorical(k_action, jnp.where(allowed, 0.0, -jnp.inf))

  return choose


def reading_width(tokenizer, envs, formula_symbols: int = 0) -> int:
  """Target tokens that hold every reading of `envs`' frames drawn by `random_states`:
  MAX_READING, or more for a points game's formulas of up to `formula_symbols` symbols.
  That bound is the tokens of the empty formula's reading with every card a 10, plus one
  per character the formula can add (one per symbol, two for a 10: at most one per card)
  and one more (the closing quote's token may split off)."""
  width = MAX_READING
  for env in envs:
    if formula_symbols and env.name in envs_lib.POINTS_GAMES:
      cards = envs_lib.NUM_CARDS[env.name]
      view = {"cards": [(10, 0)] * cards, "values": [10] * cards, "formula": [],
              "target": env.target}
      empty = len(tokenizer(reading(env.name, view))["input_ids"])
      symbols = min(formula_symbols, env.max_formula_length)
      width = max(width, empty + symbols + cards + 1)
  return width


def prompt_ids(processor, image_size: int, game: str | None = None) -> np.ndarray:
  """The reading prompt: the frame, then "Read the <game> frame." (no game: the glyph
  curriculum's "Read the symbol.")."""
  text = GLYPH_PROMPT if game is None else f"Read the {game} frame."
  return agent_lib.game_prompt_ids(processor, game or envs_lib.GAMES[0], image_size, text=text)


def prompt_length(processor, image_size: int, games) -> int:
  """The longest reading prompt of the glyph curriculum's and `games`'."""
  return max(len(prompt_ids(processor, image_size, g)) for g in (None, *games))


def padded_prompt(processor, image_size: int, game: str | None,
                  length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) of `prompt_ids`, left-padded to `length`."""
  return agent_lib.left_pad(prompt_ids(processor, image_size, game), length,
                            processor.pad_token_id)


def lm_batch(prompt: tuple[np.ndarray, np.ndarray], ids: np.ndarray, mask: np.ndarray,
             frames, size: int) -> dict:
  """A `backbone.train_step` batch: the (ids, mask) prompt tiled over the rows, then the
  targets `ids` [B, M] learned where `mask`, and the frames' patches (frames resized to
  `size`)."""
  n, zeros = len(ids), np.zeros((len(ids), len(prompt[0])), np.int32)
  pixel_values, grid = pixels_lib.frames_to_pixels(frames, size)
  return {"input_ids": np.concatenate([np.tile(prompt[0], (n, 1)), ids], 1),
          "attention_mask": np.concatenate([np.tile(prompt[1], (n, 1)), mask], 1),
          "loss_mask": np.concatenate([zeros, mask], 1),
          "pixel_values": pixel_values, "image_grid_thw": grid}


@functools.lru_cache(maxsize=8)
def _value_ids(tokenizer) -> frozenset:
  return frozenset(i for i in range(len(tokenizer)) if VALUE.search(tokenizer.decode([i])))


def value_tokens(tokenizer, ids) -> np.ndarray:
  """1 where a token id decodes to text holding a value (a digit or a card letter)."""
  values = _value_ids(tokenizer)
  return np.asarray([int(t) in values for t in ids], np.int32)


def target_batch(processor, prompt, texts: list[str], frames, size: int,
                 width: int = MAX_READING) -> dict:
  """`lm_batch` of the texts as targets (`width` tokens, cut there) and their
  value_mask."""
  n, tokenizer = len(texts), processor.tokenizer
  ids = np.full((n, width), processor.pad_token_id, np.int32)
  mask = np.zeros((n, width), np.int32)
  value = np.zeros((n, width), np.int32)
  for row, text in enumerate(texts):
    tokens = tokenizer(text)["input_ids"][:width]
    ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    value[row, :len(tokens)] = value_tokens(tokenizer, tokens)
  batch = lm_batch(prompt, ids, mask, frames, size)
  batch["value_mask"] = np.concatenate([np.zeros((n, len(prompt[0])), np.int32), value], 1)
  return batch


def glyph_batch(processor, prompt, rng: np.random.Generator, n: int, scale: float,
                size: int, symbols=SYMBOLS, anywhere: bool = False,
                width: int = MAX_READING) -> dict:
  """n frames of one symbol each (drawn from `symbols` by `rng`), the glyph at `scale`
  times NumberLine's, centred (or anywhere); the target is the symbol's text (`width`
  target tokens)."""
  chosen = [symbols[k] for k in rng.integers(0, len(symbols), n)]
  font = round(render_lib.NUMBER_TEXT * scale)
  frames = np.stack([glyph_frame(s, font, rng if anywhere else None) for s in chosen])
  return target_batch(processor, prompt, chosen, jnp.asarray(frames), size, width)


class GameFrames:
  """Batches of (reading prompt, reading) on fresh frames of one game: random states
  (`random_states`, with its `formula_symbols`), never repeated for different keys;
  `width` target tokens (`reading_width`)."""

  def __init__(self, processor, env: envs_lib.CardEnv, game: str, image_size: int,
               prompt_len: int, formula_symbols: int = 0, width: int = MAX_READING):
    self.processor, self.size, self.game, self.env = processor, image_size, game, env
    self.width = width
    self.prompt = padded_prompt(processor, image_size, game, prompt_len)
    self.states = jax.jit(functools.partial(random_states, env,
                                            formula_symbols=formula_symbols),
                          static_argnums=1)
    self.observe = jax.jit(jax.vmap(env.observe))

  def batch(self, key, n: int, shuffle_frames: bool = False) -> dict:
    """n rows; with shuffle_frames each row gets the next row's frame (a control: the
    readings' accuracy without their frames)."""
    states = self.states(key, n)
    host = jax.device_get(states)
    texts = [reading(self.game, self.env.describe(jax.tree.map(lambda x: x[row], host)))
             for row in range(n)]
    frames = self.observe(states)
    if shuffle_frames:
      frames = frames[np.roll(np.arange(n), 1)]
    return target_batch(self.processor, self.prompt, texts, frames, self.size, self.width)


def value_accuracy(sums_fn, params, batch: dict) -> float:
  """Next-token accuracy over the batch's value tokens; sums_fn(params, batch) is
  `backbone.next_token_sums` bound to the model."""
  s = sums_fn(params, dict(batch, loss_mask=batch["value_mask"]))
  return float(s["correct"] / s["count"])
