"""What a card agent's response says about its frame, checked against the state.

The pure half of `experiments/cards_grounding.py`: the response's restatement of the
frame (NumberLine's two numbers, the points games' cards as a multiset of values), the
true state's, and the points games' plan ("Solution: F=T" in the thoughts) checked as a
solution of a deal.
"""

from __future__ import annotations

import json
import re

from latent_mca.cards import experts
from latent_mca.cards.envs import POINTS_GAMES


def restated(game: str, text: str):
  """What the response says the frame shows (a hashable), or None if it does not parse."""
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
  except (KeyError, TypeError, ValueError):
    return None
  return None


_PLAN = re.compile(r"Solution: ([0-9()+\-*/]+)=(\d+)")


def planned(text: str) -> tuple[list[str], int] | None:
  """The (formula symbols, target) of the thoughts' "Solution: F=T", or None."""
  try:
    thoughts = json.loads(text)["thoughts"]
  except (json.JSONDecodeError, TypeError, KeyError):
    return None
  match = _PLAN.search(thoughts) if isinstance(thoughts, str) else None
  if match is None:
    return None
  return re.findall(r"\d+|[()+\-*/]", match.group(1)), int(match.group(2))


def plan_solves(plan, values, target: int) -> bool:
  """Whether a `planned` formula uses each of `values` once and equals `target`."""
  return (plan is not None and values is not None and plan[1] == target
          and experts.is_solution(plan[0], list(values), target))


def truth(game: str, view: dict):
  """`restated`'s form of the true state (`CardEnv.describe`'s view)."""
  if game == "numberline":
    return view["current"], view["target"]
  return tuple(sorted(view["values"]))
