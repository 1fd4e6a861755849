"""LLM judge client for an OpenAI-compatible `/chat/completions` endpoint.

Pairwise, per dimension, following the reference evaluation (MMRole's reward-model
review, `eval/RM_review.py`): for each aspect the judge sees the question, the
evaluated response as Model A and the ground truth as Model B, the role-play task
instruction and the aspect's question, and ends its reply with
`[Scores]: (score of A, score of B)` on a 1..10 scale. The reward is
sum(candidate scores) / sum(ground-truth scores).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping, Sequence

SYSTEM_PROMPT = ("You are an objective and precise evaluator, specializing in rigorously "
                 "assessing the role-playing and multimodal understanding abilities of various "
                 "models.")

# Our dimension names -> (the reference's aspect name, its question). `{role}` is the
# character, `{other}` whom it talks to ("the curious human" for a human user).
ASPECTS: dict[str, tuple[str, str]] = {
    "instruction_adherence": (
        "Instruction Adherence",
        "Do the responses accurately adhere to the task instruction, directly role-playing as "
        "{role} and only including words that {role} should say, without any additional "
        "explanatory prefixes or suffixes?"),
    "fluency": ("Fluency", "Are the responses grammatically correct and smoothly articulated?"),
    "coherency": (
        "Coherency",
        "Do the responses maintain a coherent thread of dialogue without contradicting earlier "
        "parts of the conversation or previously established facts?"),
    "image_text_relevance": (
        "Image-Text Relevance", "Are the responses closely related to the visual content of the "
        "image?"),
    "accuracy": (
        "Response Accuracy",
        "Do the responses accurately answer {other}'s words or appropriately initiate a "
        "conversation based on the image?"),
    "personality": (
        "Personality Consistency",
        "Do the responses accurately and sufficiently reflect the personality of {role}?"),
    "knowledge": (
        "Knowledge Consistency",
        "Are the responses consistent with the factual knowledge that {role} should possess, "
        "including experiences, abilities, and relationships?"),
    "tone": (
        "Tone Consistency",
        "Do the responses maintain a consistent tone that aligns with {role}'s typical manner "
        "of speaking and catchphrases, rather than resembling the style of AI assistants?"),
}
DIMENSIONS: dict[str, str] = {name: aspect for name, (aspect, _) in ASPECTS.items()}

HUMAN = "a curious human"
FICTIONAL = "Hypothetical Characters"


class JudgeError(RuntimeError):
  """The endpoint could not be reached or never gave a parsable answer."""


@dataclasses.dataclass(frozen=True)
class RolePlayContext:
  """Who plays whom: `script` is the work the characters come from, or FICTIONAL."""

  role: str
  script: str = FICTIONAL
  other_role: str = HUMAN

  def _describe(self, name: str) -> str:
    if name == HUMAN:
      return name
    if self.script == FICTIONAL:
      return f"{name}, a person who is one of the Hypothetical Characters,"
    return f"{name} from {self.script}"

  @property
  def task(self) -> str:
    return (f"The task instruction of the two models is to directly role-play as "
            f"{self._describe(self.role)} and talk with {self._describe(self.other_role)} "
            f"about the given image using the distinctive tone, manner and vocabulary of "
            f"{self.role}.")

  @property
  def other(self) -> str:
    return "the curious human" if self.other_role == HUMAN else self.other_role


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


def pairwise_prompt(dimension: str, context: RolePlayContext, question: str, candidate: str,
                    reference: str, aspects: Mapping[str, tuple[str, str]] = ASPECTS) -> str:
  """The review prompt for one dimension: the candidate is Model A, the ground truth Model B.

  aspects: dimension -> (aspect name, question), as `ASPECTS`. `context` is any object
  with `role`, `other` (filling the question's `{role}`, `{other}`) and `task`.
  """
  if dimension not in aspects:
    raise KeyError(f"unknown dimension {dimension!r}; known: {sorted(aspects)}")
  aspect, ask = aspects[dimension]
  ask = ask.format(role=context.role, other=context.other)
  return (
      f"## **[Question Start]**\n\n{question}\n\n## **[Question End]**\n\n\n"
      f"## **[Model A's Response Start]**\n\n{candidate}\n\n## **[Model A's Response End]**"
      "\n\n\n"
      f"## **[Model B's Response Start]**\n\n{reference}\n\n## **[Model B's Response End]**"
      "\n\n\n"
      "## **[Instruction]**\n\n"
      f"{context.task}\n\n"
      "Please evaluate the following aspect of each model's response:\n"
      f"{aspect}: {ask}\n\n"
      "Please provide a brief qualitative evaluation for the relative performance of the two "
      "models, followed by paired quantitative scores from 1 to 10, where 1 indicates poor "
      "performance and 10 indicates excellent performance.\n\n"
      "The output should be in the following format:\n"
      "{Qualitative Evaluation}, [Scores]: ({the score of Model A}, {the score of Model B})\n\n"
      "Please ensure that your evaluations are unbiased and that the order in which the "
      "responses were presented does not affect your judgment.")


def parse_pair(reply: str) -> tuple[float, float]:
  """(score of Model A, score of Model B) from a review; ValueError naming what is wrong.

  As the reference: the text after the single "[Scores]:" marker, its first line,
  without parentheses, split on the comma; each part may carry a "label:" prefix.
  """
  parts = reply.split("[Scores]:")
  if len(parts) != 2:
    raise ValueError(f"expected one '[Scores]:' marker in the judge reply, found "
                     f"{len(parts) - 1}: {reply[:80]!r}")
  line = parts[1].strip().split("\n")[0].strip().replace("(", "").replace(")", "")
  pair = line.split(",")
  if len(pair) != 2:
    raise ValueError(f"'[Scores]:' is not followed by two scores: {line[:80]!r}")
  try:
    a, b = (float(p.split(":")[-1].strip()) for p in pair)
  except ValueError:
    raise ValueError(f"scores are not numbers: {line[:80]!r}") from None
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
  dimensions: Sequence[str] = tuple(ASPECTS)
  sleep: Callable[[float], None] = time.sleep

  def _post(self, payload: dict) -> dict:
    request = urllib.request.Request(
        self.base_url.rstrip("/") + "/chat/completions", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
      return json.loads(response.read())

  def complete(self, prompt: str, image=None, parse: Callable[[str], object] = str,
               system: str = SYSTEM_PROMPT):
    """Sends a system and a user message (with an optional PIL image); returns parse(reply).

    Retries transient failures and replies that `parse` rejects (ValueError); raises
    JudgeError naming the last problem once the retries are spent.
    """
    # The image first, then the text, as the reference's reward model reads them.
    content = ([_image_content(image)] if image else []) + [{"type": "text", "text": prompt}]
    payload = {"model": self.model, "temperature": 0.0,
               "messages": [{"role": "system", "content": system},
                            {"role": "user", "content": content}]}
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

  def score(self, context: RolePlayContext, question: str, candidate: str, reference: str,
            image=None, aspects: Mapping[str, tuple[str, str]] | None = None) -> PairwiseScores:
    """Pairwise scores of candidate (Model A) and ground truth (Model B) on every dimension.

    aspects: score on all of these dimensions instead of `self.dimensions` of `ASPECTS`.
    """
    dims = self.dimensions if aspects is None else tuple(aspects)
    ref, cand = {}, {}
    for dim in dims:
      prompt = pairwise_prompt(dim, context, question, candidate, reference,
                               ASPECTS if aspects is None else aspects)
      cand[dim], ref[dim] = self.complete(prompt, image, parse=parse_pair)
    return PairwiseScores(reference=ref, candidate=cand)
