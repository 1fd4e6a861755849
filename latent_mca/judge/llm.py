"""LLM judge client for an OpenAI-compatible `/chat/completions` endpoint.

Pairwise, per dimension, in the format the reference evaluation uses (the LLaVA-Bench /
MMRole review prompt): the judge sees the context, the ground-truth answer as
Assistant 1 and the candidate as Assistant 2, and replies with a first line holding two
scores from 1 to 10. The reward is sum(candidate scores) / sum(ground-truth scores).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

# The role-play dimensions of the reference evaluation, with what each asks for.
DIMENSIONS: dict[str, str] = {
    "instruction_adherence": "how well the response follows the instruction and the format "
                             "asked for",
    "fluency": "grammatical, natural and readable language",
    "coherency": "consistency with the dialogue so far and within itself",
    "image_text_relevance": "how closely the response relates to the image",
    "accuracy": "correctness of what the response says about the image and the world",
    "personality": "how well it shows the character's personality",
    "knowledge": "use of the character's knowledge and experience",
    "tone": "how well the tone and catchphrases match the character",
}

_PAIR = re.compile(r"^\s*\(?\s*(\d+(?:\.\d+)?)\s*[, ]\s*(\d+(?:\.\d+)?)\s*\)?\s*$")


class JudgeError(RuntimeError):
  """The endpoint could not be reached or never gave a parsable answer."""


@dataclasses.dataclass(frozen=True)
class PairwiseScores:
  """Scores of the ground truth and of the candidate, per dimension (1..10)."""

  reference: dict[str, float]
  candidate: dict[str, float]

  @property
  def ratio(self) -> float:
    return score_ratio(self.candidate, self.reference)


def score_ratio(candidate: dict[str, float], reference: dict[str, float]) -> float:
  """The reference reward: sum of the candidate's scores / sum of the ground truth's."""
  total = sum(reference.values())
  if total <= 0:
    raise ValueError(f"ground-truth scores sum to {total}; the ratio is undefined")
  return sum(candidate.values()) / total


def pairwise_prompt(dimension: str, context: str, reference: str, candidate: str) -> str:
  """The review prompt for one dimension (ground truth = Assistant 1, candidate = Assistant 2)."""
  if dimension not in DIMENSIONS:
    raise KeyError(f"unknown dimension {dimension!r}; known: {sorted(DIMENSIONS)}")
  return (
      f"[Context]\n{context}\n\n"
      f"[The Start of Assistant 1's Answer]\n{reference}\n[The End of Assistant 1's Answer]\n\n"
      f"[The Start of Assistant 2's Answer]\n{candidate}\n[The End of Assistant 2's Answer]\n\n"
      "[System]\nWe would like to request your feedback on the performance of two AI "
      "assistants in response to the context displayed above.\n"
      f"Please rate their responses on {dimension.replace('_', ' ')}: "
      f"{DIMENSIONS[dimension]}. Each assistant receives a score on a scale of 1 to 10, "
      "where a higher score indicates better performance.\n"
      "Please first output a single line containing only two values indicating the scores "
      "for Assistant 1 and 2, respectively. The two scores are separated by a space. In the "
      "subsequent line, please provide a comprehensive explanation of your evaluation, "
      "avoiding any potential bias and ensuring that the order in which the responses were "
      "presented does not affect your judgment.")


def parse_pair(reply: str) -> tuple[float, float]:
  """The two scores on the first non-empty line of a judge reply; ValueError if malformed."""
  lines = [line for line in reply.strip().splitlines() if line.strip()]
  if not lines:
    raise ValueError("empty judge reply")
  match = _PAIR.match(lines[0])
  if not match:
    raise ValueError(f"first line of the judge reply is not two scores: {lines[0][:80]!r}")
  a, b = float(match.group(1)), float(match.group(2))
  if not (0 <= a <= 10 and 0 <= b <= 10):
    raise ValueError(f"judge scores out of range 0..10: {a}, {b}")
  return a, b


def _image_content(image) -> dict:
  """An OpenAI-style image content item (PNG data URL) from a PIL image."""
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  return {"type": "image_url", "image_url": {"url": url}}


@dataclasses.dataclass
class LLMJudge:
  """Scores responses with a chat model behind an OpenAI-compatible endpoint.

  Attributes:
    base_url: e.g. "http://127.0.0.1:8000/v1" (".../chat/completions" is appended).
    model: the model name the endpoint serves.
    api_key: sent as a Bearer token when not empty.
    timeout_s: per request. retries: extra attempts after a timeout, a connection
      error, HTTP 429/5xx or a malformed reply; backoff_s doubles after each.
  """

  base_url: str
  model: str
  api_key: str = ""
  timeout_s: float = 60.0
  retries: int = 3
  backoff_s: float = 1.0
  dimensions: Sequence[str] = tuple(DIMENSIONS)
  sleep: Callable[[float], None] = time.sleep

  def _post(self, payload: dict) -> dict:
    request = urllib.request.Request(
        self.base_url.rstrip("/") + "/chat/completions", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
      return json.loads(response.read())

  def complete(self, prompt: str, image=None, parse: Callable[[str], object] = str):
    """Sends one user message (plus an optional PIL image); returns parse(reply text).

    Retries transient failures and replies that `parse` rejects (ValueError); raises
    JudgeError naming the last problem once the retries are spent.
    """
    content = [{"type": "text", "text": prompt}] + ([_image_content(image)] if image else [])
    payload = {"model": self.model, "temperature": 0.0,
               "messages": [{"role": "user", "content": content}]}
    problem = ""
    for attempt in range(self.retries + 1):
      if attempt:
        self.sleep(self.backoff_s * 2 ** (attempt - 1))
      try:
        body = self._post(payload)
        text = body["choices"][0]["message"]["content"]
        return parse(text)
      except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code} from {self.base_url}"
        if e.code not in (408, 429) and e.code < 500:
          break  # a client error will not go away by asking again
      except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
        problem = f"cannot reach {self.base_url}: {getattr(e, 'reason', e)}"
      except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
        problem = f"malformed response body: {e!r}"
      except ValueError as e:
        problem = f"unusable judge reply: {e}"
    raise JudgeError(f"judge failed after {attempt + 1} attempt(s): {problem}")

  def score(self, context: str, reference: str, candidate: str, image=None) -> PairwiseScores:
    """Pairwise scores of ground truth and candidate on every dimension."""
    ref, cand = {}, {}
    for dim in self.dimensions:
      ref[dim], cand[dim] = self.complete(pairwise_prompt(dim, context, reference, candidate),
                                          image, parse=parse_pair)
    return PairwiseScores(reference=ref, candidate=cand)
