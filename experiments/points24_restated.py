r"""Does the warm start's response format stop a model of its size planning Points24? Text only.

  python -m experiments.points24_restated [--out results/points24_plans/restated]
      [--steps 300] [--batch 64] [--deals 450] [--variants restated,given,chat]
      [--eval 512] [--workdir W [--init reading [--from_reading all] [--shrink 1]]]

`experiments.points24_plans` showed that a decoder of the cards job's sizes plans Points24
from the four values given as tokens (31.4% of fresh deals: canonical plans, trained at
every step of the episode, 450 deals, 300 steps of 64), while the VLM warm starts plan 0%,
even of the cards they restated (results/cards_gpu_h100/points24_canonical_cpu/). Between
the two lie the frame and the format. This keeps the format and drops the frame: the
job's tokenizer (byte-level BPE trained on the prompts and the expert responses,
`tokenizer.vocab_size`), the job's backbone and SFT optimizer, and the expert's JSON
response at a uniformly random step of each deal's episode, loss on the response, as
the job's SFT trains it:

  {"cards": [5, 10, 8, 4], "current formula": "(4+8)*", "thoughts": "Solution:
   (4+8)*10/5=24. Next: 1", "action": "1"}

Prompts (the variants):
  restated  "Points24." alone: the values are only in the response's restatement, as
            for the VLM, whose frame is their only other source;
  given     "Points24. Cards: 5, 10, 8, 4.": the values in the prompt too, as
            `experiments.points24_plans` gives them;
  chat      the job's prompt, the reference's Points24 text in the chat template, its
            frame left out (no values; the response starts where the job's does).

Scored on `--eval` fresh solvable deals, drawn as the environment draws them, at the
first step: the response is forced up to `"thoughts": "Solution:` with the true cards
restated (a reading that is right), then decoded greedily; the plan counts when the
formula before "=24" uses each value once and makes 24 (`experts.is_solution`). Also
scored on as many of the training deals. Writes OUT/points24_restated.{json,md}.

`--workdir W` takes a Points24 cards job's tokenizer instead of training one, and
`--init=reading` starts from its reading stage's params, as the job's SFT does: the text
model then differs from the VLM warm start only by the frame. `--from_reading` takes only
some of its parameter groups (`config.sft.from_reading`: visual, embed_tokens, decoder,
lm_head), the rest fresh, to find which of them stop the plan. `--shrink s` < 1 starts
the language model (all but the vision tower) at s * reading + (1 - s) * fresh params
(shrink and perturb, Ash & Adams 2020), a known cure for a trained network that has lost
the plasticity to learn a new task.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import text_decoder
from latent_mca.cards import arith, envs, experts, prompts
from latent_mca.data.image_processing import ImageProcessorConfig
from latent_mca.data.processor import Processor
from latent_mca.data.tokenizers import IM_END, train_bpe_tokenizer
from latent_mca.jobs import cards as cards_job
from latent_mca.models import qwen2_5_vl
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import state as state_lib

VARIANTS = ("restated", "given", "chat")


def define_flags() -> None:
  """The command line's flags; defined when run as a script, not on import, so tests can
  import this module beside other experiments that define flags of the same names."""
  flags.DEFINE_string("out", "results/points24_plans/restated", "Where the results go.")
  flags.DEFINE_integer("steps", 300, "Training steps per run.")
  flags.DEFINE_integer("batch", 64, "Deals per step.")
  flags.DEFINE_integer("deals", 450, "Training pool size (deals).")
  flags.DEFINE_list("variants", list(VARIANTS), "Prompts (see the docstring).")
  flags.DEFINE_integer("eval", 512, "Fresh deals (and training deals) to score.")
  flags.DEFINE_integer("seed", 0, "Seed of the deals and the model.")
  flags.DEFINE_string(
      "workdir", None, "A Points24 cards job's workdir: its tokenizer instead of one trained "
      "here, and with --init=reading its reading stage's params as the start.")
  flags.DEFINE_enum("init", "scratch", ["scratch", "reading"],
                    "Start from fresh params, or from --workdir's reading stage.")
  flags.DEFINE_string("from_reading", "all", "With --init=reading, the parameter groups "
                      "taken from it (the job's config.sft.from_reading); the rest fresh.")
  flags.DEFINE_float("shrink", 1.0, "With --init=reading, start the language model (all but "
                     "the vision tower) at shrink * reading + (1 - shrink) * fresh: shrink "
                     "and perturb (Ash & Adams, 2020); 1 keeps the reading stage's params.")


PLAN = "canonical"  # the job's default expert plan
FORCED = '"thoughts": "Solution:'  # the response is forced up to here when scored
MAX_PLAN_TOKENS = 24  # the longest formula (15 symbols) and "=24", with room


def responses(values) -> list[str]:
  """The expert's responses at every step of the deal's episode (nothing typed .. all)."""
  values = [int(v) for v in values]
  solution = experts.planned_solution(values, 24, "+-*/", PLAN)
  return [experts.expert_response("points24", {"values": values, "target": 24,
                                               "formula": solution[:k]}, PLAN)[0]
          for k in range(len(solution) + 1)]


def prompt(values, variant: str, tokenizer) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; the variants are {', '.join(VARIANTS)}")
  if variant == "chat":
    messages = [{"role": "user", "content": [{"type": "text",
                                              "text": prompts.prompt("points24")}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  cards = ", ".join(str(int(v)) for v in values)
  return "Points24." + (f" Cards: {cards}." if variant == "given" else "")


def first_step_prefix(values) -> str:
  """The first response up to `FORCED`: the true cards restated, nothing typed."""
  text = responses(values)[0]
  return text[:text.index(FORCED) + len(FORCED)]


def planned(text: str) -> list[str] | None:
  """The formula's symbols between "Solution:" and "=24" of a decoded plan, else None."""
  match = re.match(r"\s*([0-9+\-*/() ]*)=24", text)
  return re.findall(r"10|[1-9]|[-+*/()]", match.group(1)) if match else None


class Examples:
  """Token ids of each training deal's prompt and its responses at every step."""

  def __init__(self, tokenizer, pool: np.ndarray, variant: str):
    self.tokenizer, self.im_end = tokenizer, tokenizer.convert_tokens_to_ids(IM_END)
    encode = lambda s: tokenizer(s)["input_ids"]
    self.rows = [(encode(prompt(d, variant, tokenizer)),
                  [encode(r + IM_END) for r in responses(d)]) for d in pool]
    self.width = max(len(p) + max(map(len, rs)) for p, rs in self.rows)

  def batch(self, index: np.ndarray, rng: np.random.Generator) -> dict:
    """Each deal at a random step: ids, attention mask, loss weights on the response."""
    ids = np.full((len(index), self.width), self.tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    weights = np.zeros(ids.shape, np.float32)
    for row, i in enumerate(index):
      head, steps = self.rows[i]
      body = steps[rng.integers(0, len(steps))]
      n = len(head) + len(body)
      ids[row, :n], mask[row, :n] = head + body, 1
      weights[row, len(head) - 1:n - 1] = 1.0  # predicts the response's tokens
    return {"ids": ids, "mask": mask, "weights": weights}


def build_tokenizer(pool: np.ndarray):
  """The job's tokenizer trained as the job trains it: the games' prompts and every
  expert response (here the pool's), at `tokenizer.vocab_size`."""
  texts = [prompts.prompt(g) for g in envs.GAMES] + [r for d in pool for r in responses(d)]
  texts += [prompt(d, "given", None) for d in pool]
  size = cards_job.default_config().tokenizer.vocab_size
  return train_bpe_tokenizer(texts, vocab_size=size)


def run(variant: str, tokenizer, model_cfg, pool: np.ndarray, fresh: np.ndarray, seed: int,
        steps: int, batch_size: int, params=None) -> dict:
  """Trains a model (fresh, or from `params`) on the pool's expert responses and scores
  its first-step plans on `fresh` and on as many of the pool's deals."""
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  examples = Examples(tokenizer, pool, variant)
  optimizer = cards_job.default_config().sft.optimizer
  tx = state_lib.make_optimizer(optimizer, steps)
  if params is None:
    params = qwen2_5_vl.init_params(model_cfg, jax.random.key(seed))
  rng = np.random.default_rng([seed, len(pool)])
  params, losses = text_decoder.train(
      model, params, tx, lambda: examples.batch(rng.integers(0, len(pool), batch_size), rng),
      steps, desc=variant)
  out = {"variant": variant, "deals": len(pool), "final_loss": float(np.mean(losses[-50:]))}
  for name, deals in (("fresh", fresh), ("train", pool[:len(fresh)])):
    wins, texts = score(model, params, tokenizer, deals, variant)
    out[name] = float(np.mean(wins))
    out[f"{name}_examples"] = [f"{tuple(int(v) for v in d)}: Solution:{t}"
                               for d, t in zip(deals[:4], texts[:4])]
  return out


def shrink_perturb(params: dict, fresh: dict, shrink: float) -> dict:
  """Each language-model group (all but "visual") at shrink * params + (1 - shrink) *
  fresh; the vision tower as it is."""
  return {group: value if group == "visual" else jax.tree.map(
      lambda p, f: shrink * p + (1.0 - shrink) * f, value, fresh[group])
          for group, value in params.items()}


def score(model, params, tokenizer, deals: np.ndarray, variant: str):
  """(whether each deal's greedy first-step plan solves it, the decoded plans)."""
  encode = lambda s: tokenizer(s)["input_ids"]  # prompt and response apart, as trained
  heads = [encode(prompt(d, variant, tokenizer)) + encode(first_step_prefix(d))
           for d in deals]
  width = max(map(len, heads)) + MAX_PLAN_TOKENS
  pad = tokenizer.pad_token_id
  ids = np.full((len(deals), width), pad, np.int32)
  for row, head in enumerate(heads):
    ids[row, :len(head)] = head
  ends = np.array([len(h) for h in heads])

  @jax.jit
  def next_tokens(ids, ends):
    logits = model.apply({"params": params}, ids, (ids != pad).astype(jnp.int32)).logits
    return jnp.argmax(jnp.take_along_axis(logits, (ends - 1)[:, None, None], 1)[:, 0], -1)

  for _ in range(MAX_PLAN_TOKENS):  # right-padded: each row appends at its own end
    token = np.asarray(next_tokens(jnp.asarray(ids), jnp.asarray(ends)))
    ids[np.arange(len(deals)), ends] = token
    ends = ends + 1
  texts = [tokenizer.decode(row[len(h):], skip_special_tokens=True)
           for row, h in zip(ids, heads)]
  wins = []
  for d, text in zip(deals, texts):
    symbols = planned(text)
    wins.append(symbols is not None and experts.is_solution(symbols, [int(v) for v in d], 24))
  return np.asarray(wins), texts


def main(argv):
  del argv
  opts = flags.FLAGS
  rng = np.random.default_rng(opts.seed)
  fresh = arith.draw_solvable(rng, opts.eval)
  pool_rng = np.random.default_rng([opts.seed, opts.deals])
  pool = arith.draw_solvable(pool_rng, opts.deals)
  config = cards_job.default_config()
  if opts.workdir:
    processor = cards.load_processor(config, opts.workdir)
    tokenizer = processor.tokenizer
  else:
    tokenizer = build_tokenizer(pool)
    area = config.image_size ** 2
    processor = Processor(tokenizer, image_config=ImageProcessorConfig(min_pixels=area,
                                                                       max_pixels=area))
  model_cfg = backbone_lib.model_config(config, processor)
  params = None
  if opts.init == "reading":
    if not opts.workdir:
      raise app.UsageError("--init=reading needs --workdir")
    if not os.path.isdir(os.path.join(opts.workdir, cards.READING)):
      raise app.UsageError(f"{opts.workdir} has no reading stage ({cards.READING}/)")
    config.sft.from_reading = opts.from_reading
    params = cards.sft_start_params(config, opts.workdir, model_cfg)
    if not 0.0 <= opts.shrink <= 1.0:
      raise app.UsageError(f"--shrink must be in [0, 1], got {opts.shrink}")
    if opts.shrink < 1.0:
      params = shrink_perturb(params, qwen2_5_vl.init_params(model_cfg,
                                                             jax.random.key(opts.seed + 1)),
                              opts.shrink)
  results = []
  for variant in opts.variants:
    prompt((1, 2, 3, 4), variant, tokenizer)  # an unknown variant fails before training
  for variant in opts.variants:
    start = time.time()
    result = run(variant, tokenizer, model_cfg, pool, fresh, opts.seed, opts.steps,
                 opts.batch, params)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))
    results.append(result)
  os.makedirs(opts.out, exist_ok=True)
  with open(os.path.join(opts.out, "points24_restated.json"), "w") as f:
    json.dump({"steps": opts.steps, "batch": opts.batch, "deals": opts.deals,
               "seed": opts.seed, "eval_deals": opts.eval, "tokenizer": len(tokenizer),
               "workdir": opts.workdir, "init": opts.init,
               "from_reading": opts.from_reading if opts.init == "reading" else None,
               "shrink": opts.shrink if opts.init == "reading" else None,
               "results": results}, f, indent=2)
  start = (f"the reading stage ({opts.from_reading}; the rest fresh)" if opts.init == "reading"
           else "scratch")
  lines = ["# Points24 plans in the warm start's JSON format (text, no frame)", "",
           f"The cards job's backbone, tokenizer and SFT optimizer, {opts.steps} steps of "
           f"{opts.batch} deals from a pool of {opts.deals}, each at a random step of its "
           f"episode, from {start}"
           f"{f', the tokenizer of {opts.workdir}' if opts.workdir else ''} "
           "(`python -m experiments.points24_restated`). Solved: the greedy "
           "first-step plan, after the true cards restated, uses each value once and "
           "makes 24.", "",
           "| prompt | solved, fresh deals | solved, training deals | final loss |",
           "|---|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['variant']} | {100 * r['fresh']:.1f}% | {100 * r['train']:.1f}% | "
                 f"{r['final_loss']:.3f} |")
  with open(os.path.join(opts.out, "points24_restated.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
