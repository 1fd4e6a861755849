"""The four card games as JAX environments (latent_mca.cards.envs / arith / gym).

Every expectation is written out by hand: formula values, rewards and ends of
constructed states, blackjack totals and outcomes (dealer draws are checked against
this file's own reading of the rule "draw while below 17, an ace counting 11 when it
does not bust"), and deal properties checked with the Python oracle. Jitted
functions are made once per environment (`_jit`) so the file compiles little.
"""

from __future__ import annotations

import functools
import itertools
import time
from fractions import Fraction

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from latent_mca.cards import arith, envs
from latent_mca.cards import gym as card_gym
from latent_mca.cards import reading as cards_reading
from latent_mca.cards.render import SYMBOLS

ENVS = {game: envs.make(game) for game in envs.GAMES}
KEY = jax.random.key(0)
WIDTH, BATCH = 21, 3072  # every evaluator call is padded to this shape: one compilation


# Each program here runs a handful of times: LLVM's optimisations would cost more compile
# time (about half of it) than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _jit(env: envs.CardEnv, method: str):
  return jit(getattr(env, method))


def deals(env, n):
  """n new states (numpy, stacked), from the unbatched reset the other tests compile too."""
  reset = _jit(env, "reset_state")
  return jax.tree.map(lambda *x: np.stack(x),
                      *jax.device_get([reset(jax.random.key(seed)) for seed in range(n)]))


def act(env, *names):
  return [env.actions.index(name) for name in names]


def play(env, state, actions, key=KEY):
  """Steps `state` through `actions` (indices); returns the final state and per-step results."""
  step = _jit(env, "step_state")
  results = []
  for i, action in enumerate(actions):
    state, reward, done, info = step(jax.random.fold_in(key, i), state, jnp.int32(action))
    results.append((float(reward), bool(done), {k: v.item() for k, v in info.items()}))
  return state, results


def i32(x):
  return jnp.asarray(x, jnp.int32)


# --- arith: the evaluator -----------------------------------------------------------------

F = Fraction
FORMULAS = [  # (formula, exact value or None when malformed)
    ("2 + 3 * 4", F(14)),
    ("( 2 + 3 ) * 4", F(20)),
    ("10 - 4 - 3", F(3)),  # left-associative
    ("10 - ( 4 - 3 )", F(9)),
    ("8 / 4 / 2", F(1)),
    ("8 / ( 4 / 2 )", F(4)),
    ("8 / ( 3 - 8 / 3 )", F(24)),  # 23.99999999999999 in floats
    ("1 / 3 + 1 / 6", F(1, 2)),
    ("2 - 9", F(-7)),
    ("( ( 7 ) )", F(7)),
    ("5 * ( 5 - 1 / 5 )", F(24)),
    ("2 * ( 3 + ( 4 - 1 ) ) * 2", F(24)),
    ("6 / ( 1 - 3 / 4 )", F(24)),
    ("4 - 6 / 3 * 2", F(0)),
    ("", None),
    ("+", None),
    ("1 2", None),  # no digit concatenation
    ("1 +", None),
    ("* 3", None),
    ("- 3 + 9", None),  # no unary minus
    ("2 * * 3", None),  # no power
    ("( 1 + 2", None),
    ("1 + 2 )", None),
    (") 1 + 2 (", None),
    ("( )", None),
    ("2 ( 3 )", None),
    ("( 2 ) 3", None),
    ("( 2 + ) 3", None),
    ("5 / ( 3 - 3 )", None),  # division by zero
    ("3 = 3", None),
    (" * ".join(["10"] * 10), None),  # 10^10 does not fit in int32
]


def pad(symbols, width=WIDTH):
  ids = arith.symbol_ids(symbols)
  return np.array(ids + [0] * (width - len(ids)), np.int32), len(ids)


@functools.cache
def _evaluate():
  return jit(jax.vmap(arith.evaluate))


def evaluate_batch(formulas):
  padded = [pad(f) for f in formulas]
  ids, lengths = np.zeros((BATCH, WIDTH), np.int32), np.zeros(BATCH, np.int32)
  ids[:len(formulas)] = [p[0] for p in padded]
  lengths[:len(formulas)] = [p[1] for p in padded]
  num, den, valid = jax.device_get(_evaluate()(ids, lengths))
  num, den, valid = num[:len(formulas)], den[:len(formulas)], valid[:len(formulas)]
  return [F(int(n), int(d)) if v else None for n, d, v in zip(num, den, valid)], (num, den, valid)


def test_evaluate_hand_computed_values():
  formulas = [text.split() for text, _ in FORMULAS]
  got, (num, den, _) = evaluate_batch(formulas)
  for (text, want), value, n, d in zip(FORMULAS, got, num, den):
    assert value == want, text
    if want is not None:  # reduced, positive denominator
      assert (int(n), int(d)) == (want.numerator, want.denominator), text
  # The oracle agrees, except that it has no int32 limit.
  for text, want in FORMULAS[:-1]:
    assert arith.evaluate_symbols(text.split()) == want, text
  assert arith.evaluate_symbols(FORMULAS[-1][0].split()) == 10 ** 10


def test_evaluate_ignores_symbols_past_length():
  ids, _ = pad("2 + 3 ) ) (".split())  # only "2 + 3" counts
  num, den, valid = jax.device_get(_evaluate()(np.tile(ids, (BATCH, 1)),
                                               np.full(BATCH, 3, np.int32)))
  assert (int(num[0]), int(den[0]), bool(valid[0])) == (5, 1, True)


def test_evaluate_matches_the_oracle_on_random_formulas():
  rng = np.random.default_rng(0)
  formulas = []
  for _ in range(3000):  # mostly well-formed shapes, with random symbols mixed in
    formula, want_operand = [], True
    for _ in range(rng.integers(0, 13)):
      if rng.random() < 0.12:
        formula.append(SYMBOLS[rng.integers(0, len(SYMBOLS))])
      elif want_operand:
        formula.append("(" if rng.random() < 0.25 else str(rng.integers(1, 11)))
      else:
        formula.append(str(rng.choice(["+", "-", "*", "/", ")"])))
      want_operand = formula[-1] in "+-*/("
    formulas.append(formula)
  got, _ = evaluate_batch(formulas)
  want = [arith.evaluate_symbols(f) for f in formulas]
  assert got == want
  assert sum(w is not None for w in want) > 300  # plenty of valid ones were compared


def test_uses_each_once():
  def check(formula, values):
    ids, n = pad(formula.split())
    return bool(arith.uses_each_once(ids, n, np.array(values, np.int32)))

  assert check("3 * 8", [8, 3])
  assert check("10 + 1 + 1", [1, 10, 1])
  assert not check("3 * 8", [3, 8, 1])  # a card unused
  assert not check("3 * 3", [3, 8])  # a card used twice
  assert not check("4 * 6", [4, 5])


# --- arith: the solver --------------------------------------------------------------------


def test_solve_finds_exact_formulas_using_each_value_once():
  cases = {(3, 3, 8, 8): 24, (1, 5, 5, 5): 24, (3, 3, 7, 7): 24, (1, 4, 5, 6): 24,
           (10, 10, 4, 4): 24, (2, 10): 12, (6, 6): 12, (4, 3): 12, (7,): 7}
  for values, target in cases.items():
    formula = arith.solve(list(values), target)
    assert arith.evaluate_symbols(formula) == target, (values, formula)
    assert sorted(int(s) for s in formula if s.isdigit()) == sorted(values)
  assert arith.solve([3, 3, 8, 8], 24) == ["8", "/", "(", "3", "-", "8", "/", "3", ")"]
  for values, target in {(1, 1, 1, 1): 24, (1, 1, 1, 2): 24, (3, 5): 12, (7,): 8}.items():
    assert arith.solve(list(values), target) is None
  # EZPoints' operators only: 3 * 4 and 6 + 6, never a "-" or "/".
  assert arith.solve([3, 4], 12, operators="+*") == ["3", "*", "4"]
  assert arith.solve([6, 6], 12, operators="+*") == ["6", "+", "6"]
  assert arith.solve([24, 2], 12, operators="+*") is None
  # NumPy integers (a deal read off a state) are values like any other
  assert arith.solve(list(np.array([3, 3, 8, 8])), np.int64(24)) == arith.solve([3, 3, 8, 8], 24)


def test_solvable_table_is_fast_and_right():
  arith.solvable_table.cache_clear()
  arith._reachable.cache_clear()
  start = time.perf_counter()
  table = arith.solvable_table()
  assert time.perf_counter() - start < 2.0
  # 566 of the 715 multisets of four values 1..10 make 24 (the known count).
  assert len(table) == 566 == len(set(table))
  assert all(list(hand) == sorted(hand) for hand in table)
  for hand in [(3, 3, 8, 8), (1, 5, 5, 5), (3, 3, 7, 7), (1, 2, 3, 4), (4, 4, 10, 10)]:
    assert hand in table
  for hand in [(1, 1, 1, 1), (1, 1, 1, 2), (1, 1, 1, 3), (10, 10, 10, 10), (4, 10, 10, 10)]:
    assert hand not in table
  hands = set(table)
  for hand in list(itertools.combinations_with_replacement(range(1, 11), 4))[::4]:
    formula = arith.solve(list(hand), 24)
    assert (formula is not None) == (hand in hands), hand
    if formula is not None:
      assert arith.evaluate_symbols(formula) == 24
  mask = arith.solvable_mask()
  assert mask.shape == (10, 10, 10, 10) and mask.sum() == sum(
      len(set(itertools.permutations(hand))) for hand in table)
  assert mask[7, 2, 7, 2] and not mask[0, 0, 0, 0]  # (8, 3, 8, 3) and (1, 1, 1, 1)


def test_draw_solvable_draws_solvable_deals_as_the_environment_does():
  deals = arith.draw_solvable(np.random.default_rng(0), 400)
  assert deals.shape == (400, 4) and deals.min() >= 1 and deals.max() <= 10
  table = set(arith.solvable_table())
  assert all(tuple(sorted(int(v) for v in d)) in table for d in deals)
  # Faces are worth 10: ranks 10..13 of 13 make a value of 10 far more often than any other.
  counts = np.bincount(deals.ravel(), minlength=11)[1:]
  assert counts[9] > 2 * counts[:9].max()
  again = arith.draw_solvable(np.random.default_rng(0), 400)
  np.testing.assert_array_equal(deals, again)
  assert arith.draw_solvable(np.random.default_rng(0), 0).shape == (0, 4)


# --- NumberLine ---------------------------------------------------------------------------

NL = ENVS["numberline"]


def numberline(target, current, steps=0):
  state = _jit(NL, "reset_state")(KEY)
  return state.replace(target=i32(target), current=i32(current), steps=i32(steps))


def test_numberline_rewards_and_clamping():
  minus, plus = act(NL, "-", "+")
  _, results = play(NL, numberline(3, 0), [minus, plus, plus, minus, plus, plus])
  # 0 -> 0 (clamped, -1), 1 (closer, 0), 2 (0), 1 (farther, -1), 2 (0), 3 (reached, +1).
  assert [r for r, _, _ in results] == [-1, 0, 0, -1, 0, 1]
  assert [d for _, d, _ in results] == [False] * 5 + [True]
  assert results[-1][2] == {"success": True, "illegal": False, "truncated": False,
                            "episode_return": -1.0, "episode_length": 6}
  state, results = play(NL, numberline(2, 5), [plus, minus, minus, minus, minus])
  assert [r for r, _, _ in results] == [-1, 0, 0, 1, 0]  # clamped at 5; the last is after done
  assert [d for _, d, _ in results] == [False, False, False, True, True]
  assert results[-1][2]["success"] is False and int(state.current) == 2  # nothing moved
  # Out-of-range actions are clipped into range: 7 is "+", -3 is "-".
  _, results = play(NL, numberline(3, 1), [7, -3])
  assert [r for r, _, _ in results] == [0, -1]


def test_numberline_ends_after_ten_steps():
  minus, plus = act(NL, "-", "+")
  state, results = play(NL, numberline(0, 5), [plus] * 10)
  assert [r for r, _, _ in results] == [-1] * 10
  assert [d for _, d, _ in results] == [False] * 9 + [True]
  assert results[-1][2]["truncated"] and not results[-1][2]["success"]
  assert results[-1][2]["episode_return"] == -10
  # Reaching the target on the tenth step is a success, not a truncation.
  _, results = play(NL, numberline(0, 1, steps=9), [minus])
  assert results == [(1.0, True, {"success": True, "illegal": False, "truncated": False,
                                  "episode_return": 1.0, "episode_length": 10})]
  _, results = play(NL, numberline(0, 2, steps=8), [minus])
  assert results[0][:2] == (0.0, False)


def test_numberline_deals_are_never_at_the_target():
  states = deals(NL, 600)
  pairs = set(zip(np.asarray(states.target).tolist(), np.asarray(states.current).tolist()))
  assert pairs == {(t, c) for t in range(6) for c in range(6) if t != c}
  assert NL.describe(jax.tree.map(lambda x: x[0], states)).keys() == {"target", "current"}
  with pytest.raises(ValueError, match="one state"):
    NL.describe(states)


# --- EZPoints and Points24 ----------------------------------------------------------------

EZ, P24 = ENVS["ezpoints"], ENVS["points24"]


def table(env, ranks, suits=None):
  state = _jit(env, "reset_state")(KEY)
  suits = [0] * len(ranks) if suits is None else suits
  return state.replace(ranks=i32(ranks), suits=i32(suits))


def test_ezpoints_correct_and_wrong_formulas():
  state, results = play(EZ, table(EZ, [13, 2], [1, 3]), act(EZ, "10", "+", "2", "="))  # K + 2
  assert [r for r, _, _ in results] == [0, 0, 0, 10]
  assert [d for _, d, _ in results] == [False, False, False, True]
  assert results[-1][2] == {"success": True, "illegal": False, "truncated": False,
                            "episode_return": 10.0, "episode_length": 4}
  assert EZ.describe(state) == {"cards": [(13, 1), (2, 3)], "values": [10, 2],
                                "formula": ["10", "+", "2"], "target": 12}
  _, results = play(EZ, table(EZ, [13, 2]), act(EZ, "2", "*", "10", "="))  # 20
  assert results[-1][:2] == (-1.0, True) and not results[-1][2]["success"]
  _, results = play(EZ, table(EZ, [6, 6]), act(EZ, "6", "6", "="))  # no "66"
  assert [r for r, _, _ in results] == [0, 0, -1]
  _, results = play(EZ, table(EZ, [3, 4]), act(EZ, "="))  # an empty formula
  assert results == [(-1.0, True, {"success": False, "illegal": False, "truncated": False,
                                   "episode_return": -1.0, "episode_length": 1})]


def test_ezpoints_illegal_numbers_cost_one_and_go_on():
  state, results = play(EZ, table(EZ, [4, 3]), act(EZ, "5", "4", "4", "*", "3", "="))
  assert [r for r, _, _ in results] == [-1, 0, -1, 0, 0, 10]  # 5 is not dealt; 4 twice
  assert [i["illegal"] for _, _, i in results] == [True, False, True, False, False, False]
  assert [d for _, d, _ in results] == [False] * 5 + [True]
  assert EZ.describe(state)["formula"] == ["4", "*", "3"]
  assert int(state.length) == 5  # the two refused numbers count towards the length limit
  assert results[-1][2]["success"] and results[-1][2]["episode_return"] == 8


def test_legal_actions_are_the_numbers_on_unused_cards_and_every_other_symbol():
  legal = _jit(P24, "legal_actions")
  state, _ = play(P24, table(P24, [13, 4, 4, 1]), act(P24, "10", "+", "4"))  # K 4 4 A
  expected = {"10": False, "4": True, "1": True}  # one 4 left, the ace unused, K used
  assert [bool(x) for x in legal(state)] == [
      expected.get(a, a not in envs.NUMBERS) for a in P24.actions]
  state, _ = play(P24, state, act(P24, "4", "1"))
  assert [a for a, x in zip(P24.actions, legal(state)) if x] == list("+-*/()=")
  for env in (NL, BJ):
    assert _jit(env, "legal_actions")(_jit(env, "reset_state")(KEY)).tolist() == [True] * 2


@pytest.mark.parametrize("game", ["ezpoints", "points24"])
def test_legal_actions_agree_with_what_step_refuses(game):
  env = ENVS[game]
  step = jit(jax.vmap(jax.vmap(env.step_state, (None, None, 0)), (None, 0, None)))
  states = jit(functools.partial(cards_reading.random_states, env), static_argnums=1)(KEY, 64)
  _, _, _, info = step(KEY, states, jnp.arange(env.num_actions))
  legal = jit(jax.vmap(env.legal_actions))(states)
  live = ~states.done & (states.length <= env.max_formula_length)
  assert live.sum() > 32
  np.testing.assert_array_equal(info["illegal"][live], ~legal[live])


def test_ezpoints_formula_length_limit():
  plus, three = act(EZ, "+", "3")
  # Six symbols are typed; the next step, whatever it is, ends the episode with -1.
  state, results = play(EZ, table(EZ, [4, 3]), [plus] * 6 + [three])
  assert [r for r, _, _ in results] == [0] * 6 + [-1]
  assert [d for _, d, _ in results] == [False] * 6 + [True]
  assert results[-1][2]["truncated"] and not results[-1][2]["illegal"]
  assert EZ.describe(state)["formula"] == ["+"] * 6
  # Refused numbers count too: six of them, then the limit.
  _, results = play(EZ, table(EZ, [4, 3]), act(EZ, *["9"] * 6, "="))
  assert [r for r, _, _ in results] == [-1] * 7
  assert [d for _, d, _ in results] == [False] * 6 + [True]
  assert results[-1][2]["truncated"]


def test_ezpoints_deals_follow_the_reference():
  states = deals(EZ, 600)
  ranks = np.asarray(states.ranks)
  values = np.minimum(ranks, 10)
  assert np.all((values.sum(1) == 12) | (values.prod(1) == 12))  # solvable with + or *
  assert ranks.min() >= 2 and ranks.max() <= 13
  # The first card is any of 2..K, its partner 12 - v (or 12 // v for 2, 3, 4, 6).
  hands = {tuple(sorted(h)) for h in ranks.tolist()}
  want = {tuple(sorted((r, 12 - min(r, 10)))) for r in range(2, 14)}
  want |= {tuple(sorted((v, 12 // v))) for v in (2, 3, 4, 6)}
  assert hands == want
  assert np.asarray(states.suits).min() == 0 and np.asarray(states.suits).max() == 3


def test_points24_exact_formulas_and_all_cards():
  state, results = play(P24, table(P24, [8, 3, 8, 3]), act(P24, *"8 / ( 3 - 8 / 3 ) =".split()))
  assert results[-1] == (10.0, True, {"success": True, "illegal": False, "truncated": False,
                                      "episode_return": 10.0, "episode_length": 10})
  cards = table(P24, [4, 6, 1, 1])
  _, results = play(P24, cards, act(P24, "4", "*", "6", "="))  # 24, but two cards unused
  assert results[-1][:2] == (-1.0, True) and not results[-1][2]["success"]
  _, results = play(P24, cards, act(P24, *"4 * 6 * 1 * 1 =".split()))
  assert results[-1][0] == 10
  _, results = play(P24, cards, act(P24, *"4 * 6 * 1 * 1 * 1 =".split()))  # a third 1
  assert [r for r, _, _ in results] == [0] * 8 + [-1, -1]  # refused; "4 * 6 * 1 * 1 *" is not
  cards = table(P24, [2, 3, 4, 12])  # Q counts 10
  _, results = play(P24, cards, act(P24, *"2 + 3 * 4 + 10 =".split()))  # precedence: 24
  assert results[-1][0] == 10
  _, results = play(P24, cards, act(P24, *"( 2 + 3 ) * 4 + 10 =".split()))  # 30
  assert results[-1][0] == -1
  _, results = play(P24, cards, act(P24, *"( 2 + 3 * 4 + 10 =".split()))  # unbalanced
  assert results[-1][:2] == (-1.0, True)


def test_points24_formula_length_limit():
  close = act(P24, ")")[0]
  _, results = play(P24, table(P24, [1, 2, 3, 4]), [close] * 22)
  assert [r for r, _, _ in results] == [0] * 21 + [-1]
  assert [d for _, d, _ in results] == [False] * 21 + [True]
  assert results[-1][2]["truncated"]


@pytest.mark.parametrize("solvable_only", [True, False])
def test_points24_deals(solvable_only):
  env = envs.make("points24", solvable_only=solvable_only)
  states = deals(env, 600)
  ranks = np.asarray(states.ranks)
  assert set(ranks.ravel().tolist()) == set(range(1, 14))
  hands = [tuple(sorted(h)) for h in np.minimum(ranks, 10).tolist()]
  solvable = {h: arith.solve(list(h), 24) is not None for h in set(hands)}
  unsolvable = sum(not solvable[h] for h in hands)
  if solvable_only:
    assert unsolvable == 0
  else:
    assert unsolvable > 60  # the reference's deals: 27% make no 24


def test_card_env_options_are_checked():
  assert envs.make("ezpoints").max_formula_length == 5
  assert envs.make("points24", max_formula_length=30).max_formula_length == 30
  assert ENVS["blackjack"].actions == ("stand", "hit")
  assert P24.actions == tuple(SYMBOLS)
  assert EZ.actions == tuple(SYMBOLS[:10]) + ("+", "*", "=")
  with pytest.raises(ValueError, match="unknown card game"):
    envs.make("poker")
  with pytest.raises(ValueError, match="Points24 option"):
    envs.make("ezpoints", solvable_only=False)
  with pytest.raises(ValueError, match="EZPoints/Points24 option"):
    envs.make("blackjack", max_formula_length=3)
  assert hash(envs.make("points24")) == hash(P24)


# --- Blackjack ----------------------------------------------------------------------------

BJ = ENVS["blackjack"]
STAND, HIT = act(BJ, "stand", "hit")


def blackjack(dealer, player):
  state = _jit(BJ, "reset_state")(KEY)
  fill = lambda cards, size: i32(list(cards) + [0] * (size - len(cards)))
  return state.replace(dealer_ranks=fill(dealer, envs.MAX_DEALER_CARDS),
                       dealer_suits=fill([2] * len(dealer), envs.MAX_DEALER_CARDS),
                       dealer_n=i32(len(dealer)),
                       player_ranks=fill(player, envs.MAX_PLAYER_CARDS),
                       player_suits=fill([1] * len(player), envs.MAX_PLAYER_CARDS),
                       player_n=i32(len(player)))


def total(ranks):
  """Blackjack total: faces 10, one ace 11 when that does not pass 21."""
  hard = sum(min(r, 10) for r in ranks)
  return hard + 10 if 1 in ranks and hard + 10 <= 21 else hard


def test_blackjack_totals():
  cases = {(1, 6): 17, (1, 6, 10): 17, (1, 1): 12, (1, 1, 1, 1, 1, 1, 6): 12, (13, 12): 20,
           (1, 13): 21, (1, 1, 9): 21, (10, 5, 9): 24, (1,) * 21: 21}
  for ranks, want in cases.items():
    assert BJ.describe(blackjack([2, 3], list(ranks)))["player_sum"] == want, ranks
    assert int(envs.hand_total(np.array(list(ranks) + [0] * 3), len(ranks))) == want, ranks


@pytest.mark.parametrize("dealer,player,reward", [
    ([10, 7], [10, 8], 1),  # 18 beats 17
    ([13, 7], [12, 7], 0),  # 17 pushes 17
    ([10, 7], [10, 6], -1),  # 16 loses
    ([1, 6], [10, 8], 1),  # the dealer stands on soft 17
    ([1, 6], [10, 6, 1], 0),
    ([1, 13], [7, 7, 7], 0),  # a dealer natural is just 21
    ([10, 10], [1, 12], 1),  # a player natural is 21, no bonus
    ([1, 10], [1, 10], 0),
])
def test_blackjack_stand_without_dealer_draws(dealer, player, reward):
  state, results = play(BJ, blackjack(dealer, player), [STAND])
  assert results == [(reward, True, {"success": reward == 1, "illegal": False, "truncated": False,
                                     "episode_return": reward, "episode_length": 1})]
  assert int(state.dealer_n) == 2  # 17 or more: no card drawn
  view = BJ.describe(state)
  assert view["dealer"] == [(dealer[0], 2), (dealer[1], 2)]  # revealed once over


@pytest.mark.parametrize("dealer", [[10, 6], [5, 6], [1, 5], [2, 2]])
def test_blackjack_dealer_draws_to_17(dealer):
  outcomes = set()
  for seed in range(40):
    state, [(reward, done, info)] = play(BJ, blackjack(dealer, [10, 9]), [STAND],
                                         jax.random.key(seed))
    hand = np.asarray(state.dealer_ranks)[:int(state.dealer_n)].tolist()
    assert hand[:2] == dealer and len(hand) > 2 and done
    assert all(total(hand[:n]) < 17 for n in range(2, len(hand)))  # drew only below 17
    assert total(hand) >= 17  # and stopped at 17 or more
    dealer_score = 0 if total(hand) > 21 else total(hand)
    assert reward == (19 > dealer_score) - (19 < dealer_score)
    assert info["success"] == (reward == 1)
    outcomes.add(reward)
  assert outcomes == {-1, 0, 1}  # dealer busts, pushes at 19, and beats 19 all happen


def test_blackjack_hit_and_bust():
  busts = 0
  for seed in range(40):
    state, [(reward, done, info)] = play(BJ, blackjack([9, 9], [10, 12]), [HIT],
                                         jax.random.key(seed))
    card = int(state.player_ranks[2])
    assert int(state.player_n) == 3 and int(state.dealer_n) == 2
    if card == 1:  # 21: play on
      assert (reward, done) == (0, False)
    else:
      assert (reward, done) == (-1, True) and not info["success"]
      busts += 1
  assert 0 < busts < 40 or busts == 40
  # Hitting a soft 21 is allowed: A K + 5 is a hard 16.
  state, [(reward, done, _)] = play(BJ, blackjack([9, 9], [1, 13]), [HIT], jax.random.key(3))
  assert (reward, done) == (0.0, total(np.asarray(state.player_ranks)[:3].tolist()) > 21)


def test_blackjack_describe():
  state = blackjack([1, 13, 5], [10, 1, 2])
  assert BJ.describe(state) == {"dealer": [(1, 2)], "player": [(10, 1), (1, 1), (2, 1)],
                                "player_sum": 13, "dealer_value": 11}
  assert BJ.describe(blackjack([12, 3], [2, 2]))["dealer_value"] == 10
  dealt = deals(BJ, 300)
  assert set(dealt.dealer_ranks[:, :2].ravel().tolist()) == set(range(1, 14))
  assert set(dealt.player_ranks[:, :2].ravel().tolist()) == set(range(1, 14))
  assert np.all(dealt.player_n == 2) and np.all(dealt.dealer_n == 2)


# --- batching: jit + vmap over 64 environments --------------------------------------------


def _rollout(env, keys, actions):
  """reset, step, step_autoreset of one environment with keys [3] and actions [2]."""
  k0, k1, k2 = keys
  obs0, s0 = env.reset(k0)
  obs1, s1, r1, d1, i1 = env.step(k1, s0, actions[0])
  obs2, s2, r2, d2, i2 = env.step_autoreset(k2, s1, actions[1])
  return (obs0, s0), (obs1, s1, r1, d1, i1), (obs2, s2, r2, d2, i2)


@pytest.mark.parametrize("game", envs.GAMES)
def test_batched_reset_step_autoreset_equal_unbatched(game):
  env, n = ENVS[game], 64
  rng = np.random.default_rng(0)
  # Keys from host data: no eager JAX op (and compilation) per key.
  key_data = rng.integers(0, 2 ** 32, (n, 3, 2), np.uint32)
  actions = rng.integers(0, env.num_actions, (n, 2)).astype(np.int32)
  if game in envs.POINTS_GAMES:
    actions[::2, 1] = env.actions.index("=")  # half the episodes end at the second step
  batched = jax.device_get(jit(jax.vmap(functools.partial(_rollout, env)))(
      jax.random.wrap_key_data(key_data), actions))
  (obs0, s0), (obs1, s1, r1, d1, i1), (obs2, s2, r2, d2, i2) = batched
  assert obs0.shape == (n, 300, 300, 3) and obs0.dtype == np.uint8
  assert r1.dtype == np.float32 and d1.dtype == np.bool_
  assert set(i1) == {"success", "illegal", "truncated", "episode_return", "episode_length"}
  # Autoreset: finished episodes start afresh (their reward, done and info kept), the
  # others carry on.
  assert d2.any() and not d2.all()
  assert np.all(s2.steps[d2] == 0) and not s2.done[d2].any()
  assert np.all(s2.episode_return[d2] == 0)
  assert np.all(s2.steps[~d2 & ~d1] == 2)
  np.testing.assert_array_equal(i2["episode_length"], np.where(d1, 1, 2))
  # Each row equals the environment run alone through the unbatched functions, with the
  # keys as `step_autoreset` documents.
  reset_state, step_state, observe = (_jit(env, m) for m in ("reset_state", "step_state",
                                                            "observe"))
  for i in sorted({0, int(np.argmax(d2)), int(np.argmin(d2))}):
    k0, k1, k2 = (jax.random.wrap_key_data(k) for k in key_data[i])
    one0 = reset_state(k0)
    one1 = step_state(k1, one0, actions[i, 0])
    step_key, reset_key = jax.random.split(k2)
    one2 = step_state(step_key, one1[0], actions[i, 1])
    if one2[2]:
      one2 = (reset_state(reset_key), *one2[1:])
    want = ((observe(one0), one0), (observe(one1[0]), *one1), (observe(one2[0]), *one2))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), batched,
                 jax.device_get(want))


# --- gymnasium ----------------------------------------------------------------------------


def test_gym_wrapper():
  env = card_gym.CardGymEnv("numberline", render_mode="rgb_array")
  assert env.action_space == gymnasium.spaces.Discrete(2)
  assert env.observation_space == gymnasium.spaces.Box(0, 255, (300, 300, 3), np.uint8)
  obs, info = env.reset(seed=3)
  again, info_again = env.reset(seed=3)
  np.testing.assert_array_equal(obs, again)
  assert info == info_again and obs.dtype == np.uint8 and obs.shape == (300, 300, 3)
  # Walk to the target: 0 per step closer, +1 and terminated on arrival.
  view = info["state"]
  rewards = []
  while True:
    action = 1 if view["target"] > view["current"] else 0
    obs, reward, terminated, truncated, info = env.step(action)
    rewards.append(reward)
    view = info["state"]
    if terminated or truncated:
      break
  assert rewards == [0.0] * (len(rewards) - 1) + [1.0]
  assert terminated and not truncated and info["success"]
  np.testing.assert_array_equal(env.render(), obs)
  with pytest.raises(ValueError):
    env.step(2)
  # Always moving away truncates after ten steps.
  _, info = env.reset(seed=4)
  for _ in range(10):
    obs, reward, terminated, truncated, info = env.step(
        0 if info["state"]["target"] > info["state"]["current"] else 1)
  assert truncated and not terminated and not info["success"]

  card_gym.register()
  assert set(card_gym.GYM_IDS.values()) <= set(gymnasium.registry)
  made = gymnasium.make("latent_mca/NumberLine-v0", render_mode="rgb_array")
  assert made.unwrapped.env == ENVS["numberline"]
  check_env(made.unwrapped)  # spec-made, so the render modes are checked too
  made = gymnasium.make("latent_mca/Points24-v0", solvable_only=False)
  assert made.unwrapped.env == envs.make("points24", solvable_only=False)
