"""Reading an action out of a chain-of-thought response, and finding its tokens.

The policy writes `{"thoughts": ..., "action": ...}`; the environment takes an index
into the game's legal action strings. `parse_action` is the reference's rule
(RL4VLM `VLM_PPO/a2c_ppo_acktr/rl_utils.py`, `text_projection`, lines 67-107):

1. The text is lowercased and cut right after the first `"action":` (exactly that:
   no space before the colon). Without the key the reference's `str.find` returns -1
   and its slice `text[-1:]` keeps only the *last character*, which is then matched
   like any action text; that is kept (a bare "+" still parses, a bare "hit" does not).
2. An action that contains another legal action (the points games' "10", which
   contains "1") is matched first and every occurrence of it is deleted before the
   others are looked for, so `"10"` is 10 and not also 1, while "1 or 10" is both.
   The reference special-cases "10" for environments named "points"; the rule here is
   the same on the four games' action sets.
3. Every legal action that occurs as a substring of what is left is a match, however
   often it occurs. Exactly one distinct match gives its index; none or several give
   -1, and the caller draws a random legal action (`parse_actions`, which also
   reports which rows fell back, for a metric). Text after the JSON is matched too:
   `{"action": "+"} because 1 < 5` is ambiguous in the points games.

The reference matched the text from the key on, key included; no legal action of
these games occurs in `"action":`, so leaving the key out changes nothing.

`action_token_mask` splits a response's tokens for the chain-of-thought log-prob
`log pi = lambda * sum(thought log-probs) + sum(action log-probs)` (SPEC section 4).
The action tokens are those that hold any character from right after the same first
`"action":` on, found with the tokenizer by decoding (never from token ids). The
reference (`llava_interface/interface.py`, `llava_evaluate`) matched three hard-coded
LLaMA ids of `"action":`, but only took its match when it found two or more; with one
match or none it used the last five non-padding tokens instead, and it left the first
response tokens out of both sums. Here the span is where the parser looks, with or
without a closing stop token, which counts as action (in the reference, too, the
final `</s>` was among the action tokens); a response without the key is all thought.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ACTION_KEY = '"action":'


def _lowered_with_offsets(text: str) -> tuple[str, list[int]]:
  """`text.lower()` and, for each of its characters, the index of the source character.

  Lowercasing can lengthen a string ("İ" -> "i̇"), so positions found in the lowered text
  are mapped back through these offsets.
  """
  pieces, offsets = [], []
  for i, char in enumerate(text):
    low = char.lower()
    pieces.append(low)
    offsets.extend([i] * len(low))
  return "".join(pieces), offsets


def action_start(text: str) -> int | None:
  """The index in `text` right after its first `"action":` (any case), or None."""
  lowered, offsets = _lowered_with_offsets(text)
  found = lowered.find(ACTION_KEY)
  if found < 0:
    return None
  return offsets[found + len(ACTION_KEY) - 1] + 1


def _check_actions(actions: Sequence[str]) -> list[str]:
  """The legal actions lowercased; ValueError on an empty or repeated one."""
  lowered = [str(a).lower() for a in actions]
  if not lowered or any(not a for a in lowered) or len(set(lowered)) != len(lowered):
    raise ValueError(f"the legal actions must be distinct non-empty strings, got {actions!r}")
  return lowered


def matched_actions(text: str, actions: Sequence[str]) -> list[int]:
  """Indices of the legal actions the text names after its `"action":` (rules 1-3 above)."""
  lowered_actions = _check_actions(actions)
  lowered, _ = _lowered_with_offsets(text)
  found = lowered.find(ACTION_KEY)
  rest = lowered[found + len(ACTION_KEY):] if found >= 0 else lowered[-1:]
  matches = set()
  # Actions containing another legal action, longest first, are taken out before the rest.
  containers = sorted((a for a in lowered_actions
                       if any(b != a and b in a for b in lowered_actions)), key=len, reverse=True)
  for action in containers:
    if action in rest:
      matches.add(action)
      rest = rest.replace(action, "")
  matches.update(a for a in lowered_actions if a in rest)
  return sorted(lowered_actions.index(a) for a in matches)


def parse_action(text: str, actions: Sequence[str]) -> int:
  """The index of the one legal action the response names, or -1 (none, or several).

  Args:
    text: the decoded response.
    actions: the game's legal action strings, e.g. ("-", "+").
  """
  if not isinstance(text, str):
    return -1
  found = matched_actions(text, actions)
  return found[0] if len(found) == 1 else -1


def parse_actions(texts: Sequence[Any], actions: Sequence[str],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Parses a batch; rows that name no single action get a uniformly random one.

  Args:
    texts: N decoded responses (a non-string counts as unparsable, as in the reference).
    actions: the legal action strings.
    rng: draws the fallback actions.

  Returns:
    (indices int32 [N] into `actions`, random_fallback bool [N]).
  """
  _check_actions(actions)
  indices = np.array([parse_action(t, actions) for t in texts], np.int32).reshape(-1)
  fallback = indices < 0
  indices[fallback] = rng.integers(0, len(actions), size=int(fallback.sum()))
  return indices, fallback


def _prefix_consistent_length(prefix: str, text: str) -> int:
  """How many leading characters `prefix` shares with `text`."""
  n = min(len(prefix), len(text))
  for i in range(n):
    if prefix[i] != text[i]:
      return i
  return n


def action_token_mask(tokenizer, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Which response tokens are thought and which are action, found by decoding.

  Token k is an action token when it holds any character at or after the end of the
  first `"action":` in the decoded response. A token's characters come from the
  prefix decodes `decode(ids[:k])`: a byte-level BPE token can end inside a
  multi-byte character, whose prefix decode ends in a replacement character instead;
  such a token counts as holding (part of) the next character of the full text. Once
  a token is an action token all later ones are, since their bytes come later.

  Args:
    tokenizer: a `transformers` tokenizer (`decode`, `batch_decode`).
    token_ids: the response's M token ids, padding already removed (a final stop token
      may stay: it lies after the action, so it is an action token).

  Returns:
    (thought_mask bool [M], action_mask bool [M]), complementary; with no `"action":`
    in the response every token is thought.
  """
  ids = [int(i) for i in token_ids]
  thought, action = np.ones(len(ids), bool), np.zeros(len(ids), bool)
  if not ids:
    return thought, action
  kwargs = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
  text = tokenizer.decode(ids, **kwargs)
  start = action_start(text)
  if start is None:
    return thought, action
  prefixes = tokenizer.batch_decode([ids[:k + 1] for k in range(len(ids))], **kwargs)
  for k, prefix in enumerate(prefixes):
    shared = _prefix_consistent_length(prefix, text)
    # Past the key, or a partial character (decoded as U+FFFD) right at it.
    if shared > start or (shared == start and len(prefix) > shared):
      thought[k:], action[k:] = False, True
      break
  return thought, action


def action_token_masks(tokenizer, token_ids: np.ndarray,
                       response_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`action_token_mask` for a batch: each row's response tokens are where its mask is set.

  Args:
    tokenizer: a `transformers` tokenizer.
    token_ids: int [N, M] response token ids (any padding layout).
    response_mask: bool or {0, 1} [N, M], the real response tokens of each row, in order.

  Returns:
    (thought_mask bool [N, M], action_mask bool [N, M]), both False outside the mask.
  """
  token_ids, response_mask = np.asarray(token_ids), np.asarray(response_mask).astype(bool)
  if token_ids.ndim != 2 or token_ids.shape != response_mask.shape:
    raise ValueError(f"token_ids and response_mask must both be [N, M], got {token_ids.shape} "
                     f"and {response_mask.shape}")
  thought, action = np.zeros_like(response_mask), np.zeros_like(response_mask)
  for row in range(token_ids.shape[0]):
    where = np.flatnonzero(response_mask[row])
    thought[row, where], action[row, where] = action_token_mask(tokenizer, token_ids[row, where])
  return thought, action
