r"""Does the card agent read its frame? The numbers it writes against the state, per game.

  python -m experiments.cards_grounding --config configs/cards.py:all \
      --workdir workdirs/cards [--envs 128] [--chunk 64]

For each game of the cards job in WORKDIR, the warm start (`sft`), the latent policy
before PPO (`latent_bc`, once the latent stage has finished) and each finished PPO run act
once on `--envs` fresh deals (temperature as in training), `--chunk` at a time.
The response's fields that restate the frame are compared with the true state:
NumberLine's "current number" and "target number", the points games' "cards" (as a
multiset of values), Blackjack's hand and the dealer's up-card as its thoughts name
them. Alongside: how often the response restates the most frequent answer, which is what
a policy ignoring the image writes.

For the points games, the plan too: whether the "Solution: F=T" the thoughts begin with
is a solution of the deal (each card's value used once, F equal to the target), and
whether it is one of the cards the response restated (its arithmetic, whatever it read);
whether the response restates the formula line (empty at a deal's first step), and
whether the action played is the symbol its thoughts name next ("Next: S").

For NumberLine and Blackjack, where one action is right: how often the response restates
what the expert's action rests on (Blackjack's total, whether it is soft, and the
up-card's value: a 10 read as a king is no error there), how often the action played is
the expert's for the true state, and how often it is the expert's for the state the
response restated (the decision, whatever it read).

Writes WORKDIR/cards_grounding.{md,json} (the JSON with a few responses per row).
"""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from latent_mca.cards.envs import POINTS_GAMES
from latent_mca.cards.grounding import (ONE_RIGHT_ACTION, decided_on, expert_action,
                                        formula_line, next_symbol, plan_solves, planned,
                                        read_action, restated, truth)
from latent_mca.rl import rollout as rollout_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import checkpoint


def define_flags() -> None:
  """The command line's flags; defined when run as a script, not on import, so tests can
  import this module beside `experiments.run`, which also defines --config and --workdir."""
  config_flags.DEFINE_config_file(
      "config", "configs/cards.py:all", "The cards config the workdir was run with.")
  flags.DEFINE_string("workdir", None, "The cards job's workdir.", required=True)
  flags.DEFINE_integer("envs", 128, "Fresh deals per game and policy.")
  flags.DEFINE_integer(
      "chunk", 64, "Deals generated at once (256 at once ran out of 24 GiB on CPU).")


_EXAMPLES = 4  # responses kept in the JSON per row, beside the true state


def _act(params, extra, actor, chunk: int, size: int):
  """(texts, actions played, state views) of one chunk of fresh deals."""
  obs, state = actor.reset(jax.random.key(12345 + chunk), size)
  _, index, _, texts = actor.act(params, extra, obs, jax.random.key(1 + chunk),
                                 np.random.default_rng(chunk))
  host = jax.device_get(state)
  views = [actor.env.describe(jax.tree.map(lambda x: x[i], host)) for i in range(size)]
  return texts, [actor.env.actions[i] for i in index], views


def measure(game: str, params, extra, actor, envs: int, chunk_size: int) -> dict:
  """One game's row: a policy's first step on `envs` fresh deals, `chunk_size` at a time."""
  texts, played, views = [], [], []
  for chunk, start in enumerate(range(0, envs, chunk_size)):
    out = _act(params, extra, actor, chunk, min(chunk_size, envs - start))
    for acc, part in zip((texts, played, views), out):
      acc.extend(part)
  said = [restated(game, t) for t in texts]
  true = [truth(game, view) for view in views]
  common = collections.Counter(s for s in said if s is not None).most_common(1)
  plans = {}
  if game in POINTS_GAMES:
    target = views[0]["target"]
    plan = [planned(t) for t in texts]
    plans = {"plan_solves_deal": float(np.mean([plan_solves(p, t, target)
                                                for p, t in zip(plan, true)])),
             "plan_solves_restated": float(np.mean([plan_solves(p, s, target)
                                                    for p, s in zip(plan, said)])),
             "formula_correct": float(np.mean([formula_line(t) == "".join(v["formula"])
                                               for t, v in zip(texts, views)])),
             "plays_next": float(np.mean([a == next_symbol(t) for a, t in zip(played, texts)]))}
  actions = {}
  if game in ONE_RIGHT_ACTION:
    actions = {"reads_decided_on": float(np.mean([decided_on(game, s) == decided_on(game, t)
                                                  for s, t in zip(said, true)])),
               "expert_action": float(np.mean([a == expert_action(game, v)
                                               for a, v in zip(played, views)])),
               "expert_action_for_read": float(np.mean([a == read_action(game, s)
                                                        for a, s in zip(played, said)]))}
  return {"correct": float(np.mean([s == t for s, t in zip(said, true)])),
          **plans,
          **actions,
          "parsed": float(np.mean([s is not None for s in said])),
          "most_common": str(common[0][0]) if common else None,
          "most_common_share": common[0][1] / len(said) if common else 0.0,
          "deals": len(said),
          "examples": [{"response": t, "true": str(v)} for t, v in zip(texts[:_EXAMPLES], true)]}


def measure_workdir(config, workdir: str, envs: int, chunk_size: int) -> dict:
  """{"<game>/<policy>": `measure`'s row} for the warm start, the latent policy before PPO
  (where the latent stage finished) and each finished PPO run (of each game's own job
  where they are separate: `cards.jobs_of`)."""
  rows = {}
  for config, workdir in cards.jobs_of(config, workdir):
    rows.update(_measure_job(config, workdir, envs, chunk_size))
  return rows


def _measure_job(config, workdir: str, envs: int, chunk_size: int) -> dict:
  rows = {}
  for game in cards.games(config):
    for label, space, stage in (("sft", rollout_lib.TOKEN, None),
                                ("latent_bc", rollout_lib.LATENT, None),
                                ("ppo_token", rollout_lib.TOKEN, "ppo_token"),
                                ("ppo_latent", rollout_lib.LATENT, "ppo_latent")):
      stage_dir = os.path.join(workdir, game, stage or "")
      if stage is not None and not os.path.isfile(os.path.join(stage_dir, "result.json")):
        continue  # a PPO run that has not finished (or a workdir without PPO)
      actor = cards.Actor(config, workdir, game, space)
      try:
        params, extra = actor.start_variables(workdir, jax.random.key(0))
      except checkpoint.CheckpointNotFoundError:
        if label != "latent_bc":
          raise
        continue  # no finished latent model
      if stage is not None:
        abstract = jax.eval_shape(lambda: (params, extra))
        loaded = checkpoint.load_final(stage_dir, {"params": abstract[0], "extra": abstract[1]})
        params, extra = loaded["params"], loaded["extra"]
      rows[f"{game}/{label}"] = measure(game, params, extra, actor, envs, chunk_size)
  return rows


def _table(rows: dict, title: str, columns) -> list[str]:
  """A markdown table of `rows`, (header, key) per column: shares as %, "n/a" where a
  game has no such measure."""
  def cell(row, key):
    if key not in row:
      return "n/a"
    return f"{100 * row[key]:.1f}%" if isinstance(row[key], float) else str(row[key])

  lines = [f"## {title}", "", "| game / policy | " + " | ".join(h for h, _ in columns) + " |",
           "|---|" + "".join("---|" if key == "most_common" else "---:|" for _, key in columns)]
  lines += [f"| {name} | " + " | ".join(cell(row, key) for _, key in columns) + " |"
            for name, row in rows.items()]
  return lines + [""]


def main(argv):
  del argv
  opts = flags.FLAGS
  workdir = opts.workdir
  rows = measure_workdir(opts.config, workdir, opts.envs, opts.chunk)
  lines = ["# Do the card agents read their frames?", "",
           f"`python -m experiments.cards_grounding --workdir {workdir}`: one step on "
           f"{opts.envs} fresh deals per game and policy.", ""]
  lines += _table(rows, "What the response restates", (
      ("restates the frame correctly", "correct"), ("parses", "parsed"),
      ("most common restatement", "most_common"), ("its share", "most_common_share"),
      ("restates the formula line", "formula_correct"),
      ("restates what the action rests on", "reads_decided_on")))
  lines += _table(rows, "What it plans and plays", (
      ("plan solves the deal", "plan_solves_deal"),
      ("plan solves the restated cards", "plan_solves_restated"),
      ("plays the symbol its thoughts name next", "plays_next"),
      ("the expert's action", "expert_action"),
      ("the expert's action for what it restated", "expert_action_for_read")))
  with open(os.path.join(workdir, "cards_grounding.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  backbone_lib.write_json(os.path.join(workdir, "cards_grounding.json"), rows)
  print("\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
