"""latent_mca.cards.grounding: what a response restates and whether its plan solves."""

import json

import pytest

from latent_mca.cards import grounding
from latent_mca.cards import experts


def _view(values, target, formula=()):
  return {"values": list(values), "target": target, "formula": list(formula)}


def test_restated_reads_each_game_and_refuses_malformed_text():
  numberline = json.dumps({"current number": "3", "target number": "7", "thoughts": "",
                           "action": "+"})
  assert grounding.restated("numberline", numberline) == (3, 7)
  points = json.dumps({"cards": [10, 2, 8, 2], "current formula": "", "thoughts": "",
                       "action": "8"})
  assert grounding.restated("points24", points) == (2, 2, 8, 10)
  for text in ("not json", json.dumps([1, 2]), json.dumps({"cards": ["x"]}), "{}"):
    assert grounding.restated("points24", text) is None
  assert grounding.restated("numberline", json.dumps({"current number": "3"})) is None


@pytest.mark.parametrize("game,values", [("points24", (8, 2, 10, 10)),
                                         ("points24", (3, 3, 8, 8)),
                                         ("points24", (6, 3, 10, 10)),
                                         ("ezpoints", (2, 6)), ("ezpoints", (10, 2))])
def test_the_experts_plans_solve_their_deals(game, values):
  target = 24 if game == "points24" else 12
  text, _ = experts.expert_response(game, _view(values, target))
  plan = grounding.planned(text)
  assert plan is not None and plan[1] == target
  assert grounding.plan_solves(plan, values, target)
  # the same plan for other cards, or for another target, is no solution
  other = (values[0] % 10 + 1,) + tuple(values[1:])
  assert not grounding.plan_solves(plan, other, target)
  assert not grounding.plan_solves(plan, values, target + 1)


def test_plans_that_do_not_solve():
  def response(thoughts):
    return json.dumps({"cards": [8, 2, 10, 10], "current formula": "", "thoughts": thoughts,
                       "action": "8"})

  cards = (8, 2, 10, 10)
  assert grounding.plan_solves(grounding.planned(response("Solution: 8/2+10+10=24. Next: 8")),
                               cards, 24)
  # a wrong value, a card used twice (another left out), arithmetic that misses the target
  for formula in ("8/2+10+10=25", "8/2+10+8=24", "8*2+10-10=24"):
    plan = grounding.planned(response(f"Solution: {formula}. Next: 8"))
    assert plan is not None and not grounding.plan_solves(plan, cards, 24), formula
  for thoughts in ("no plan here", "Solution: =24", ""):
    assert grounding.planned(response(thoughts)) is None
  assert grounding.planned("not json") is None
  assert not grounding.plan_solves(None, cards, 24)
  assert not grounding.plan_solves(grounding.planned(response("Solution: 8/2+10+10=24")),
                                   None, 24)


def _blackjack_view(player, up):
  return {"player": [(rank, 0) for rank in player], "dealer": [(up, 1), (5, 2)]}


def test_blackjack_restatement_and_actions_against_basic_strategy():
  view = _blackjack_view((1, 13), 12)  # A K (soft 21) against a queen
  text, action = experts.expert_response("blackjack", view)
  assert grounding.restated("blackjack", text) == grounding.truth("blackjack", view) == (
      ("A", "K"), "Q")
  assert grounding.expert_action("blackjack", view) == action == "stand"
  # hard 12: hit against a 10, stand against a 5 (basic strategy)
  hit = _blackjack_view((10, 2), 10)
  assert grounding.expert_action("blackjack", hit) == "hit"
  misread = json.dumps({"thoughts": "I have 10, 2: hard 12. Dealer has 5: 5. Hard 12 vs 4-6: "
                                    "stand", "action": "stand"})
  said = grounding.restated("blackjack", misread)
  assert said == (("10", "2"), "5") != grounding.truth("blackjack", hit)
  assert grounding.read_action("blackjack", said) == "stand"  # right for what it read
  # what the decision rests on: the total, softness and up-card value, not the card names
  assert grounding.decided_on("blackjack", (("A", "6"), "K")) == (17, True, 10)
  assert grounding.decided_on("blackjack", (("A", "6"), "10")) == (17, True, 10)
  assert grounding.decided_on("blackjack", (("J", "7"), "A")) == (17, False, 11)
  assert grounding.decided_on("blackjack", (("A", "A", "K"), "2")) == (12, False, 2)
  assert grounding.decided_on("blackjack", (("X", "7"), "A")) is None
  assert grounding.decided_on("blackjack", None) is None
  # names no card has, a bust hand, no restatement: no action
  assert grounding.read_action("blackjack", (("1", "2"), "5")) is None
  assert grounding.read_action("blackjack", (("K", "Q", "5"), "5")) is None
  assert grounding.read_action("blackjack", None) is None
  for thoughts in ("I have 10, 2.", 7, ""):
    assert grounding.restated("blackjack", json.dumps({"thoughts": thoughts,
                                                       "action": "hit"})) is None


def test_numberline_actions_and_games_without_one_right_action():
  view = {"current": 3, "target": 7}
  assert grounding.expert_action("numberline", view) == "+"
  assert grounding.read_action("numberline", (9, 7)) == "-"
  assert grounding.read_action("numberline", (7, 7)) is None  # at the target: no step
  points = _view((8, 2, 10, 10), 24)
  assert grounding.expert_action("points24", points) is None
  assert grounding.read_action("points24", (2, 8, 10, 10)) is None
  assert grounding.decided_on("numberline", (9, 7)) == (9, 7)
  assert grounding.decided_on("points24", (2, 8, 10, 10)) is None


def test_formula_line_and_next_symbol_of_the_points_games():
  view = _view((2, 9, 6, 3), 24, formula=("6", "*"))
  text, action = experts.expert_response("points24", view)
  assert grounding.formula_line(text) == "6*"
  assert grounding.next_symbol(text) == action
  done = _view((2, 10), 12, formula=("2", "+", "10"))
  text, action = experts.expert_response("ezpoints", done)
  assert grounding.next_symbol(text) == action == "="
  # a formula in progress the frame does not show, a next symbol the action ignores
  made_up = json.dumps({"cards": [5, 5, 5, 7], "current formula": "(5+4",
                        "thoughts": "Solution: (5+5-(7-5)=24. Next: *", "action": "-"})
  assert grounding.formula_line(made_up) == "(5+4"
  assert grounding.next_symbol(made_up) == "*"
  for text in ("not json", json.dumps({"current formula": 3, "thoughts": ["Next: 3"]}),
               json.dumps({"thoughts": "Solution: 2*6=12."})):
    assert grounding.formula_line(text) is None
    assert grounding.next_symbol(text) is None


def test_card_rank_inverts_card_name():
  assert [experts.card_name(rank) for rank in range(1, 14)] == [
      "A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
  assert all(experts.card_rank(experts.card_name(rank)) == rank for rank in range(1, 14))
  for name in ("1", "11", "0", "a", "", "X"):
    with pytest.raises(ValueError, match="no card is named"):
      experts.card_rank(name)
