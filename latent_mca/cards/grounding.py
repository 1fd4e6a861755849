"""What a card agent's response says about its frame, checked against the state.

The pure half of `experiments/cards_grounding.py`: the response's restatement of the
frame (NumberLine's two numbers, the points games' cards as a multiset of values,
Blackjack's hand and the dealer's up-card as the thoughts name them), the true state's;
the points games' plan ("Solution: F=T" in the thoughts) checked as a solution of a deal,
their formula line restated and the symbol the thoughts name next; and, where one action
is right (NumberLine, Blackjack), the expert's action for the true state and for the
state the response restated: a wrong action for what was read right is a wrong
decision, a right action for what was misread a reading error made good by chance.
"""

from __future__ import annotations

import json
import re

from latent_mca.cards import experts
from latent_mca.cards.envs import POINTS_GAMES


def restated(game: str, text: str):
  """What the response says the frame shows (a hashable), or None if it does not parse.

  NumberLine: (current, target); the points games: the cards' values, sorted; Blackjack:
  ((the player's cards in order), the dealer's up-card), as card names ("A", "2".."10",
  "J", "Q", "K").
  """
  try:
    fields = json.loads(text)
  except (json.JSONDecodeError, TypeError):
    return None
  if not isinstance(fields, dict):
    return None
  try:
    if game == "numberline":
      return int(fields["current number"]), int(fields["target number"])
    if game in POINTS_GAMES:
      return tuple(sorted(int(v) for v in fields["cards"]))
    if game == "blackjack":
      match = _HAND.match(fields["thoughts"])
      return None if match is None else (tuple(match.group(1).split(", ")), match.group(2))
  except (KeyError, TypeError, ValueError):
    return None
  return None


_HAND = re.compile(r"I have ([^:]+): (?:soft|hard) \d+\. Dealer has ([^:]+):")
_PLAN = re.compile(r"Solution: ([0-9()+\-*/]+)=(\d+)")
_NEXT = re.compile(r"Next: (\S+)$")


def _string_field(text: str, key: str) -> str | None:
  """The response's field `key` if the response is JSON and the field a string, else None."""
  try:
    value = json.loads(text)[key]
  except (json.JSONDecodeError, TypeError, KeyError):
    return None
  return value if isinstance(value, str) else None


def planned(text: str) -> tuple[list[str], int] | None:
  """The (formula symbols, target) of the thoughts' "Solution: F=T", or None."""
  thoughts = _string_field(text, "thoughts")
  match = None if thoughts is None else _PLAN.search(thoughts)
  if match is None:
    return None
  return re.findall(r"\d+|[()+\-*/]", match.group(1)), int(match.group(2))


def formula_line(text: str) -> str | None:
  """The points games' "current formula" a response restates, or None."""
  return _string_field(text, "current formula")


def next_symbol(text: str) -> str | None:
  """The symbol the thoughts name as the next to type ("... Next: S"), or None."""
  thoughts = _string_field(text, "thoughts")
  match = None if thoughts is None else _NEXT.search(thoughts)
  return None if match is None else match.group(1)


def plan_solves(plan, values, target: int) -> bool:
  """Whether a `planned` formula uses each of `values` once and equals `target`."""
  return (plan is not None and values is not None and plan[1] == target
          and experts.is_solution(plan[0], list(values), target))


def truth(game: str, view: dict):
  """`restated`'s form of the true state (`CardEnv.describe`'s view)."""
  if game == "numberline":
    return view["current"], view["target"]
  if game == "blackjack":
    return (tuple(experts.card_name(rank) for rank, _ in view["player"]),
            experts.card_name(view["dealer"][0][0]))
  return tuple(sorted(view["values"]))


# The points games' deals have many plans, so their expert's action is not the only right one.
ONE_RIGHT_ACTION = ("numberline", "blackjack")


def expert_action(game: str, view: dict) -> str | None:
  """The expert's action for a state (`CardEnv.describe`'s view) where it is the only right
  one (NumberLine, Blackjack's basic strategy), else None."""
  return experts.expert_response(game, view)[1] if game in ONE_RIGHT_ACTION else None


def _restated_view(game: str, said) -> dict | None:
  """A `restated` state of a game in ONE_RIGHT_ACTION as `CardEnv.describe`'s view (suits
  0), or None (no restatement, an unknown card name, another game)."""
  if said is None or game not in ONE_RIGHT_ACTION:
    return None
  if game == "numberline":
    return {"current": said[0], "target": said[1]}
  try:
    return {"player": [(experts.card_rank(name), 0) for name in said[0]],
            "dealer": [(experts.card_rank(said[1]), 0)]}
  except ValueError:
    return None


def decided_on(game: str, said):
  """What the expert's action depends on, of a `restated` state: NumberLine's two numbers,
  Blackjack's `experts.hand_state` (a 10 is a king there); None for the points games, an
  unknown card name or no restatement."""
  view = _restated_view(game, said)
  if view is None:
    return None
  if game == "numberline":
    return said
  return experts.hand_state([rank for rank, _ in view["player"]], view["dealer"][0][0])


def read_action(game: str, said) -> str | None:
  """The expert's action for the state a response restated (`restated`'s form), or None
  (no restatement, a state no episode is in, or a game without one right action)."""
  view = _restated_view(game, said)
  try:
    return None if view is None else experts.expert_response(game, view)[1]
  except ValueError:  # NumberLine at its target, a bust hand
    return None
