r"""Can the cards job's model size learn to plan Points24 in one step of thought? Text only.

  python -m experiments.points24_plans [--out results/points24_plans] [--steps 3000]
      [--deals 450,3352] [--formats deal,canonical,sorted] [--batch 64] [--eval 512]

The cards job's warm start reads Points24's four cards right on a third of the deals and
its plan ("Solution: F=24") solves none of them (results/cards_gpu_h100/
cards_grounding.md). This separates the plan from the reading: the four card values
are given as tokens, no frame, to a decoder of the cards job's sizes (4 layers, width
128, `configs/cards.py`'s backbone) trained from scratch on a pool of expert deals, and
asked for a formula. Formats of the plan, after the values in card order:

  deal       the expert's plan "deal" (`experts.planned_solution`), as the warm starts of
             results/cards_* were trained: `arith.solve` on the values in card order
             (the same multiset dealt in another order may get another formula);
  canonical  the expert's plan "canonical": one formula per multiset (fewest symbols,
             fewest divisions, then string order);
  sorted     the sorted values written first, then the canonical formula.

With "+episode" (e.g. `deal+episode`) a deal is trained at a random step of its
episode, the formula typed so far (a prefix of the plan's) in the prompt, as the cards
job's expert data holds every step of an episode: the plan is then mostly copied from
the typed formula, and only the first step, nothing typed, asks for it from the values.
It is scored there, at the first step.

A plan counts when its formula uses each value once and makes 24 (`experts.is_solution`).
Measured on `--eval` fresh solvable deals drawn as the environment draws them (ranks
1..13, J Q K worth 10, redrawn until solvable) and on as many deals of the training pool.
`--deals` sizes the pool: 450 deals is about the `gpu` config's 4096 expert transitions,
3352 the 8 times larger pool of results/cards_gpu_h100/points24_more_deals. Writes
OUT/points24_plans.{json,md}.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import text_decoder
from latent_mca.cards import arith, experts
from latent_mca.jobs import cards as cards_job
from latent_mca.models import qwen2_5_vl
from latent_mca.training import state as state_lib

FORMATS = ("deal", "canonical", "sorted")
_OUT = flags.DEFINE_string("out", "results/points24_plans", "Where the results go.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps per run.")
_BATCH = flags.DEFINE_integer("batch", 64, "Deals per step.")
_DEALS = flags.DEFINE_list("deals", ["450", "3352"], "Training pool sizes (deals).")
_FORMATS = flags.DEFINE_list("formats", list(FORMATS), "Plan formats (see the docstring).")
_EVAL = flags.DEFINE_integer("eval", 512, "Fresh deals (and training deals) to score.")
_LR = flags.DEFINE_float("lr", 2e-3, "Peak AdamW learning rate (the cards SFT's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the deals and the model.")

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SYMBOLS = [str(v) for v in range(1, 11)] + ["+", "-", "*", "/", "(", ")"]
TOKEN = {s: 4 + i for i, s in enumerate(SYMBOLS)}
VOCAB = 32  # the ids above, then the model's image/video/vision tokens (unused) at 28..31
MAX_FORMULA = 15  # the longest formula's symbols
MAX_PLAN = 24  # the longest plan: 4 sorted values, SEP, a formula of at most 15 symbols, EOS


@functools.lru_cache(maxsize=None)
def plan(values: tuple[int, ...], fmt: str) -> tuple[str, ...]:
  """The symbols the model should write after the deal's values (and SEP), EOS excluded."""
  if fmt in experts.PLANS:
    return experts.planned_solution(values, 24, "+-*/", fmt)
  canonical = experts.planned_solution(values, 24, "+-*/", "canonical")
  return (*[str(v) for v in sorted(values)], "|", *canonical)


def formula(values: tuple[int, ...], base: str) -> tuple[str, ...]:
  """The formula of the plan (after the sorted values of "sorted")."""
  symbols = plan(values, base)
  return symbols[symbols.index("|") + 1:] if "|" in symbols else symbols


def split_format(fmt: str) -> tuple[str, bool]:
  """(plan format, whether examples come from every step of an episode: "+episode")."""
  base, _, mode = fmt.partition("+")
  if base not in FORMATS or mode not in ("", "episode"):
    raise ValueError(f"unknown plan format {fmt!r}; the formats are {', '.join(FORMATS)}, "
                     "each alone or with +episode")
  return base, mode == "episode"


def width(fmt: str) -> int:
  return 6 + MAX_PLAN + (MAX_FORMULA + 1) * split_format(fmt)[1]


def encode(values, fmt: str, typed: int = 0) -> tuple[list[int], int]:
  """(token ids of the deal and its plan, the plan's first position). With +episode the
  prompt also holds the formula typed so far (the plan's first `typed` symbols) and SEP."""
  base, episode = split_format(fmt)
  values = tuple(int(v) for v in values)
  prompt = [BOS, *[TOKEN[str(v)] for v in values], SEP]
  if episode:
    prompt += [TOKEN[s] for s in formula(values, base)[:typed]] + [SEP]
  body = [SEP if s == "|" else TOKEN[s] for s in plan(values, base)]
  return prompt + body + [EOS], len(prompt)


def batch(deals: np.ndarray, fmt: str, rng: np.random.Generator) -> dict:
  """A training batch. With +episode each deal is seen at a uniformly random step of its
  episode (0 .. the formula's length typed), as the expert data holds every step."""
  base, episode = split_format(fmt)
  rows = []
  for d in deals:
    n = len(formula(tuple(int(v) for v in d), base))
    rows.append(encode(d, fmt, int(rng.integers(0, n + 1)) if episode else 0))
  ids = np.full((len(rows), width(fmt)), PAD, np.int32)
  weights = np.zeros((len(rows), width(fmt)), np.float32)
  for i, (tokens, start) in enumerate(rows):
    ids[i, :len(tokens)] = tokens
    weights[i, start - 1:len(tokens) - 1] = 1.0  # predicts tokens[start:]
  return {"ids": ids, "mask": (ids != PAD).astype(np.int32), "weights": weights}


def model_config() -> qwen2_5_vl.Qwen2_5_VLConfig:
  text = dict(cards_job.default_config().backbone.text)
  text["mrope_section"] = tuple(text["mrope_section"])
  vision = dataclasses.replace(qwen2_5_vl.Qwen2_5_VLConfig.tiny().vision,
                               out_hidden_size=text["hidden_size"])  # unused: text only
  return qwen2_5_vl.Qwen2_5_VLConfig(
      text=qwen2_5_vl.TextConfig(vocab_size=VOCAB, **text), vision=vision,
      tie_word_embeddings=False, image_token_id=28, video_token_id=29,
      vision_start_token_id=30, vision_end_token_id=31, bos_token_id=BOS,
      eos_token_id=(EOS,), pad_token_id=PAD)


def train_and_score(model, cfg, pool: np.ndarray, fresh: np.ndarray, fmt: str,
                    seed: int) -> dict:
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=_LR.value, warmup_steps=30, final_fraction=0.05,
                        weight_decay=0.01))
  tx = state_lib.make_optimizer(optimizer, _STEPS.value)
  params = qwen2_5_vl.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng([seed, len(pool)])
  params, losses = text_decoder.train(
      model, params, tx, lambda: batch(pool[rng.integers(0, len(pool), _BATCH.value)], fmt, rng),
      _STEPS.value, desc=f"{fmt}, {len(pool)} deals")
  seen = {tuple(sorted(d)) for d in pool}
  scored = {}
  for name, deals in (("fresh", fresh), ("train", pool[:len(fresh)])):
    wins = score(model, params, deals, fmt)
    scored[name] = float(np.mean(wins))
    if name == "fresh":
      known = np.array([tuple(sorted(d)) in seen for d in deals])
      scored["fresh_multiset_seen"] = float(known.mean())
      scored["fresh_solved_when_seen"] = float(wins[known].mean()) if known.any() else None
      scored["fresh_solved_when_unseen"] = float(wins[~known].mean()) if (~known).any() else None
  return {"format": fmt, "deals": len(pool), "final_loss": float(np.mean(losses[-50:])),
          **scored}


def score(model, params, deals: np.ndarray, fmt: str) -> np.ndarray:
  """Whether the greedy plan of each deal ends in a formula that solves it."""
  prompt = 6 + split_format(fmt)[1]  # +episode: nothing typed yet, then SEP
  ids = np.full((len(deals), width(fmt)), PAD, np.int32)
  ids[:, :prompt] = [[BOS, *[TOKEN[str(v)] for v in d], *[SEP] * (prompt - 5)] for d in deals]

  @jax.jit
  def next_token(ids, t):
    logits = model.apply({"params": params}, ids, (ids != PAD).astype(jnp.int32)).logits
    return jnp.argmax(logits[:, t - 1], -1)

  done = np.zeros(len(deals), bool)
  for t in range(prompt, width(fmt)):
    token = np.asarray(next_token(jnp.asarray(ids), t))
    ids[:, t] = np.where(done, PAD, token)
    done |= token == EOS
  names = {v: k for k, v in TOKEN.items()}
  wins = []
  for d, row in zip(deals, ids[:, prompt:]):
    symbols = []
    for token in row:
      if token == EOS or token == PAD:
        break
      symbols = [] if token == SEP else symbols + [names.get(int(token), "?")]
    wins.append("?" not in symbols and experts.is_solution(symbols, list(d), 24))
  return np.asarray(wins)


def main(argv):
  del argv
  cfg = model_config()
  model = qwen2_5_vl.Qwen2_5_VL(cfg)
  rng = np.random.default_rng(_SEED.value)
  fresh = arith.draw_solvable(rng, _EVAL.value)
  results = []
  for n in map(int, _DEALS.value):
    pool = arith.draw_solvable(np.random.default_rng([_SEED.value, n]), n)
    for fmt in _FORMATS.value:
      split_format(fmt)
      start = time.time()
      result = train_and_score(model, cfg, pool, fresh, fmt, _SEED.value)
      result["seconds"] = round(time.time() - start, 1)
      print(json.dumps(result))
      results.append(result)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "points24_plans.json"), "w") as f:
    json.dump({"steps": _STEPS.value, "batch": _BATCH.value, "lr": _LR.value,
               "seed": _SEED.value, "eval_deals": _EVAL.value, "results": results}, f, indent=2)
  lines = ["# Points24 plans from the card values alone (text, no frame)", "",
           f"A decoder of the cards job's sizes trained from scratch, {_STEPS.value} steps of "
           f"{_BATCH.value} deals (`python -m experiments.points24_plans`). Solved: the greedy "
           "plan's formula uses each value once and makes 24.", "",
           "| plan format | training deals | solved, fresh deals | multiset seen in training"
           " | solved when seen / unseen | solved, training deals | final loss |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"
  for r in results:
    lines.append(f"| {r['format']} | {r['deals']} | {pct(r['fresh'])} | "
                 f"{pct(r['fresh_multiset_seen'])} | {pct(r['fresh_solved_when_seen'])} / "
                 f"{pct(r['fresh_solved_when_unseen'])} | {pct(r['train'])} | "
                 f"{r['final_loss']:.3f} |")
  with open(os.path.join(_OUT.value, "points24_plans.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
