r"""How well does the latent policy write the expert's tokens, beside the warm start?

  python -m experiments.cards_latent_fit --config configs/cards.py:points24 \
      --workdir workdirs/points24 [--batches 8] [--batch_size 16]

For each game of the cards job in WORKDIR, on `--batches` batches of that game's expert
responses (drawn with a seed the training loaders do not use; the transitions are the
training set's), teacher-forced, per response token:

  sft_accuracy        the warm start's next-token argmax accuracy (its own LM head);
  idm_accuracy        the world model's, fed the IDM's codes (which see the next token):
                      the most a latent policy can write with this world model;
  policy_accuracy     the world model's, fed the latent policy's argmax codes: the tokens
                      the latent policy writes (before PPO);
  bc_accuracy         the policy's argmax code == the IDM's (what BC trains; codes other
                      than the IDM's may decode to the same token);
and each of the three accuracies on the action's tokens alone (`*_accuracy_action`: the
JSON's "action" value, what the game reads).

Writes WORKDIR/cards_latent_fit.{md,json}.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from latent_mca.latent import steps as steps_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.stages import latent as latent_lib

_SEED_OFFSET = 1009  # the batches' seed: config.seed + this (training uses seed + 1)


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", "configs/cards.py:all", "The cards config the workdir was run with.")
  flags.DEFINE_string("workdir", None, "The cards job's workdir.", required=True)
  flags.DEFINE_integer("batches", 8, "Batches of expert responses per game.")
  flags.DEFINE_integer("batch_size", 16, "Responses per batch.")


def token_sums(system: steps_lib.LatentSystem, sft_params, params, extra, batch,
               action_mask) -> dict:
  """Summed hits of every measurement on one batch (see the module doc), and the counts."""
  targets, weights = steps_lib.step_targets(batch)
  # step t predicts token t + 1: the action's steps are those whose next token is the action's
  action = jnp.concatenate([action_mask[:, 1:], jnp.zeros_like(action_mask[:, :1])], 1)
  action = action.astype(jnp.float32) * weights

  def hits(logits):
    right = jnp.argmax(logits, -1) == targets
    return jnp.sum(right * weights), jnp.sum(right * action)

  sft = system.backbone.apply({"params": sft_params}, batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"],
                              image_grid_thw=batch["image_grid_thw"]).logits
  states = system.backbone_states(params[steps_lib.BACKBONE], batch)
  idm = system.infer_codes(params, extra, states, weights)[0].codes
  policy = steps_lib.policy_codes(system, params, states)

  out = {"count": jnp.sum(weights), "action_count": jnp.sum(action),
         "bc_correct": jnp.sum((policy == idm) * weights)}
  for name, logits in (("sft", sft),
                       ("idm", system.code_logits(params, extra, states.h, idm)),
                       ("policy", system.code_logits(params, extra, states.h, policy))):
    out[f"{name}_correct"], out[f"{name}_action_correct"] = hits(logits)
  return out


def _action_mask(layout, batch) -> np.ndarray:
  """[B, T]: the response tokens of the JSON's action value (`cards._span_masks`)."""
  p = layout.prompt_length
  tokens = np.asarray(batch["input_ids"][:, p:])
  mask = np.asarray(batch["attention_mask"][:, p:])
  _, action = cards._span_masks(layout.processor.tokenizer, tokens, mask)
  return np.concatenate([np.zeros((tokens.shape[0], p), np.float32), action], 1)


def _summary(sums: dict) -> dict:
  count, actions = max(float(sums["count"]), 1.0), max(float(sums["action_count"]), 1.0)
  out = {"bc_accuracy": float(sums["bc_correct"]) / count, "tokens": int(sums["count"]),
         "action_tokens": int(sums["action_count"])}
  for name in ("sft", "idm", "policy"):
    out[f"{name}_accuracy"] = float(sums[f"{name}_correct"]) / count
    out[f"{name}_accuracy_action"] = float(sums[f"{name}_action_correct"]) / actions
  return out


def measure(config, workdir: str, batches: int, batch_size: int) -> dict:
  """{game: summary} of the latent policy beside the warm start, per game (in each game's
  own job where they are separate: `cards.jobs_of`)."""
  out = {}
  for config_j, workdir_j in cards.jobs_of(config, workdir):
    out.update(_measure_job(config_j, workdir_j, batches, batch_size))
  return out


def _measure_job(config, workdir: str, batches: int, batch_size: int) -> dict:
  _, _, layout, model_cfg = cards._setup(config, workdir)
  system = steps_lib.LatentSystem.build(model_cfg, latent_lib.latent_config(config))
  fn = jax.jit(functools.partial(token_sums, system))
  out = {}
  for game in cards.games(config):
    folder = cards.warm_start_dir(config, workdir, game)
    sft_params = cards._sft_backbone(folder, model_cfg)
    params, extra = cards._latent_variables(folder, system, model_cfg)
    loader = cards._ExpertLoader(layout, [cards.ExpertData(config, workdir, game)], batch_size,
                                 config.seed + _SEED_OFFSET)
    total = None
    for _ in tqdm(range(batches), desc=game):
      batch = next(loader)
      sums = fn(sft_params, params, extra, batch, _action_mask(layout, batch))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    out[game] = _summary(total)
  return out


def write(workdir: str, result: dict) -> str:
  lines = ["# The latent policy's tokens beside the warm start's (teacher-forced, expert "
           "responses)", "",
           "Next-token accuracy (%), all response tokens / the action's tokens.", "",
           "| game | warm start (SFT) | world model, IDM codes | latent policy | "
           "BC (policy code = IDM's) | tokens (action) |",
           "|---|---:|---:|---:|---:|---:|"]
  for game, r in result.items():
    cells = [f"{100 * r[f'{n}_accuracy']:.1f} / {100 * r[f'{n}_accuracy_action']:.1f}"
             for n in ("sft", "idm", "policy")]
    lines.append(f"| {cards.TITLES[game]} | " + " | ".join(cells) +
                 f" | {100 * r['bc_accuracy']:.1f} | {r['tokens']} ({r['action_tokens']}) |")
  path = os.path.join(workdir, "cards_latent_fit.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  backbone_lib.write_json(os.path.join(workdir, "cards_latent_fit.json"), result)
  return path


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  result = measure(f.config, f.workdir, f.batches, f.batch_size)
  path = write(f.workdir, result)
  print(open(path).read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
