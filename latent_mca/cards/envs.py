"""The four RL4VLM card games (NumberLine, EZPoints, Points24, Blackjack) as pure JAX functions.

`make(name, **options)` gives a `CardEnv`, a frozen (hashable) dataclass, so it can be a
static argument of `jit`. Its methods are pure, PureJaxRL-style:

  reset(key) -> (obs, state)
  step(key, state, action) -> (obs, state, reward, done, info)
  step_autoreset(key, state, action)   like step, but finished environments restart

with `obs` a uint8 [300, 300, 3] frame drawn by `render` and `state` a flax struct of
fixed-shape arrays (`NumberLineState`, `PointsState` for EZPoints and Points24,
`BlackjackState`), so `vmap` over environments and `lax.scan` over steps just work. The
game logic alone is `reset_state` / `step_state` (no rendering); `observe` draws a state
and `describe` gives one unbatched state as plain Python for expert solvers and logs.
An action is an int32 index into `env.actions` (clipped into range). `info` always holds
"success" (the episode ended in success), "illegal" (the action was refused), "truncated"
(the episode ended by a length limit), "episode_return" and "episode_length" (after this
step).
Stepping a finished episode changes nothing and gives reward 0, done True.

Rules are the SPEC's (section 4); where it is silent they follow the reference,
RL4VLM `gym-cards/gym_cards/envs/{numberline,ezpoints,points,blackjack}.py`:

NumberLine: target and current are drawn uniformly in 0..`max_position` (5) with
  current != target (the SPEC; the reference's reset does not check, and its
  constructor's fix-up `(goal + 1) % max_position` is not uniform). "-" / "+" move by one,
  clamped; reward +1 on reaching the target (ends), -1 if the distance did not shrink
  (a clamped move included), else 0; after 2 * max_position = 10 steps the episode is
  truncated (numberline.py `step`).
EZPoints / Points24: the formula is typed symbol by symbol. A number is refused as
  illegal (reward -1, the episode goes on) unless it is on a card not yet used, so a card
  is never used twice (`_is_valid_action`); an illegal number is not shown in the formula
  but counts towards its length, as the reference appends a blank ("to make sure the
  formula length increases"). Operators are never illegal and give 0. "=" ends the
  episode with +10 if the formula is well formed, equals the target exactly and uses
  every card once (`arith`), else -1 ("=" is not appended). The length limit is checked
  at the start of a step, before the action: once the formula (blanks included) is longer
  than `max_formula_length` (5 / 20), the next step, whatever its action, ends the
  episode with -1 and info["truncated"] (`if len(self.formula) > 5` at the top of
  `step`). Formulas are evaluated exactly, not with Python's float `eval` (see `arith`).
EZPoints deals (ezpoints.py `_generate_cards`): a first card of rank 2..K (no ace); its
  value v (faces 10) gets a partner 12 // v with probability 1/2 when v is 2, 3, 4 or 6,
  else 12 - v, dealt as that rank (so never a face or an ace); then the pair is shuffled.
Points24 deals: four ranks A..K uniformly (faces 10); with `solvable_only` (default) the
  deal is redrawn until some formula makes 24 (`arith.solvable_mask`); the reference
  never checks, which `solvable_only=False` reproduces.
Blackjack (blackjack.py, natural=False, sab=False): an infinite deck, ranks A..K
  uniform (the reference draws values 1..10 with 10 four times as likely and shows a 10
  as J/Q/K only: the same values, here the 10 card also appears). The player sees the
  dealer's up-card and the hole card face down. "hit" draws a card: over 21 is a bust,
  -1, end; otherwise 0 (hitting on 21 is allowed). "stand" reveals the hole card and the
  dealer draws while below 17, counting an ace as 11 when that does not bust (so the
  dealer stands on soft 17); reward +1 / 0 / -1 as the player's total beats / equals /
  loses to the dealer's, a dealer bust counting 0. A natural (A + 10) gets no bonus and
  no automatic win: the player must stand. The finished frame shows the dealer's hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.cards import arith, render
from latent_mca.cards.render import SYMBOLS

GAMES = ("numberline", "ezpoints", "points24", "blackjack")
POINTS_GAMES = ("ezpoints", "points24")  # a formula of the cards makes a target
NUMBERS = SYMBOLS[:arith.MAX_NUMBER]  # "1".."10"
ACTIONS = {
    "numberline": ("-", "+"),
    "ezpoints": (*NUMBERS, "+", "*", "="),
    "points24": (*NUMBERS, "+", "-", "*", "/", "(", ")", "="),
    "blackjack": ("stand", "hit"),
}
TARGETS = {"ezpoints": 12, "points24": 24}
NUM_CARDS = {"ezpoints": 2, "points24": 4}
DEFAULT_FORMULA_LENGTH = {"ezpoints": 5, "points24": 20}
SUITS = ("spades", "hearts", "diamonds", "clubs")  # suit ids 0..3
# Blackjack hand buffers: the longest hands that can occur. The player can hold 21 aces
# (hard 21) and still hit once more; the dealer's longest is A A A A A A 6 A A A A A.
MAX_PLAYER_CARDS = 22
MAX_DEALER_CARDS = 12
DEALER_STANDS = 17


@flax.struct.dataclass
class NumberLineState:
  """target, current: int32 in 0..max_position; steps: int32; episode_return: float32;
  done: bool."""

  target: Any
  current: Any
  steps: Any
  episode_return: Any
  done: Any


@flax.struct.dataclass
class PointsState:
  """EZPoints and Points24.

  ranks, suits: int32 [n] (n = 2 or 4), ranks 1..13 (A..K), suits 0..3 (`SUITS`).
  formula: int32 [max_formula_length + 1] symbol ids into `SYMBOLS`, the first
    `formula_len` typed (illegal numbers are not stored).
  formula_len: int32, symbols typed. length: int32, the reference's formula length:
    typed symbols plus refused numbers, the quantity the length limit bounds.
  steps: int32; episode_return: float32; done: bool.
  """

  ranks: Any
  suits: Any
  formula: Any
  formula_len: Any
  length: Any
  steps: Any
  episode_return: Any
  done: Any


@flax.struct.dataclass
class BlackjackState:
  """dealer_ranks, dealer_suits: int32 [MAX_DEALER_CARDS], the first `dealer_n` dealt (the
  second is the hole card); player_ranks, player_suits: int32 [MAX_PLAYER_CARDS], the
  first `player_n` dealt; steps: int32; episode_return: float32; done: bool."""

  dealer_ranks: Any
  dealer_suits: Any
  dealer_n: Any
  player_ranks: Any
  player_suits: Any
  player_n: Any
  steps: Any
  episode_return: Any
  done: Any


def card_values(ranks):
  """Rank 1..13 -> value: faces count 10, an ace 1."""
  return jnp.minimum(ranks, 10)


def hand_total(ranks, n):
  """The best blackjack total of the first `n` cards: an ace counts 11 unless that busts.

  numpy in, numpy out (for `describe`, outside jit); JAX arrays otherwise.
  """
  xp = np if isinstance(ranks, np.ndarray) else jnp
  held = xp.arange(ranks.shape[-1]) < n
  hard = xp.sum(xp.where(held, xp.minimum(ranks, 10), 0), axis=-1)
  usable_ace = xp.any(held & (ranks == 1), axis=-1) & (hard + 10 <= 21)
  return xp.where(usable_ace, hard + 10, hard)


def _put(array, index, value, when=True):
  """array with [index] = value where `when`: a select, which under vmap compiles much
  faster than the scatter of `.at[index].set`."""
  return jnp.where((jnp.arange(array.shape[-1]) == index) & when, value, array)


def _uniform_ints(key, bounds):
  """int32 draws in [0, bounds), independent, one per entry of `bounds` (a static shape).

  Every random quantity of a reset or step comes from this one call: each threefry
  evaluation (`randint` makes two) costs about half a second of compile time on CPU.
  Taking the bits modulo a bound of at most 13 biases it by less than 13 / 2**32.
  """
  bounds = jnp.asarray(bounds, jnp.uint32)
  return (jax.random.bits(key, bounds.shape, jnp.uint32) % bounds).astype(jnp.int32)


def _draw_cards(key, n: int):
  """(ranks int32 [n] in 1..13, suits int32 [n] in 0..3), uniform: an infinite deck."""
  draws = _uniform_ints(key, np.tile([13, 4], (n, 1)))
  return draws[:, 0] + 1, draws[:, 1]


@dataclasses.dataclass(frozen=True)
class CardEnv:
  """One card game and its options; see the module docstring for the rules.

  Attributes:
    name: one of `GAMES`.
    actions: the legal action strings (set from `name`); an action is an index into them.
    max_position: NumberLine's largest position (5); the episode is truncated after
      2 * max_position steps.
    max_formula_length: EZPoints / Points24 formula length limit (default 5 / 20).
    solvable_only: Points24 deals are redrawn until solvable (default True).
  """

  name: str
  max_position: int = 5
  max_formula_length: int | None = None
  solvable_only: bool = True
  actions: tuple[str, ...] = dataclasses.field(init=False)

  def __post_init__(self):
    if self.name not in GAMES:
      raise ValueError(f"unknown card game {self.name!r}; choose one of {GAMES}")
    if self.name != "numberline" and self.max_position != 5:
      raise ValueError(f"max_position is a NumberLine option, not one of {self.name}")
    if self.name not in NUM_CARDS and self.max_formula_length is not None:
      raise ValueError(f"max_formula_length is an EZPoints/Points24 option, not one of "
                       f"{self.name}")
    if self.name != "points24" and not self.solvable_only:
      raise ValueError(f"solvable_only is a Points24 option, not one of {self.name}")
    if self.max_position < 1:
      raise ValueError(f"max_position must be >= 1, got {self.max_position}")
    if self.name in NUM_CARDS:
      length = self.max_formula_length
      length = DEFAULT_FORMULA_LENGTH[self.name] if length is None else length
      if length < 1:
        raise ValueError(f"max_formula_length must be >= 1, got {length}")
      object.__setattr__(self, "max_formula_length", int(length))
    object.__setattr__(self, "actions", ACTIONS[self.name])

  @property
  def num_actions(self) -> int:
    return len(self.actions)

  @property
  def target(self) -> int | None:
    """The value the formula must reach (EZPoints 12, Points24 24), else None."""
    return TARGETS.get(self.name)

  # --- the game logic ---------------------------------------------------------------------

  def reset_state(self, key):
    """A new episode's state (no rendering)."""
    return {"numberline": self._numberline_reset, "ezpoints": self._ezpoints_reset,
            "points24": self._points24_reset, "blackjack": self._blackjack_reset}[self.name](key)

  def step_state(self, key, state, action):
    """(state, reward float32, done bool, info) after `action` (int32 index into actions)."""
    step = {"numberline": self._numberline_step, "ezpoints": self._points_step,
            "points24": self._points_step, "blackjack": self._blackjack_step}[self.name]
    action = jnp.clip(jnp.asarray(action, jnp.int32), 0, self.num_actions - 1)
    new, reward, flags = step(key, state, action)
    # A finished episode stays as it is until the caller resets it.
    finished = state.done
    new = new.replace(steps=state.steps + 1, episode_return=state.episode_return + reward)
    new = jax.tree.map(lambda old, x: jnp.where(finished, old, x), state, new)
    reward = jnp.where(finished, 0.0, reward).astype(jnp.float32)
    info = {flag: value & ~finished for flag, value in flags.items()}
    info.update(episode_return=new.episode_return, episode_length=new.steps)
    return new, reward, new.done, info

  # --- rendering and views ----------------------------------------------------------------

  def observe(self, state):
    """uint8 [300, 300, 3]: the frame the player sees."""
    if self.name == "numberline":
      return render.render_numberline(state.target, state.current)
    if self.name == "blackjack":
      return render.render_blackjack(state.dealer_ranks, state.dealer_suits, state.dealer_n,
                                     state.player_ranks, state.player_suits, state.player_n,
                                     ~state.done)
    return render.render_table(state.ranks, state.suits, state.formula, state.formula_len)

  def reset(self, key):
    """(obs uint8 [300, 300, 3], state) of a new episode."""
    state = self.reset_state(key)
    return self.observe(state), state

  def step(self, key, state, action):
    """(obs, state, reward float32, done bool, info); no reset after done."""
    state, reward, done, info = self.step_state(key, state, action)
    return self.observe(state), state, reward, done, info

  def step_autoreset(self, key, state, action):
    """`step`, with a finished episode replaced by a new one (its obs returned).

    reward, done and info are those of the finishing step, as in PureJaxRL. The step
    uses the first key of `jax.random.split(key)`, the new episode the second.
    """
    step_key, reset_key = jax.random.split(key)
    state, reward, done, info = self.step_state(step_key, state, action)
    fresh = self.reset_state(reset_key)
    state = jax.tree.map(lambda new, old: jnp.where(done, new, old), fresh, state)
    return self.observe(state), state, reward, done, info

  def describe(self, state) -> dict:
    """One unbatched state as plain Python.

    numberline: {"target", "current"}; ezpoints / points24: {"cards": [(rank, suit)],
    "values", "formula": [symbol strings], "target"}; blackjack: {"dealer": [(rank, suit)]
    (the up-card only while the episode runs, the whole hand after), "player",
    "player_sum" (best total), "dealer_value" (the up-card's value, an ace counting 11)}.
    """
    state = jax.tree.map(np.asarray, state)
    if state.done.ndim:
      raise ValueError(f"describe takes one state, got a batch of shape {state.done.shape}")
    if self.name == "numberline":
      return {"target": int(state.target), "current": int(state.current)}
    if self.name == "blackjack":
      dealer_n = int(state.dealer_n) if state.done else 1
      up_rank = int(state.dealer_ranks[0])
      return {"dealer": _cards(state.dealer_ranks, state.dealer_suits, dealer_n),
              "player": _cards(state.player_ranks, state.player_suits, int(state.player_n)),
              "player_sum": int(hand_total(state.player_ranks, state.player_n)),
              "dealer_value": 11 if up_rank == 1 else min(up_rank, 10)}
    return {"cards": _cards(state.ranks, state.suits, len(state.ranks)),
            "values": [min(int(r), 10) for r in state.ranks],
            "formula": [SYMBOLS[int(s)] for s in state.formula[:int(state.formula_len)]],
            "target": self.target}

  # --- NumberLine -------------------------------------------------------------------------

  def _numberline_reset(self, key):
    span = self.max_position + 1
    target, offset = _uniform_ints(key, [span, span - 1])
    current = (target + 1 + offset) % span  # uniform over the positions other than target
    return NumberLineState(target=target, current=current, **_fresh_counters())

  def _numberline_step(self, key, state, action):
    del key
    current = jnp.clip(state.current + jnp.where(action == 0, -1, 1), 0, self.max_position)
    before, after = jnp.abs(state.current - state.target), jnp.abs(current - state.target)
    reached = after == 0
    reward = jnp.where(reached, 1.0, jnp.where(after >= before, -1.0, 0.0))
    truncated = ~reached & (state.steps + 1 >= 2 * self.max_position)
    new = state.replace(current=current, done=reached | truncated)
    return new, reward, {"success": reached, "illegal": jnp.zeros((), bool),
                         "truncated": truncated}

  # --- EZPoints and Points24 --------------------------------------------------------------

  def _points_state(self, ranks, suits):
    return PointsState(ranks=ranks, suits=suits,
                       formula=jnp.zeros(self.max_formula_length + 1, jnp.int32),
                       formula_len=jnp.zeros((), jnp.int32), length=jnp.zeros((), jnp.int32),
                       **_fresh_counters())

  def _ezpoints_reset(self, key):
    draws = _uniform_ints(key, [12, 2, 2, 4, 4])
    first = draws[0] + 2  # 2..13: the reference never deals an ace first
    value = card_values(first)
    divides = (value == 2) | (value == 3) | (value == 4) | (value == 6)
    second = jnp.where(divides & (draws[1] == 1), 12 // value, 12 - value)
    ranks = jnp.where(draws[2] == 1, jnp.stack([second, first]), jnp.stack([first, second]))
    return self._points_state(ranks, draws[3:])

  def _points24_reset(self, key):
    if not self.solvable_only:
      return self._points_state(*_draw_cards(key, 4))
    mask = jnp.asarray(arith.solvable_mask(TARGETS["points24"]))
    unsolvable = lambda c: ~mask[tuple(card_values(c[1]) - 1)]
    deal = lambda c: (c[0] + 1, *_draw_cards(jax.random.fold_in(key, c[0]), 4))
    # Start from A A A A, which makes no 24, so the first deal is the loop's.
    aces = jnp.ones(4, jnp.int32)
    _, ranks, suits = jax.lax.while_loop(unsolvable, deal, (jnp.zeros((), jnp.int32), aces, aces))
    return self._points_state(ranks, suits)

  def _symbols(self):
    """int32 [num_actions]: each action's symbol id (`SYMBOLS`), EZPoints / Points24."""
    return jnp.asarray([SYMBOLS.index(a) for a in self.actions], jnp.int32)

  def legal_actions(self, state):
    """bool [num_actions]: the actions `step` would not refuse as illegal. In EZPoints and
    Points24 a number is legal only on a card not yet used; everything else always is."""
    if self.name not in POINTS_GAMES:
      return jnp.ones(self.num_actions, bool)
    symbols = self._symbols()
    typed = jnp.arange(state.formula.shape[0]) < state.formula_len
    uses = jnp.sum(typed[None] & (state.formula[None] == symbols[:, None]), 1)
    cards = jnp.sum(card_values(state.ranks)[None] == symbols[:, None] + 1, 1)
    return (symbols >= arith.MAX_NUMBER) | (uses < cards)

  def _points_step(self, key, state, action):
    del key
    symbol = self._symbols()[action]
    too_long = state.length > self.max_formula_length
    is_equals = symbol == arith.EQUALS
    illegal = ~too_long & ~self.legal_actions(state)[action]
    num, den, valid = arith.evaluate(state.formula, state.formula_len)
    values = card_values(state.ranks)
    correct = (valid & (num == self.target * den)
               & arith.uses_each_once(state.formula, state.formula_len, values))
    submitted = ~too_long & is_equals
    append = ~too_long & ~illegal & ~is_equals
    formula = _put(state.formula, state.formula_len, symbol, append)
    new = state.replace(formula=formula, formula_len=state.formula_len + append,
                        length=state.length + (~too_long & ~is_equals), done=too_long | is_equals)
    reward = jnp.where(too_long | illegal | (submitted & ~correct), -1.0,
                       jnp.where(submitted, 10.0, 0.0))
    return new, reward, {"success": submitted & correct, "illegal": illegal,
                         "truncated": too_long}

  # --- Blackjack --------------------------------------------------------------------------

  def _blackjack_reset(self, key):
    ranks, suits = _draw_cards(key, 4)  # dealer: up-card, hole card; player: two cards
    pad = lambda x, size: jnp.zeros(size, jnp.int32).at[:2].set(x)
    return BlackjackState(
        dealer_ranks=pad(ranks[:2], MAX_DEALER_CARDS),
        dealer_suits=pad(suits[:2], MAX_DEALER_CARDS), dealer_n=jnp.full((), 2, jnp.int32),
        player_ranks=pad(ranks[2:], MAX_PLAYER_CARDS),
        player_suits=pad(suits[2:], MAX_PLAYER_CARDS), player_n=jnp.full((), 2, jnp.int32),
        **_fresh_counters())

  def _blackjack_step(self, key, state, action):
    # Card 0 is the player's if they hit; cards 1.. the dealer's if they stand.
    draw_ranks, draw_suits = _draw_cards(key, 1 + MAX_DEALER_CARDS - 2)
    hit = state.replace(player_ranks=_put(state.player_ranks, state.player_n, draw_ranks[0]),
                        player_suits=_put(state.player_suits, state.player_n, draw_suits[0]),
                        player_n=state.player_n + 1)
    bust = hand_total(hit.player_ranks, hit.player_n) > 21

    # stand: the dealer draws while below 17 (at most MAX_DEALER_CARDS - 2 draws).
    def dealer_draw(i, hand):
      ranks, suits, n = hand
      more = hand_total(ranks, n) < DEALER_STANDS
      return (_put(ranks, n, draw_ranks[1 + i], more), _put(suits, n, draw_suits[1 + i], more),
              n + more)

    dealer_ranks, dealer_suits, dealer_n = jax.lax.fori_loop(
        0, MAX_DEALER_CARDS - 2, dealer_draw,
        (state.dealer_ranks, state.dealer_suits, state.dealer_n))
    score = lambda total: jnp.where(total > 21, 0, total)
    player = score(hand_total(state.player_ranks, state.player_n))
    dealer = score(hand_total(dealer_ranks, dealer_n))
    stand_reward = jnp.sign(player - dealer).astype(jnp.float32)
    stand = state.replace(dealer_ranks=dealer_ranks, dealer_suits=dealer_suits,
                          dealer_n=dealer_n, done=jnp.ones((), bool))

    is_hit = action == 1
    new = jax.tree.map(lambda h, s: jnp.where(is_hit, h, s), hit.replace(done=bust), stand)
    reward = jnp.where(is_hit, jnp.where(bust, -1.0, 0.0), stand_reward)
    return new, reward, {"success": ~is_hit & (stand_reward > 0), "illegal": jnp.zeros((), bool),
                         "truncated": jnp.zeros((), bool)}


def _fresh_counters():
  return dict(steps=jnp.zeros((), jnp.int32), episode_return=jnp.zeros((), jnp.float32),
              done=jnp.zeros((), bool))


def _cards(ranks, suits, n) -> list[tuple[int, int]]:
  return [(int(r), int(s)) for r, s in zip(ranks[:n], suits[:n])]


def make(name: str, **options) -> CardEnv:
  """The card game `name` (one of `GAMES`) with its options (see `CardEnv`)."""
  return CardEnv(name=name, **options)
