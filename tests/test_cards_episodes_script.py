"""experiments.cards_episodes: how a whole Points24 episode of the warm start is labelled."""

import json

from experiments import cards_episodes as episodes_lib

VIEW = {"values": [4, 8, 10, 5], "formula": [], "target": 24}


def _step(thoughts: str, action: str, formula=(), read=None) -> dict:
  """A step on formula `formula`; the response restates it as `read` (default: right)."""
  read = "".join(formula) if read is None else read
  response = json.dumps({"cards": [4, 8, 10, 5], "current formula": read,
                         "thoughts": thoughts, "action": action})
  return {"view": dict(VIEW, formula=list(formula)), "response": response, "action": action}


RIGHT = "Solution: (4+8)*10/5=24. Next: "
WRONG = "Solution: (4+8)*10-5=24. Next: "


def _episode(steps, won=False):
  return {"steps": steps, "won": won, "finished": True}


def test_outcomes_follow_the_first_plan_through_the_episode():
  label = lambda e: episodes_lib.outcome("points24", e)
  first = _step(RIGHT + "(", "(")
  assert label(_episode([first, _step(RIGHT + "4", "4", "(")], True)) == "won"
  assert label(_episode([first, _step(RIGHT + "+", "+", "(", read="(4")])) == (
      "formula misread")
  assert label(_episode([first, _step(WRONG + "4", "4", "(")])) == "plan changed"
  assert label(_episode([first, _step(RIGHT + "8", "8", "(")])) == "next symbol wrong"
  assert label(_episode([first, _step(RIGHT + "4", "8", "(")])) == "action off the plan"
  assert label(_episode([first, _step(RIGHT + "4", "4", "(")])) == "other"
  assert label(_episode([_step(WRONG + "(", "(")])) is None  # first plan does not solve it
  assert label(_episode([_step("no plan", "(")])) is None


def test_plan_next_is_the_symbol_after_the_typed_prefix_or_equals():
  plan = ["(", "4", "+", "8", ")", "*", "10", "/", "5"]
  assert episodes_lib.plan_next(plan, []) == "("
  assert episodes_lib.plan_next(plan, ["(", "4"]) == "+"
  assert episodes_lib.plan_next(plan, plan) == "="
  assert episodes_lib.plan_next(plan, ["(", "8"]) is None


def test_summary_counts_each_outcome_once_per_episode():
  eps = [_episode([_step(RIGHT + "(", "(")], True),
         _episode([_step(RIGHT + "(", ")"), _step(RIGHT + "4", "4", "("),
                   _step(RIGHT + "+", "+", "(4", read="(4+")]),
         _episode([_step(WRONG + "(", "(")]),
         {"steps": [_step(RIGHT + "(", "(")], "won": False, "finished": False}]
  summary = episodes_lib.summarize("points24", eps)
  assert summary == {"episodes": 4, "finished": 3, "won": 1, "first_plan_solves": 3,
                     "outcomes": {"won": 1, "formula misread": 0, "plan changed": 0,
                                  "next symbol wrong": 0, "action off the plan": 1,
                                  "other": 1},
                     "mean_steps": 1.5, "formula_read": 0.5}
