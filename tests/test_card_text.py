"""The card games' text side: reference prompts, the action parser, the action-token span,
and the expert chain-of-thought responses (latent_mca.cards.prompts / parser / experts).

Expectations are written out by hand (prompt fragments, parses of malformed outputs,
token pieces, basic-strategy cells); the experts are followed through the games with a
small simulation of each game and checked with this file's own Fraction evaluation and
its own blackjack dynamic program.
"""

from __future__ import annotations

import ast
import itertools
import json
import operator
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest

from latent_mca.cards import arith
from latent_mca.cards import experts as E
from latent_mca.cards import parser as R
from latent_mca.cards import prompts as P
from latent_mca.data import tokenizers as T

NL = ("-", "+")
EZ = tuple(str(n) for n in range(1, 11)) + ("+", "*", "=")
P24 = tuple(str(n) for n in range(1, 11)) + ("+", "-", "*", "/", "(", ")", "=")
BJ = ("stand", "hit")
ACTIONS = {"numberline": NL, "ezpoints": EZ, "points24": P24, "blackjack": BJ}
EOS = "<|im_end|>"

# --- prompts -----------------------------------------------------------------------------


def test_prompts_are_the_reference_text():
  assert set(P.PROMPTS) == set(P.ACTION_ONLY_PROMPTS) == set(ACTIONS)
  nl = P.prompt("numberline")
  assert nl.startswith("You are playing a game called number line. You will see a target "
                       "number and a current number in the image. And your goal")
  assert nl.endswith('"current number": "x", \n"target number": "x", \n"thoughts": "{first '
                     'read out the current and target number, then think carefully about which '
                     'action to choose}", \n"action": "-" or "+" \n}')
  assert P.prompt("blackjack") == (
      "You are a blackjack player. You are observing the current game state, you can choose "
      "between ['stand', 'hit']. Your response should be a valid json file in the following "
      "format: \n{\n \"thoughts\": \"{first describe your total points and the dealer's total "
      "points then think about which action to choose}\", \n\"action\": \"stand\" or \"hit\" \n}")
  ez, p24 = P.prompt("ezpoints"), P.prompt("points24")
  assert "You are observing two cards in the image. You are observing the current formula: . " in ez
  assert "'10', '+', '*', '=']" in ez and "evaluates to 12," in ez
  assert "You are observing thee four cards" in p24 and "evaluates to 24," in p24
  assert "'+', '-', '*', '/', '(', ')', '=']" in p24
  for text in (ez, p24):  # the reference's backslashed braces and unquoted placeholders
    assert "format: \\{\n" in text and text.endswith('"action": "{number}" or "{operator}" \n \\}')
    assert '"current formula": , \n' in text
  assert ' "cards": [x, y], \n' in ez and ' "cards": [x, y, z, w], \n' in p24


@pytest.mark.parametrize("game", sorted(ACTIONS))
def test_prompt_asks_for_the_json_keys_in_order(game):
  text = P.prompt(game)
  positions = [text.index(f'"{key}"') for key in P.RESPONSE_KEYS[game]]
  assert positions == sorted(positions) and P.RESPONSE_KEYS[game][-1] == "action"
  short = P.prompt(game, action_only=True)
  assert '"thoughts"' not in short and '"action"' in short and len(short) < len(text)


def test_unknown_game_names_the_games():
  with pytest.raises(KeyError, match="numberline, ezpoints, points24, blackjack"):
    P.prompt("poker")
  with pytest.raises(ValueError, match="unknown card game 'Points24'"):
    E.expert_response("Points24", {})


def test_format_response():
  text = P.format_response({"cards": [2, 10], "current formula": "2*", "thoughts": "ok é",
                            "action": "6"})
  assert text == '{"cards": [2, 10], "current formula": "2*", "thoughts": "ok é", "action": "6"}'
  assert json.loads(text)["action"] == "6"
  with pytest.raises(ValueError, match="last key"):
    P.format_response({"action": "+", "thoughts": "x"})
  with pytest.raises(ValueError, match="last key"):
    P.format_response({"thoughts": "x"})
  with pytest.raises(ValueError, match="string"):
    P.format_response({"action": 3})


# --- parser ------------------------------------------------------------------------------

PARSES = [
    # (text, actions, expected index)
    ('{"thoughts": "go up", "action": "+"}', NL, 1),
    ('{"thoughts": "go down", "action": "-"}', NL, 0),
    ('{"current number": "3", "action": "+-"}', NL, -1),  # both
    ('{"thoughts": "I pick +"}', NL, -1),  # no key: only the last character ("}") is read
    ("I pick +", NL, 1),  # ... which is the reference's quirk: a bare trailing action parses
    ("hit", BJ, -1),  # ... but only one character of it
    ('{"action" : "+"}', NL, -1),  # a space before the colon is not the key
    ('{"thoughts": "x", "action": ""}', NL, -1),  # empty action
    ('{"thoughts": "x", "action": "stand or hit"}', BJ, -1),  # two legal actions
    ('{"thoughts": "x", "action": "stand, stand!"}', BJ, 0),  # one action, twice
    ('{"thoughts": "x", "action": "double"}', BJ, -1),  # illegal
    ('{"thoughts": "x", "action": "*"}', NL, -1),  # illegal here
    ('{"thoughts": "x", "action": "11"}', P24, 0),  # contains "1" only: parses as 1
    ("asdf qwer zxcv", P24, -1),  # garbage
    ("", NL, -1),
    ('{"ACTION": "HIT"}', BJ, 1),  # lowercased first
    ('{"thoughts": "İİİ 🙂 思考", "action": "+"}', NL, 1),  # unicode before the key
    ('{"thoughts": "x", "action": "＋"}', NL, -1),  # a full-width plus is not "+"
    ('{"thoughts": "say \\"action\\": \\"-\\"", "action": "+"}', NL, 1),  # escaped quotes
    ('{"thoughts": "the "action": "-" is wrong", "action": "+"}', NL, -1),  # first key counts
    ('{"action": "10"}', P24, 9),  # "10" is 10, not also 1
    ('{"action": "10"}', EZ, 9),
    ('{"action": "1"}', P24, 0),
    ('{"action": "1 or 10"}', P24, -1),
    ('{"action": "100"}', P24, 9),  # "10" removed, "0" is no action
    ('{"action": "110"}', P24, -1),  # "10" and "1"
    ('{"action": "(10"}', P24, -1),
    ('{"action": "+"} because 1 < 5', NL, 1),  # text after the JSON is read too:
    ('{"action": "+"} because 1 < 5', P24, -1),  # "+", "1", "5"
    ('{"action": "stand"} I won\'t hit', BJ, -1),
    ('{"thoughts": "7-4=3", "action": "="}\n\nDone.', EZ, 12),
]


@pytest.mark.parametrize("text, actions, expected", PARSES)
def test_parse_action(text, actions, expected):
  assert R.parse_action(text, actions) == expected


def test_parse_actions_falls_back_at_random():
  texts = ['{"action": "hit"}', "nothing", None, '{"action": "stand"}', '{"action": "hit stand"}']
  indices, fallback = R.parse_actions(texts, BJ, np.random.default_rng(0))
  assert indices.dtype == np.int32 and fallback.dtype == bool and indices.shape == (5,)
  assert fallback.tolist() == [False, True, True, False, True]
  assert indices[0] == 1 and indices[3] == 0 and set(indices.tolist()) <= {0, 1}
  again, _ = R.parse_actions(texts, BJ, np.random.default_rng(0))
  np.testing.assert_array_equal(indices, again)
  draws = R.parse_actions(["?"] * 400, P24, np.random.default_rng(1))[0]
  assert set(draws.tolist()) == set(range(len(P24)))  # uniform over the legal actions
  with pytest.raises(ValueError, match="distinct"):
    R.parse_actions(texts, ("hit", "hit"), np.random.default_rng(0))


def test_action_start():
  assert R.action_start('{"a": 1, "action": "+"}') == len('{"a": 1, "action":')
  assert R.action_start('İİ"Action":x') == len('İİ"Action":')  # "İ".lower() has 2 chars
  assert R.action_start('{"thoughts": "+"}') is None


# --- action tokens -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  return T.load_qwen_tokenizer(cache_dir=str(tmp_path_factory.mktemp("qwen")))


def expert_corpus():
  """Expert responses from every game (a fixed sample of views)."""
  texts = [E.expert_response("numberline", {"target": t, "current": c})[0]
           for t, c in itertools.permutations(range(6), 2)]
  rng = np.random.default_rng(0)
  for _ in range(40):
    values = [int(v) for v in rng.integers(1, 11, 4)]
    texts.append(E.expert_response("points24", {"values": values, "target": 24,
                                                "formula": []})[0])
    player = [(int(r), 0) for r in rng.integers(1, 14, 2)]
    texts.append(E.expert_response("blackjack", {"dealer": [(int(rng.integers(1, 14)), 1)],
                                                 "player": player})[0])
  texts += [E.expert_response("ezpoints", {"values": [a, b], "target": 12, "formula": []})[0]
            for a, b in [(2, 6), (3, 4), (10, 2), (6, 6), (5, 7), (1, 10)]]
  return texts


@pytest.fixture(scope="module")
def bpe():
  return T.train_bpe_tokenizer(expert_corpus() * 3, vocab_size=400)


def pieces(tok, ids, mask):
  return [tok.decode([i]) for i, m in zip(ids, mask) if m]


def check_split(tok, text):
  """Masks for `text` + EOS: the action tokens are a suffix that decodes to the text after
  the key (from the start of the token holding its first character) and the EOS."""
  ids = tok.encode(text + EOS)
  thought, action = R.action_token_mask(tok, ids)
  assert thought.shape == action.shape == (len(ids),) and np.all(thought ^ action)
  first = int(np.argmax(action))
  assert action[first:].all() and action[-1] and not action[:first].any()
  start = R.action_start(text)
  head = tok.decode(ids[:first])
  assert len(head) <= start and text.startswith(head)
  assert len(tok.decode(ids[:first + 1])) > start  # the first action token reaches the value
  assert tok.decode(ids[first:]) == text[len(head):] + EOS
  return ids, thought, action


@pytest.mark.parametrize("name", ["bpe", "qwen"])
def test_action_tokens_are_exactly_the_action_part(name, request):
  tok = request.getfixturevalue(name)
  for text in expert_corpus():
    ids, thought, action = check_split(tok, text)
    # json.dumps writes '": "' and both tokenizers split at the space: the span is exact.
    assert tok.decode(ids[:int(np.argmax(action))]) == text[:R.action_start(text)]
    assert tok.decode([i for i, a in zip(ids, action) if a]) == text[R.action_start(text):] + EOS


def test_action_tokens_hand_checked(qwen):
  ids = qwen.encode('{"thoughts": "1 < 5", "action": "+"}' + EOS)
  thought, action = R.action_token_mask(qwen, ids)
  assert pieces(qwen, ids, action) == [' "+"', "}", EOS]
  assert pieces(qwen, ids, thought) == ['{"', "thought", "s", '":', ' "', "1", " <", " ", "5",
                                        '",', ' "', "action", '":']
  # No space after the colon: Qwen's '":"' token holds the colon and the value's quote.
  ids = qwen.encode('{"action":"10"}')
  thought, action = R.action_token_mask(qwen, ids)
  assert pieces(qwen, ids, action) == ['":"', "1", "0", '"}']
  assert pieces(qwen, ids, thought) == ['{"', "action"]


@pytest.mark.parametrize("name", ["bpe", "qwen"])
def test_action_tokens_with_split_characters(name, request):
  """Byte-level BPE splits characters it has no merges for into byte tokens."""
  tok = request.getfixturevalue(name)
  for text in ['{"thoughts": "🙂é漢🙂", "action": "漢🙂"}', '{"thoughts": "x", "action":"🙂"}',
               '{"thoughts": "İ€", "action": "stand"} ✓✓']:
    check_split(tok, text)
  # The first action token can be a character's first byte (its prefix decode ends in
  # U+FFFD), and the thoughts' split characters stay thought.
  ids = tok.encode('{"thoughts": "🙂", "action":🙂}')
  thought, action = R.action_token_mask(tok, ids)
  assert tok.decode([i for i, t in zip(ids, thought) if t]) == '{"thoughts": "🙂", "action":'
  assert tok.decode([i for i, a in zip(ids, action) if a]) == "🙂}"
  if name == "bpe":  # no merges for the emoji: each of its four bytes is a token
    assert pieces(tok, ids, action) == ["\ufffd"] * 4 + ["}"]
    assert pieces(tok, ids, thought)[4:8] == ["\ufffd"] * 4


def test_action_tokens_without_key_or_tokens(bpe):
  ids = bpe.encode('{"thoughts": "I would hit", "act": "hit"}' + EOS)
  thought, action = R.action_token_mask(bpe, ids)
  assert thought.all() and not action.any()
  thought, action = R.action_token_mask(bpe, [])
  assert thought.shape == action.shape == (0,)


def test_action_token_masks_batch(bpe):
  texts = [E.expert_response("numberline", {"target": 5, "current": 1})[0] + EOS,
           '{"thoughts": "no key"}', E.expert_response("blackjack", {
               "dealer": [(1, 0)], "player": [(10, 0), (6, 1)]})[0]]
  rows = [bpe.encode(t) for t in texts]
  width = max(map(len, rows)) + 3
  pad = bpe.convert_tokens_to_ids("<|endoftext|>")
  ids = np.full((3, width), pad, np.int32)
  mask = np.zeros((3, width), bool)
  for r, row in enumerate(rows):  # right, left and middle padding
    offset = [0, width - len(row), 1][r]
    ids[r, offset:offset + len(row)], mask[r, offset:offset + len(row)] = row, True
  thought, action = R.action_token_masks(bpe, ids, mask.astype(np.int32))
  assert thought.shape == action.shape == (3, width) and thought.dtype == bool
  assert not (thought | action)[~mask].any() and ((thought ^ action) == mask).all()
  for r, row in enumerate(rows):
    want_thought, want_action = R.action_token_mask(bpe, row)
    np.testing.assert_array_equal(thought[r][mask[r]], want_thought)
    np.testing.assert_array_equal(action[r][mask[r]], want_action)
  assert not action[1].any() and action[0].any() and action[2].any()
  with pytest.raises(ValueError, match=r"\[N, M\]"):
    R.action_token_masks(bpe, ids[0], mask[0])


# --- experts -----------------------------------------------------------------------------


def respond(game, view):
  """The expert's (fields, action), after checking its text is the JSON and parses back."""
  text, action = E.expert_response(game, view)
  fields = json.loads(text)
  assert tuple(fields) == P.RESPONSE_KEYS[game] and fields["action"] == action
  assert R.parse_action(text, ACTIONS[game]) == ACTIONS[game].index(action)
  assert E.expert_response(game, view) == (text, action)  # deterministic
  return fields, action


def test_numberline_expert_is_optimal():
  fields, action = respond("numberline", {"target": 5, "current": 1})
  assert fields == {"current number": "1", "target number": "5",
                    "thoughts": "1 is less than 5, so I should increase it: +", "action": "+"}
  assert respond("numberline", {"target": 0, "current": 3})[0]["thoughts"] == (
      "3 is greater than 0, so I should decrease it: -")
  for target, start in itertools.permutations(range(6), 2):
    current, steps = start, 0
    while current != target and steps < 10:
      fields, action = respond("numberline", {"target": target, "current": current})
      assert (fields["current number"], fields["target number"]) == (str(current), str(target))
      current, steps = min(max(current + (1 if action == "+" else -1), 0), 5), steps + 1
    assert current == target and steps == abs(target - start)
  with pytest.raises(ValueError, match="over"):
    E.expert_response("numberline", {"target": 2, "current": 2})


def fraction_value(symbols):
  """This file's own evaluation: Python's parser, exact arithmetic over its tree.

  Symbols are joined with spaces, so two numbers in a row are a syntax error, not a
  longer number.
  """
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
         ast.Div: operator.truediv}

  def value(node):
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
      return ops[type(node.op)](value(node.left), value(node.right))
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return Fraction(node.value)
    raise ValueError(f"not a card formula: {ast.dump(node)}")

  return value(ast.parse(" ".join(symbols), mode="eval").body)


def play_points(game, values, formula=(), limit=20):
  """Follows the expert from `formula` until it says "="; returns the formula and steps."""
  target = {"ezpoints": 12, "points24": 24}[game]
  formula, seen = list(formula), []
  for _ in range(limit + 1):
    fields, action = respond(game, {"cards": [(v, 0) for v in values], "values": values,
                                    "formula": list(formula), "target": target})
    assert fields["cards"] == values and fields["current formula"] == "".join(formula)
    seen.append(fields["thoughts"])
    if action == "=":
      return formula, seen
    formula.append(action)
  raise AssertionError(f"no '=' within {limit} symbols: {formula}")


def solves(formula, values, target):
  used = sorted(int(s) for s in formula if s.isdigit())
  return used == sorted(values) and fraction_value(formula) == target


def test_ezpoints_expert_solves_every_deal():
  values = sorted({min(r, 10) for r in range(1, 14)})
  deals = [[a, b] for a, b in itertools.product(values, values) if a + b == 12 or a * b == 12]
  assert {(a, b) for a, b in deals if a <= b} == {(2, 6), (2, 10), (3, 4), (3, 9), (4, 8),
                                                   (5, 7), (6, 6)}
  for deal in deals:
    formula, thoughts = play_points("ezpoints", deal, limit=5)
    assert solves(formula, deal, 12) and len(formula) == 3 and set(formula[1]) <= {"+", "*"}
    assert thoughts[0] == f"Solution: {''.join(formula)}=12. Next: {formula[0]}"
    assert thoughts[-1] == f"Solution: {''.join(formula)}=12. Complete. Next: ="
  fields, action = respond("ezpoints", {"cards": [(2, 0), (6, 1)], "values": [2, 6],
                                        "formula": ["2", "*"], "target": 12})
  assert fields == {"cards": [2, 6], "current formula": "2*",
                    "thoughts": "Solution: 2*6=12. Next: 6", "action": "6"}


def test_points24_expert_solves_random_deals():
  rng = np.random.default_rng(0)
  solved = unsolvable = 0
  for _ in range(150):
    deal = [min(int(r), 10) for r in rng.integers(1, 14, 4)]
    formula, thoughts = play_points("points24", deal)
    if arith.solve(deal, 24) is None:
      unsolvable += 1
      assert formula == [] and thoughts == ["No formula makes 24. Next: ="]
    else:
      solved += 1
      assert solves(formula, deal, 24) and len(formula) <= 20
      assert thoughts[-1] == f"Solution: {''.join(formula)}=24. Complete. Next: ="
  assert solved > 100 and unsolvable > 5


def test_points_expert_off_its_solution():
  # A policy typed another order: the expert continues a solution that starts that way.
  fields, action = respond("points24", {"cards": [], "values": [1, 5, 7, 10],
                                        "formula": ["7"], "target": 24})
  assert fields["thoughts"] == "Solution: 7*5-1-10=24. Next: *" and action == "*"
  formula, _ = play_points("points24", [1, 5, 7, 10], ["7"])
  assert formula == ["7", "*", "5", "-", "1", "-", "10"]
  formula, _ = play_points("ezpoints", [2, 6], ["6"])
  assert formula == ["6", "*", "2"]
  # Nothing starts that way: end the episode.
  fields, action = respond("points24", {"cards": [], "values": [3, 3, 8, 8],
                                        "formula": ["3", "+"], "target": 24})
  assert fields["thoughts"] == "No solution starts with 3+. Next: =" and action == "="
  # A complete formula the expert would not write (redundant parentheses) is complete.
  typed = ["(", "4", "*", "6", ")", "*", "1", "*", "1"]
  fields, action = respond("points24", {"cards": [], "values": [1, 4, 1, 6], "formula": typed,
                                        "target": 24})
  assert fields["thoughts"] == "Solution: (4*6)*1*1=24. Complete. Next: =" and action == "="
  fields, action = respond("points24", {"cards": [], "values": [3, 3, 8, 8], "formula": [],
                                        "target": 24})
  assert fields["thoughts"] == "Solution: 8/(3-8/3)=24. Next: 8"


def test_the_canonical_plan_is_one_formula_per_multiset_and_deal_plans_by_card_order():
  rng = np.random.default_rng(1)
  for _ in range(40):
    deal = [min(int(r), 10) for r in rng.integers(1, 14, 4)]
    if arith.solve(deal, 24) is None:
      continue
    plans = {respond("points24", {"values": list(order), "target": 24, "formula": []})[0][
        "thoughts"] for order in itertools.permutations(deal)}
    assert len(plans) == 1  # the same thoughts for every order of the cards
    (plan,) = plans
    canonical = E.planned_solution(deal, 24, "+-*/")
    assert plan == f"Solution: {''.join(canonical)}=24. Next: {canonical[0]}"
    assert solves(canonical, deal, 24)
    # no solution has fewer symbols (the canonical order's first key)
    assert len(canonical) <= len(arith.solve(deal, 24))
    # "deal" plans arith.solve on the cards in their order
    text, _ = E.expert_response("points24", {"values": deal, "target": 24, "formula": []}, "deal")
    assert json.loads(text)["thoughts"].startswith(
        f"Solution: {''.join(arith.solve(deal, 24))}=24.")
  # the orders of one multiset that "deal" plans differently, "canonical" alike
  orders = list(itertools.permutations([1, 5, 7, 10]))
  assert len({tuple(arith.solve(list(order), 24)) for order in orders}) > 1
  assert E.planned_solution([10, 7, 5, 1], 24, "+-*/") == E.planned_solution([1, 5, 7, 10], 24,
                                                                             "+-*/")
  assert E.planned_solution([1, 1, 1, 1], 24, "+-*/") is None
  with pytest.raises(ValueError, match="unknown expert plan 'best'.*canonical, deal"):
    E.expert_response("points24", {"values": [1, 5, 7, 10], "target": 24, "formula": []}, "best")


BASIC_STRATEGY = [
    # (player ranks, dealer up-card rank, action, thoughts)
    ([10, 6], 10, "hit", "I have 10, 6: hard 16. Dealer has 10: 10. Hard 13-16 vs 7 to A: hit"),
    ([13, 6], 12, "hit", "I have K, 6: hard 16. Dealer has Q: 10. Hard 13-16 vs 7 to A: hit"),
    ([10, 2], 4, "stand", "I have 10, 2: hard 12. Dealer has 4: 4. Hard 12 vs 4-6: stand"),
    ([10, 2], 3, "hit", "I have 10, 2: hard 12. Dealer has 3: 3. Hard 12 vs 2, 3 or 7 to A: hit"),
    ([1, 7], 9, "hit", "I have A, 7: soft 18. Dealer has 9: 9. Soft 18 vs 9 to A: hit"),
    ([1, 7], 1, "hit", "I have A, 7: soft 18. Dealer has A: 11. Soft 18 vs 9 to A: hit"),
    ([1, 7], 8, "stand", "I have A, 7: soft 18. Dealer has 8: 8. Soft 18 vs 2-8: stand"),
    ([1, 2, 5], 5, "stand", "I have A, 2, 5: soft 18. Dealer has 5: 5. Soft 18 vs 2-8: stand"),
    ([1, 6], 6, "hit", "I have A, 6: soft 17. Dealer has 6: 6. Soft 17 or less: hit"),
    ([1, 1], 6, "hit", "I have A, A: soft 12. Dealer has 6: 6. Soft 17 or less: hit"),
    ([1, 8], 10, "stand", "I have A, 8: soft 19. Dealer has 10: 10. Soft 19 or more: stand"),
    ([9, 4], 2, "stand", "I have 9, 4: hard 13. Dealer has 2: 2. Hard 13-16 vs 2-6: stand"),
    ([1, 5, 11], 7, "hit", "I have A, 5, J: hard 16. Dealer has 7: 7. Hard 13-16 vs 7 to A: hit"),
    ([1, 6, 10], 1, "stand", "I have A, 6, 10: hard 17. Dealer has A: 11. Hard 17 or more: stand"),
    ([5, 6], 1, "hit", "I have 5, 6: hard 11. Dealer has A: 11. Hard 11 or less: hit"),
    ([1, 13], 1, "stand", "I have A, K: soft 21. Dealer has A: 11. Soft 19 or more: stand"),
]


@pytest.mark.parametrize("player, up, action, thoughts", BASIC_STRATEGY)
def test_blackjack_expert_hands(player, up, action, thoughts):
  view = {"dealer": [(up, 2)], "player": [(r, i % 4) for i, r in enumerate(player)],
          "player_sum": 0, "dealer_value": 0}  # the expert reads the cards, not these
  assert respond("blackjack", view)[0] == {"thoughts": thoughts, "action": action}


def test_blackjack_bust_hand_is_an_error():
  with pytest.raises(ValueError, match="bust"):
    E.expert_response("blackjack", {"dealer": [(5, 0)], "player": [(10, 0), (9, 0), (5, 0)]})


# The game's infinite deck: A, 2..9 with 1/13 each, ten-valued 4/13; dealer stands on 17,
# soft 17 included, and draws its hole card after the player stands (no peek).
CARD_PROBS = {**{v: 1 / 13 for v in range(1, 10)}, 10: 4 / 13}


def best_total(hard, ace):
  return hard + 10 if ace and hard + 10 <= 21 else hard


@lru_cache(maxsize=None)
def dealer_finals(hard, ace):
  total = best_total(hard, ace)
  if total >= 17:
    return {min(total, 22): 1.0}  # 22: bust
  out = {}
  for card, p in CARD_PROBS.items():
    for final, q in dealer_finals(hard + card, ace or card == 1).items():
      out[final] = out.get(final, 0.0) + p * q
  return out


@lru_cache(maxsize=None)
def hand_values(hard, ace, up):
  """(value of standing, value of hitting then playing on optimally)."""
  total = best_total(hard, ace)
  stand = sum(q * (1 if final == 22 or total > final else -1 if total < final else 0)
              for final, q in dealer_finals(up, up == 1).items())
  hit = 0.0
  for card, p in CARD_PROBS.items():
    nxt_hard, nxt_ace = hard + card, ace or card == 1
    hit += p * (-1.0 if best_total(nxt_hard, nxt_ace) > 21 else max(hand_values(nxt_hard,
                                                                                 nxt_ace, up)))
  return stand, hit


def test_basic_strategy_is_optimal_for_the_infinite_deck():
  for up in range(1, 11):
    for hard, ace in [(h, False) for h in range(4, 22)] + [(h, True) for h in range(2, 12)]:
      total, soft = best_total(hard, ace), ace and hard + 10 <= 21
      stand, hit = hand_values(hard, ace, up)
      action, _ = E.basic_strategy(total, soft, 11 if up == 1 else up)
      assert action == ("hit" if hit > stand else "stand"), (total, soft, up, stand, hit)


def test_expert_responses_are_short(qwen):
  """A tiny policy decodes at most ~64-96 tokens a step: the longest expert texts fit."""
  texts = expert_corpus()
  for hand in arith.solvable_table(24)[::5]:  # the last step before "=", longest formulas
    solution = arith.solve(list(hand), 24)
    texts.append(E.expert_response("points24", {"values": list(hand), "target": 24,
                                                "formula": solution[:-1]})[0])
  assert max(len(qwen.encode(t + EOS)) for t in texts) <= 72
