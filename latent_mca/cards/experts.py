"""Expert chain-of-thought responses for the card games' supervised warm start.

`expert_response(game, view)` answers one step of a game, given the environment's
`describe(state)` view, with the response a policy should imitate (in the reference's
JSON, `prompts.RESPONSE_KEYS`, written by `prompts.format_response`) and the action
string it names. A tiny model is trained on these, so every response follows one short
template per game, starts with what can be read off the image (numbers, card values,
the formula typed so far), reasons in one step from there, and repeats the chosen
action at the end of the thoughts, right before `"action"`:

  NumberLine  {"current number": "1", "target number": "5", "thoughts": "1 is less than 5,
              so I should increase it: +", "action": "+"}
  EZPoints    {"cards": [2, 6], "current formula": "2*", "thoughts": "Solution: 2*6=12.
              Next: 6", "action": "6"}
  Points24    {"cards": [3, 3, 8, 8], "current formula": "8/(3-8/3)", "thoughts":
              "Solution: 8/(3-8/3)=24. Complete. Next: =", "action": "="}
  Blackjack   {"thoughts": "I have 10, 6: hard 16. Dealer has K: 10. Hard 13-16 vs 7 to A:
              hit", "action": "hit"}

Points games. Card values count J, Q, K as 10 and A as 1. The solution, the plan the
thoughts state, is chosen by `plan` (EZPoints: "+" and "*" only):
- "canonical" (the default): the first formula over the cards, in either operand order
  and written with only the parentheses precedence needs, in a canonical order (fewest
  symbols, fewest divisions, then the symbols' string order). It depends only on the
  multiset of values: a deal in any card order gets the same plan, so a model learns one
  plan per multiset (715 multisets of 4 values in 1..10, 566 of them make 24). Trained
  on the values alone, a decoder of the cards job's size plans a solution for 61.5% of
  fresh Points24 deals this way against 36.1% with "deal"
  (`results/points24_plans/`, `python -m experiments.points24_plans`);
- "deal": `arith.solve(values, target, operators)` on the values in card order, so a
  multiset dealt in another order may get another formula (the results made before
  the option, under results/cards_*, used it).
Either way the same deal always gives the same thoughts. The next symbol continues the
formula typed so far:
- typed formula already uses every card once and equals the target: "Complete", "=";
- typed formula a prefix of the solution: the solution's next symbol;
- otherwise the first solution in the canonical order that starts with the typed
  formula (so a typed redundant parenthesis matches none);
- no such solution ("No solution starts with 5+"), or a deal with no solution at all
  ("No formula makes 24"): "=", which ends the episode.
On its own trajectories the expert always stays on its solution; the other branches
are for relabelling a policy's states.

Blackjack (stand or hit only: no double, split or surrender). Totals are recomputed
from the visible cards, as a reader of the image would: an ace counts 11 while that
does not bust the hand (the total is then *soft*), and the dealer's up-card counts
its value, an ace 11. The rule is basic strategy for a dealer who stands on soft 17,
the game's rule, as in the standard chart (e.g. the Wizard of Odds basic-strategy
chart for 4-8 decks, dealer stands on soft 17; E. Thorp, *Beat the Dealer*, 1966)
read without doubling, where "double, else stand" (soft 18 vs 3-6) stands and
"double, else hit" hits:

  hard 11 or less: hit          soft 17 or less: hit
  hard 12: stand vs 4-6         soft 18: stand vs 2-8, hit vs 9, 10, A
  hard 13-16: stand vs 2-6      soft 19 or more: stand
  hard 17 or more: stand

For the game's infinite deck this is also the exact optimum of every (total, soft,
up-card) state; the tests check it against a dynamic program.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from fractions import Fraction

from latent_mca.cards import arith
from latent_mca.cards.envs import ACTIONS, GAMES, POINTS_GAMES
from latent_mca.cards.prompts import RESPONSE_KEYS, format_response

_RANK_NAMES = {1: "A", 11: "J", 12: "Q", 13: "K"}
_OPERATORS = {game: "".join(a for a in ACTIONS[game] if a in "+-*/") for game in POINTS_GAMES}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3  # a number's precedence: never needs parentheses
PLANS = ("canonical", "deal")  # the points games' plans (the module's docstring)


def card_name(rank: int) -> str:
  """The face of a card of `rank` (1..13): "A", "2".."10", "J", "Q", "K"."""
  return _RANK_NAMES.get(int(rank), str(int(rank)))


_RANKS = {card_name(rank): rank for rank in range(1, 14)}


def card_rank(name: str) -> int:
  """`card_name`'s inverse; ValueError for a name no card has."""
  if name not in _RANKS:
    raise ValueError(f"no card is named {name!r}")
  return _RANKS[name]


def expert_response(game: str, view: Mapping, plan: str = "canonical") -> tuple[str, str]:
  """The expert's response to one state and the action it names.

  Args:
    game: "numberline", "ezpoints", "points24" or "blackjack".
    view: the environment's `describe(state)` of a running episode.
    plan: the points games' plan, "canonical" or "deal" (the module's docstring).

  Returns:
    (response text in the reference JSON, action string).

  Raises:
    ValueError: an unknown game or plan, or a view of a finished episode (NumberLine at
      its target, a bust Blackjack hand).
  """
  if plan not in PLANS:
    raise ValueError(f"unknown expert plan {plan!r}; the plans are {', '.join(PLANS)}")
  if game == "numberline":
    fields = _numberline(view)
  elif game in _OPERATORS:
    fields = _points(view, _OPERATORS[game], plan)
  elif game == "blackjack":
    fields = _blackjack(view)
  else:
    raise ValueError(f"unknown card game {game!r}; the games are {', '.join(GAMES)}")
  fields = {key: fields[key] for key in RESPONSE_KEYS[game]}
  return format_response(fields), fields["action"]


# ------------------------------------------------------------------------------- NumberLine


def _numberline(view: Mapping) -> dict:
  current, target = int(view["current"]), int(view["target"])
  if current == target:
    raise ValueError(f"the current number is the target ({target}): the episode is over")
  if current < target:
    thoughts, action = f"{current} is less than {target}, so I should increase it: +", "+"
  else:
    thoughts, action = f"{current} is greater than {target}, so I should decrease it: -", "-"
  return {"current number": str(current), "target number": str(target),
          "thoughts": thoughts, "action": action}


# ------------------------------------------------------------------------ EZPoints, Points24


def _points(view: Mapping, operators: str, plan: str) -> dict:
  values = [int(v) for v in view["values"]]
  target = int(view["target"])
  typed = tuple(str(s) for s in view["formula"])
  thoughts, action = _next_symbol(values, target, operators, typed, plan)
  return {"cards": values, "current formula": "".join(typed), "thoughts": thoughts,
          "action": action}


def _next_symbol(values: list[int], target: int, operators: str,
                 typed: tuple[str, ...], plan: str) -> tuple[str, str]:
  """(thoughts, next symbol) for the formula typed so far (the policy in the docstring)."""
  if is_solution(typed, values, target):
    return f"Solution: {''.join(typed)}={target}. Complete. Next: =", "="
  solution = planned_solution(values, target, operators, plan)
  if solution is None:
    return f"No formula makes {target}. Next: =", "="
  if solution[:len(typed)] != typed:
    solution = next((s for s in _solutions(tuple(sorted(values)), target, operators)
                     if s[:len(typed)] == typed), None)
    if solution is None:
      return f"No solution starts with {''.join(typed)}. Next: =", "="
  symbol = solution[len(typed)]
  return f"Solution: {''.join(solution)}={target}. Next: {symbol}", symbol


def planned_solution(values: Sequence[int], target: int, operators: str,
                     plan: str = "canonical") -> tuple[str, ...] | None:
  """The formula the expert plans for a deal from its start (the docstring's `plan`), or
  None where no formula makes the target."""
  if plan == "deal":
    return _solve(tuple(int(v) for v in values), target, operators)
  solutions = _solutions(tuple(sorted(int(v) for v in values)), target, operators)
  return solutions[0] if solutions else None


@functools.lru_cache(maxsize=4096)
def _solve(values: tuple[int, ...], target: int, operators: str) -> tuple[str, ...] | None:
  """`arith.solve`, memoised: an episode asks for the same deal's solution at every step."""
  solution = arith.solve(values, target, operators)
  return None if solution is None else tuple(solution)


def is_solution(symbols: Sequence[str], values: Sequence[int], target: int) -> bool:
  """Whether the formula uses each value exactly once and equals the target."""
  numbers = sorted(int(s) for s in symbols if s.isdigit())
  return numbers == sorted(values) and arith.evaluate_symbols(symbols) == target


def _render(op: str, left: tuple[str, ...], left_prec: int, right: tuple[str, ...],
            right_prec: int) -> tuple[str, ...]:
  """left op right, parenthesising an operand only where precedence needs it.

  a - (b + c) and a / (b * c) keep theirs; a + (b - c) = a + b - c and
  a * (b / c) = a * b / c drop them.
  """
  prec = _PRECEDENCE[op]
  if left_prec < prec:
    left = ("(", *left, ")")
  if right_prec < prec or (right_prec == prec and op in "-/"):
    right = ("(", *right, ")")
  return (*left, op, *right)


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
  return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b


def _ordered_splits(values: tuple[int, ...]):
  """Distinct (left, right) splits of a sorted multiset into non-empty sorted parts."""
  seen = set()
  for r in range(1, len(values)):
    for idx in itertools.combinations(range(len(values)), r):
      split = (tuple(values[i] for i in idx),
               tuple(v for i, v in enumerate(values) if i not in idx))
      if split not in seen:
        seen.add(split)
        yield split


def _combinations(values: tuple[int, ...], operators: str):
  """(symbols, value, precedence) of every formula over the sorted multiset `values`."""
  if len(values) == 1:
    yield (str(values[0]),), Fraction(values[0]), _ATOM
    return
  for left, right in _ordered_splits(values):
    for (ls, lv, lp), (rs, rv, rp) in itertools.product(_expressions(left, operators),
                                                        _expressions(right, operators)):
      for op in operators:
        if not (op == "/" and rv == 0):
          yield _render(op, ls, lp, rs, rp), _apply(op, lv, rv), _PRECEDENCE[op]


@functools.lru_cache(maxsize=1024)
def _expressions(values: tuple[int, ...], operators: str) -> tuple:
  """`_combinations` without repeated symbol strings, for the sub-multisets (memoised)."""
  return tuple({symbols: (symbols, value, prec)
                for symbols, value, prec in _combinations(values, operators)}.values())


@functools.lru_cache(maxsize=None)
def _solutions(values: tuple[int, ...], target: int, operators: str) -> tuple[tuple[str, ...], ...]:
  """Every formula over the sorted `values` equal to `target`, in the canonical order."""
  found = {symbols for symbols, value, _ in _combinations(values, operators) if value == target}
  return tuple(sorted(found, key=lambda s: (len(s), s.count("/"), s)))


# -------------------------------------------------------------------------------- Blackjack


def basic_strategy(total: int, soft: bool, dealer_value: int) -> tuple[str, str]:
  """("stand" or "hit", the rule applied) for a player total against the dealer's up-card.

  Args:
    total: the player's best total (4..21).
    soft: whether an ace counts 11 in it.
    dealer_value: the up-card's value, 2..11 (an ace is 11).
  """
  strong = 2 <= dealer_value <= 6
  if soft:
    if total <= 17:
      return "hit", "Soft 17 or less"
    if total == 18:
      return ("stand", "Soft 18 vs 2-8") if dealer_value <= 8 else ("hit", "Soft 18 vs 9 to A")
    return "stand", "Soft 19 or more"
  if total <= 11:
    return "hit", "Hard 11 or less"
  if total == 12:
    return (("stand", "Hard 12 vs 4-6") if 4 <= dealer_value <= 6 else
            ("hit", "Hard 12 vs 2, 3 or 7 to A"))
  if total <= 16:
    return ("stand", "Hard 13-16 vs 2-6") if strong else ("hit", "Hard 13-16 vs 7 to A")
  return "stand", "Hard 17 or more"


def hand_state(ranks: Sequence[int], up: int) -> tuple[int, bool, int]:
  """What basic strategy decides on: (the player's best total, whether an ace counts 11 in
  it, the dealer's up-card value 2..11) for the player's card ranks and the up-card's."""
  hard = sum(min(rank, 10) for rank in ranks)
  soft = 1 in ranks and hard + 10 <= 21
  return (hard + 10 if soft else hard), soft, (11 if up == 1 else min(up, 10))


def _blackjack(view: Mapping) -> dict:
  ranks = [int(rank) for rank, _ in view["player"]]
  up = int(view["dealer"][0][0])
  total, soft, dealer_value = hand_state(ranks, up)
  if total > 21:
    raise ValueError(f"the player's hand {ranks} is bust ({total}): the episode is over")
  action, rule = basic_strategy(total, soft, dealer_value)
  hand = ", ".join(card_name(rank) for rank in ranks)
  thoughts = (f"I have {hand}: {'soft' if soft else 'hard'} {total}. "
              f"Dealer has {card_name(up)}: {dealer_value}. {rule}: {action}")
  return {"thoughts": thoughts, "action": action}
