"""SFT / RL / in-distribution test / out-of-distribution test splits of the dialogue tasks.

In-distribution examples go to "sft" (50%), "rl" (40%) or "test_in" (10%) by
a hash of their id, so an example's split never depends on how many were
made: growing n only adds examples. Out-of-distribution examples (text-only
characters, HCSHR role sets) are all "test_out": nothing trained on shares
their characters or role sets. The same rule serves real data, whose ids are
the readers' ids (MMRole); a benchmark that comes with its own test files
(PCogAlignBench) divides only its training file, between sft and rl in the same
5 : 4 proportion (`training_split_of`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from latent_mca.tasks import personalised, roleplay

SPLITS = ("sft", "rl", "test_in", "test_out")
# Shares of the in-distribution examples; test_in gets the rest (10%).
SFT_SHARE = 0.5
RL_SHARE = 0.4
TASKS = ("roleplay", "personalised")


def id_fraction(example_id: str) -> float:
  """A fixed pseudo-random number in [0, 1) for an id (SHA-256; Python's hash() is salted)."""
  digest = hashlib.sha256(example_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_out_of_distribution(example: Mapping) -> bool:
  """Whether an example of either schema belongs to the out-of-distribution test set."""
  if "distribution" in example:
    return example["distribution"] == "out"
  return example["subset"] == personalised.SUBSETS["out"]


def split_of(example: Mapping) -> str:
  """The split an example belongs to (one of `SPLITS`)."""
  if is_out_of_distribution(example):
    return "test_out"
  u = id_fraction(example["id"])
  if u < SFT_SHARE:
    return "sft"
  return "rl" if u < SFT_SHARE + RL_SHARE else "test_in"


def training_split_of(example: Mapping) -> str:
  """The split ("sft" or "rl") of an example of a training set whose test sets come
  separately (PCogAlignBench's HCMAS-train): sft : rl = SFT_SHARE : RL_SHARE (5 : 4) by id hash."""
  return "sft" if id_fraction(example["id"]) < SFT_SHARE / (SFT_SHARE + RL_SHARE) else "rl"


def split_examples(examples: Iterable[Mapping]) -> dict[str, list]:
  """The examples grouped by `split_of`, every split present (possibly empty), order kept."""
  out: dict[str, list] = {name: [] for name in SPLITS}
  for example in examples:
    out[split_of(example)].append(example)
  return out


def task_splits(seed: int, n_in: int, n_out: int) -> dict[str, dict[str, list[dict]]]:
  """All four splits of both tasks: {task: {split: examples}}.

  n_in in-distribution examples are made per task and divided among sft /
  rl / test_in; n_out out-of-distribution examples form test_out.
  """
  makers = {"roleplay": roleplay.roleplay_examples,
            "personalised": personalised.personalised_examples}
  return {task: split_examples(make(seed, n_in, "in") + make(seed, n_out, "out"))
          for task, make in makers.items()}
