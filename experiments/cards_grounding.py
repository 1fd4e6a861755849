r"""Does the card agent read its frame? The numbers it writes against the state, per game.

  python -m experiments.cards_grounding --config configs/cards.py:all \
      --workdir workdirs/cards [--envs 128]

For each game of the cards job in WORKDIR, the warm start (`sft`) and each finished PPO
run act once on `--envs` fresh deals (temperature as in training). The response's
fields that restate the frame are compared with the true state: NumberLine's
"current number" and "target number", the points games' "cards" (as a multiset of
values). Alongside: how often the response restates the most frequent answer, which is
what a policy ignoring the image writes. For the points games, the plan too: whether the
"Solution: F=T" the thoughts begin with is a solution of the deal (each card's value used
once, F equal to the target), and whether it is one of the cards the response restated
(its arithmetic, whatever it read). Writes WORKDIR/cards_grounding.{md,json}.
"""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from latent_mca.cards.envs import POINTS_GAMES
from latent_mca.cards.grounding import plan_solves, planned, restated, truth
from latent_mca.rl import rollout as rollout_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/cards.py:all", "The cards config the workdir was run with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The cards job's workdir.", required=True)
_ENVS = flags.DEFINE_integer("envs", 128, "Fresh deals per game and policy.")


def measure(game: str, params, extra, actor) -> dict:
  obs, state = actor.reset(jax.random.key(12345), _ENVS.value)
  _, _, _, texts = actor.act(params, extra, obs, jax.random.key(1), np.random.default_rng(0))
  host = jax.device_get(state)
  said = [restated(game, t) for t in texts]
  views = [actor.env.describe(jax.tree.map(lambda x: x[i], host)) for i in range(len(texts))]
  true = [truth(game, view) for view in views]
  common = collections.Counter(s for s in said if s is not None).most_common(1)
  plans = {}
  if game in POINTS_GAMES:
    target = views[0]["target"]
    plan = [planned(t) for t in texts]
    plans = {"plan_solves_deal": float(np.mean([plan_solves(p, t, target)
                                                for p, t in zip(plan, true)])),
             "plan_solves_restated": float(np.mean([plan_solves(p, s, target)
                                                    for p, s in zip(plan, said)]))}
  return {"correct": float(np.mean([s == t for s, t in zip(said, true)])),
          **plans,
          "parsed": float(np.mean([s is not None for s in said])),
          "most_common": str(common[0][0]) if common else None,
          "most_common_share": common[0][1] / len(said) if common else 0.0,
          "deals": len(said)}


def main(argv):
  del argv
  workdir = _WORKDIR.value
  config = _CONFIG.value
  rows = {}
  for game in cards.games(config):
    if game == "blackjack":
      continue  # its responses restate totals, not a checkable reading of every card
    for label, space, stage in (("sft", rollout_lib.TOKEN, None),
                                ("ppo_token", rollout_lib.TOKEN, "ppo_token"),
                                ("ppo_latent", rollout_lib.LATENT, "ppo_latent")):
      stage_dir = os.path.join(workdir, game, stage or "")
      if stage is not None and not os.path.isfile(os.path.join(stage_dir, "result.json")):
        continue  # a PPO run that has not finished (or a workdir without PPO)
      actor = cards.Actor(config, workdir, game, space)
      params, extra = actor.start_variables(workdir, jax.random.key(0))
      if stage is not None:
        abstract = jax.eval_shape(lambda: (params, extra))
        loaded = checkpoint.load_final(stage_dir, {"params": abstract[0], "extra": abstract[1]})
        params, extra = loaded["params"], loaded["extra"]
      rows[f"{game}/{label}"] = measure(game, params, extra, actor)
  lines = ["# Do the card agents read their frames?", "",
           f"`python -m experiments.cards_grounding --workdir {workdir}`: one step on "
           f"{_ENVS.value} fresh deals per game and policy.", "",
           "| game / policy | restates the frame correctly | parses | most common restatement "
           "| its share | plan solves the deal | plan solves the restated cards |",
           "|---|---:|---:|---|---:|---:|---:|"]
  pct = lambda r, key: f"{100 * r[key]:.1f}%" if key in r else "n/a"
  for name, r in rows.items():
    lines.append(f"| {name} | {pct(r, 'correct')} | {pct(r, 'parsed')} | {r['most_common']} | "
                 f"{pct(r, 'most_common_share')} | {pct(r, 'plan_solves_deal')} | "
                 f"{pct(r, 'plan_solves_restated')} |")
  with open(os.path.join(workdir, "cards_grounding.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  backbone_lib.write_json(os.path.join(workdir, "cards_grounding.json"), rows)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
