"""The card games' task prompts and the JSON response they ask for.

The prompts are the task definition, so they are the reference's text, character for
character: RL4VLM `VLM_PPO/a2c_ppo_acktr/rl_utils.py`, `get_prompt(env_name,
action_only, infos)` (lines 5-64), with `infos=None`. That includes its quirks:

- EZPoints and Points24 insert the current formula twice (`You are observing the
  current formula: {formula}.` and `"current formula": {formula},`). The reference
  filled it from `infos[0]["Formula"]`, the formula of environment 0 for every
  environment, and with `infos=None` (the first step) from the empty string. Here the
  text is fixed per game with the empty formula, the reference's first-step prompt;
  the formula typed so far is drawn in the image, which is where the policy reads it.
- The points prompts write `\\{` and `\\}` (a backslash before each brace: the
  reference's non-raw `"\\{"` keeps its backslash), leave the card values and the
  formula unquoted, and Points24 says "thee four cards".
- `action_only=True` gives the reference's prompt without chain of thought (only the
  `"action"` key), its ablation.

Responses are one JSON object whose keys, in order, are `RESPONSE_KEYS[game]`:
beside `"thoughts"` and `"action"` the reference also asks for what is read off the
image, `"current number"` and `"target number"` (NumberLine), `"cards"` and
`"current formula"` (EZPoints, Points24). `"action"` always comes last, since the
parser reads everything after `"action":`. `format_response` writes that object on
one line, the form of the expert targets for the supervised warm start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from latent_mca.cards.envs import GAMES

_JSON_FORMAT = "Your response should be a valid json file in the following format: "


def _points_prompt(intro: str, actions: str, target: int, cards: str, check: str,
                   action_only: bool) -> str:
  """EZPoints / Points24 (the reference's two branches differ only in these strings)."""
  text = (intro + "You are observing the current formula: . "
          f"You can choose between {actions}. "
          "The number or operator you choose will be appended to the current formula. "
          "Note that 'J', 'Q', and 'K' count as '10'. "
          f"Your goal is to output a formula that evaluates to {target}, and each number can "
          "only be used once. " + _JSON_FORMAT + "\\{\n")
  if not action_only:
    text += (f" \"cards\": {cards}, \n"
             "\"current formula\": , \n"
             f"\"thoughts\": {{{check} "
             "Otherwise consider which number or operator should be appended to the current "
             f"formula to make it equal {target}.}} \n")
  return text + "\"action\": \"{number}\" or \"{operator}\" \n \\}"


def _reference_prompt(game: str, action_only: bool) -> str:
  """`get_prompt` of the reference for one game, with no `infos`."""
  if game == "numberline":
    text = ("You are playing a game called number line. You will see a target number and a "
            "current number in the image. And your goal is to move the current number closer "
            "to the target by choosing either adding or subtracting one to the current "
            "number. " + _JSON_FORMAT + "\n{\n ")
    if not action_only:
      text += ("\"current number\": \"x\", \n"
               "\"target number\": \"x\", \n"
               "\"thoughts\": \"{first read out the current and target number, then think "
               "carefully about which action to choose}\", \n")
    return text + "\"action\": \"-\" or \"+\" \n}"
  if game == "blackjack":
    text = ("You are a blackjack player. You are observing the current game state, you can "
            "choose between ['stand', 'hit']. " + _JSON_FORMAT + "\n{\n ")
    if not action_only:
      text += ("\"thoughts\": \"{first describe your total points and the dealer's total "
               "points then think about which action to choose}\", \n")
    return text + "\"action\": \"stand\" or \"hit\" \n}"
  if game == "ezpoints":
    return _points_prompt(
        "You are an expert card game player. You are observing two cards in the image. ",
        "['1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '+', '*', '=']", 12, "[x, y]",
        "First check whether the current formula 'z' is complete. If the current formula "
        "'z' is complete, output '='.", action_only)
  if game == "points24":
    return _points_prompt(
        "You are an expert 24 points card game player. You are observing thee four cards in "
        "the image. ",
        "['1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '+', '-', '*', '/', '(', ')', "
        "'=']", 24, "[x, y, z, w]",
        "First check whether the current formula equals 24. If the current formula equals "
        "24, output '='.", action_only)
  raise ValueError(f"unknown card game {game!r}; the games are {', '.join(GAMES)}")


# The chain-of-thought prompts (the reference's default) and the action-only ablation.
PROMPTS: dict[str, str] = {game: _reference_prompt(game, False) for game in GAMES}
ACTION_ONLY_PROMPTS: dict[str, str] = {game: _reference_prompt(game, True) for game in GAMES}

# The keys each game's response holds, in the order the reference's prompt lists them.
RESPONSE_KEYS: dict[str, tuple[str, ...]] = {
    "numberline": ("current number", "target number", "thoughts", "action"),
    "ezpoints": ("cards", "current formula", "thoughts", "action"),
    "points24": ("cards", "current formula", "thoughts", "action"),
    "blackjack": ("thoughts", "action"),
}


def prompt(game: str, *, action_only: bool = False) -> str:
  """The reference's task prompt for `game` (one of `GAMES`).

  Args:
    game: "numberline", "ezpoints", "points24" or "blackjack".
    action_only: the prompt without chain of thought (the reference's ablation).

  Raises:
    KeyError: an unknown game (the message names the known ones).
  """
  table = ACTION_ONLY_PROMPTS if action_only else PROMPTS
  if game not in table:
    raise KeyError(f"unknown card game {game!r}; the games are {', '.join(GAMES)}")
  return table[game]


def format_response(fields: Mapping[str, object]) -> str:
  """One JSON object on one line, keys in the given order, e.g. `{"thoughts": "...",
  "action": "hit"}` (json's ", " and ": " separators, non-ASCII kept as is).

  Args:
    fields: the response's keys and values (strings, or lists of numbers for "cards");
      "action" must be the last key and hold a string.

  Raises:
    ValueError: "action" missing, not last, or not a string.
  """
  keys = list(fields)
  if not keys or keys[-1] != "action":
    raise ValueError(f"a response's last key must be 'action' (the parser reads what follows "
                     f"it), got keys {keys}")
  if not isinstance(fields["action"], str):
    raise ValueError(f"the action must be a string, got {fields['action']!r}")
  return json.dumps(dict(fields), ensure_ascii=False)
