"""Reward functions for RL: `fn(example, responses) -> [reward per response]`.

A reward function scores a group of sampled responses to one dialogue example (either
task, in the schemas of `latent_mca.data.real`). Every reward is the reference's
judge-score ratio: the sum of the response's per-dimension scores divided by the sum
of the example's ground-truth reply's scores.

- `programmatic_rewards`: the programmatic judge of the synthetic world
  (`judge.programmatic.rewards` against the example's scene facts); synthetic data only.
- `LLMRewards`: an `LLMJudge` behind an OpenAI-compatible endpoint, pairwise per
  dimension as MMRole's reward-model review (`judge.llm`): for every response and
  dimension one request shows the response as Model A and the ground truth as Model
  B, with the example's image; a thread pool of `concurrency` workers sends all the
  group's requests at once. The reward of a response is sum(A) / sum(B) over its own
  calls, so the ground truth's scores are those given beside that response. Role-play
  examples are scored on the judge's `dimensions` (`llm.ASPECTS`, with the task of a
  `RolePlayContext`), personalised ones on PCogAlignBench's five
  (`PERSONALISED_ASPECTS`, with the task of a `PersonalisedContext`).

`make_reward_fn(config.rl.judge)` builds one from the config (`judge_defaults()`
lists its fields). The programmatic judge is the default; to train against a served
model instead:

    --config.rl.judge.kind=llm --config.rl.judge.base_url=http://127.0.0.1:8000/v1
    --config.rl.judge.model=Qwen2.5-VL-72B-Instruct

The API key, if the endpoint needs one, is read from the environment variable named by
`rl.judge.api_key_env` (OPENAI_API_KEY by default; "" sends none).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import ml_collections
import numpy as np
import PIL.Image

from latent_mca import tasks
from latent_mca.judge import programmatic
from latent_mca.judge.llm import (ASPECTS, FICTIONAL, HUMAN, JudgeError, LLMJudge,
                                  PairwiseScores, RolePlayContext, pairwise_prompt, parse_pair,
                                  score_ratio)

logger = logging.getLogger(__name__)

KINDS = ("programmatic", "llm")

# PCogAlignBench's rating dimensions (its evaluation prompt), asked of a pair of
# responses: dimension (the names of `programmatic.PERSONALISED_DIMENSIONS`) ->
# (aspect name, question). `{role}` is the role the user holds where they are,
# `{other}` the user.
PERSONALISED_ASPECTS: dict[str, tuple[str, str]] = {
    "role_set_sensitivity": (
        "Role-Set Sensitivity",
        "Do the responses consider {other}'s multiple roles and responsibilities (especially "
        "the primary role in this situation, {role}), providing advice or information "
        "specifically tailored to support {other} effectively and acknowledging only the roles "
        "that are essential in the current context?"),
    "body_behavior_awareness": (
        "Body Behavior Awareness",
        "Do the responses offer guidance or strategies that help {other} achieve the body "
        "behavior {other} desires?"),
    "mind_feelings_awareness": (
        "Mind Feelings Awareness",
        "Do the responses provide support and address the emotional needs necessary for "
        "{other} to achieve the mind feelings {other} desires?"),
    "contextual_awareness": (
        "Contextual Awareness",
        "Do the responses accurately address {other}'s query, maintaining focus on its main "
        "intent without deviation, and are they relevant to {other}'s specific scenario, "
        "including the location and situational factors?"),
    "conversational_flow": (
        "Conversational Flow",
        "Do the responses encourage ongoing interaction by being engaging and naturally "
        "flowing, and are they appropriately concise or detailed, striking a balance for "
        "optimal understanding?"),
}


class RewardFn(Protocol):
  """One reward per response to `example` (the judge-score ratio against its ground truth)."""

  def __call__(self, example: Mapping, responses: Sequence[str]) -> list[float]:
    ...


def programmatic_rewards(example: Mapping, responses: Sequence[str]) -> list[float]:
  """The programmatic judge's rewards, against the synthetic example's scene facts."""
  return programmatic.rewards(example, tasks.example_facts(example), responses)


@dataclasses.dataclass(frozen=True)
class PersonalisedContext:
  """Whom a personalised reply is for, as `pairwise_prompt` needs it (`role`, `other`, `task`).

  role_set: "Child at Home; Student at School". location: where the situation happens
  ("" if unknown). role: the role held there ("" if unknown). eval_help: what the person
  wanted from the reply (PCogAlignBench's EvalHelp, "" if absent).
  """

  role_set: str
  location: str = ""
  role: str = ""
  eval_help: str = ""

  @property
  def other(self) -> str:
    return "the user"

  @property
  def task(self) -> str:
    held = f"the role of {self.role}" if self.role else "their role"
    where = f" at {self.location}" if self.location else ""
    text = (f"The task instruction of the two models is to reply, as a personalised AI "
            f"assistant, to a user who is \"{self.role_set}\" and who, in {held}{where}, shows "
            f"the given image and asks the question. The reply should answer the question "
            f"correctly and be adapted to the user: to {held}{where}, to the behavior they "
            f"want to achieve and to the feelings they want to reach.")
    if self.eval_help:
      text += f" What the user wanted from the reply: {' '.join(self.eval_help.split())}"
    return text


def roleplay_context(example: Mapping) -> RolePlayContext:
  """The role-play judge context: the character, its work, whom it talks to.

  The script is the example's "script" (or its character's), as MMRole's formatted test
  files carry it; our readers keep none, so it is FICTIONAL by default. The other role
  is the speaker of the user turn the reply answers (a curious human unless another
  character speaks, as in MMRole's inter-role dialogues).
  """
  character = example["character"]
  script = example.get("script") or character.get("script") or FICTIONAL
  reply = tasks.reply_index(example)
  speaker = next((t.get("speaker", "human") for t in reversed(example["dialogue"][:reply])
                  if t["role"] == "user"), "human")
  return RolePlayContext(role=character["name"], script=script,
                         other_role=HUMAN if speaker == "human" else speaker)


def personalised_context(example: Mapping) -> PersonalisedContext:
  """The personalised judge context from the role set and the situation."""
  situation = example.get("situation") or {}
  location = situation.get("location", "")
  roles = [r["role"] for r in example["role_set"] if r["location"] == location]
  return PersonalisedContext(
      role_set="; ".join(f"{r['role']} at {r['location']}" for r in example["role_set"]),
      location=location, role=roles[0] if len(roles) == 1 else "",
      eval_help=situation.get("eval_help", ""))


def example_image(example: Mapping) -> PIL.Image.Image:
  """The example's image as PIL: its decoded "image" (uint8 [H, W, C], PIL or PNG bytes),
  else its scene rendered or its file loaded (`tasks.example_image`)."""
  image = example.get("image")
  if image is None:
    return tasks.example_image(example)
  if isinstance(image, PIL.Image.Image):
    return image
  if isinstance(image, (bytes, bytearray)):
    return PIL.Image.open(io.BytesIO(image))
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(f"example {example.get('id')!r}: image must be uint8 [H, W(, C)], got "
                     f"{array.dtype} {array.shape}")
  return PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1
                             else array)


@dataclasses.dataclass
class LLMRewards:
  """The LLM judge's rewards (module docstring): `LLMRewards(judge)(example, responses)`.

  Attributes:
    judge: the endpoint client; its `dimensions` are the role-play ones scored.
    concurrency: requests in flight at once (all responses x dimensions of a group).
  """

  judge: LLMJudge
  concurrency: int = 16

  def __post_init__(self):
    if self.concurrency < 1:
      raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")

  def prompt_parts(self, example: Mapping):
    """(context, aspects, question, reference) of one example, either task."""
    # dimensions_for tells the tasks apart (and rejects an example of neither).
    if programmatic.dimensions_for(example) == programmatic.ROLEPLAY_DIMENSIONS:
      aspects = {d: ASPECTS[d] for d in self.judge.dimensions}
      return (roleplay_context(example), aspects, tasks.roleplay_question(example),
              programmatic.reference_reply(example))
    return (personalised_context(example), PERSONALISED_ASPECTS, example["query"],
            programmatic.reference_reply(example))

  def scores(self, example: Mapping, responses: Sequence[str]) -> list[PairwiseScores]:
    """Each response's pairwise scores (candidate: the response, reference: the ground truth).

    Raises:
      JudgeError: a request failed after its retries; the message names the example.
      ValueError: the example has no reference reply (PCogAlignBench outside its golden
        test files).
    """
    name = example.get("id", "?")
    context, aspects, question, reference = self.prompt_parts(example)
    if not reference:
      raise ValueError(f"example {name!r} has no reference reply to compare responses with")
    if not responses:
      return []
    image = example_image(example)
    image.load()  # decode a lazily opened file now: the threads below only read it
    jobs = [(i, dim, pairwise_prompt(dim, context, question, response, reference, aspects))
            for i, response in enumerate(responses) for dim in aspects]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)))
    try:
      futures = [pool.submit(self.judge.complete, prompt, image, parse=parse_pair)
                 for _, _, prompt in jobs]
      pairs = [f.result() for f in futures]
    except JudgeError as e:
      raise JudgeError(f"example {name!r}: {e}") from e
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    out = [PairwiseScores(reference={}, candidate={}) for _ in responses]
    for (i, dim, _), (a, b) in zip(jobs, pairs):
      out[i].candidate[dim], out[i].reference[dim] = a, b
    return out

  def __call__(self, example: Mapping, responses: Sequence[str]) -> list[float]:
    """sum(response's scores) / sum(ground truth's scores beside it), per response.

    Raises JudgeError, naming the example, also when the ground truth scored 0 on every
    dimension beside a response (the ratio is undefined).
    """
    rewards = []
    for i, s in enumerate(self.scores(example, responses)):
      try:
        rewards.append(score_ratio(s.candidate, s.reference))
      except ValueError as e:
        raise JudgeError(f"example {example.get('id', '?')!r}, response {i}: {e}") from None
    return rewards


def judge_defaults() -> ml_collections.ConfigDict:
  """The `rl.judge` config: the programmatic judge, or an LLM endpoint (kind="llm")."""
  return ml_collections.ConfigDict({
      "kind": "programmatic",  # one of KINDS
      "base_url": "",  # kind="llm": e.g. http://127.0.0.1:8000/v1
      "model": "",  # kind="llm": the model name the endpoint serves
      "api_key_env": "OPENAI_API_KEY",  # environment variable with the key; "" = no key
      "timeout_s": 60.0,  # per request
      "retries": 3,  # extra attempts after a transient failure
      "concurrency": 16,  # requests in flight per group
  })


def make_reward_fn(judge_config) -> RewardFn:
  """The reward function `judge_config` (`rl.judge`, see `judge_defaults`) asks for.

  Raises:
    ValueError: an unknown kind, or kind "llm" without base_url / model or with bad
      timeout_s / retries / concurrency; the message names the flag to set.
  """
  kind = judge_config.kind
  if kind not in KINDS:
    raise ValueError(f"unknown rl.judge.kind {kind!r}; expected one of {KINDS}")
  if kind == "programmatic":
    return programmatic_rewards
  for field, example in (("base_url", "http://127.0.0.1:8000/v1"),
                         ("model", "Qwen2.5-VL-72B-Instruct")):
    if not getattr(judge_config, field):
      raise ValueError(f"rl.judge.kind='llm' needs rl.judge.{field}; set it, e.g. "
                       f"--config.rl.judge.{field}={example}")
  if judge_config.timeout_s <= 0 or judge_config.retries < 0 or judge_config.concurrency < 1:
    raise ValueError(f"rl.judge needs timeout_s > 0, retries >= 0 and concurrency >= 1; got "
                     f"{judge_config.timeout_s}, {judge_config.retries}, "
                     f"{judge_config.concurrency}")
  api_key = ""
  if judge_config.api_key_env:
    api_key = os.environ.get(judge_config.api_key_env, "")
    if not api_key:
      logger.warning("rl.judge.api_key_env: $%s is not set; sending no API key (set "
                     "--config.rl.judge.api_key_env= to silence this)", judge_config.api_key_env)
  judge = LLMJudge(base_url=judge_config.base_url, model=judge_config.model, api_key=api_key,
                   timeout_s=float(judge_config.timeout_s), retries=int(judge_config.retries))
  return LLMRewards(judge, concurrency=int(judge_config.concurrency))
