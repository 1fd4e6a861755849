r"""Where do a points game's warm-start episodes go wrong? Whole episodes, step by step.

  python -m experiments.cards_episodes --config configs/cards.py:points24 \
      --workdir W [--game points24] [--envs 64] [--max_steps 24]

`experiments.cards_grounding` scores one step; a Points24 win needs every step of the
episode right. This plays `--envs` fresh deals with the warm start (`sft`, temperature as
in training) until each has finished one episode (or `--max_steps`), and follows each
episode whose first plan ("Solution: F=24" in the thoughts) solves the deal:

  won                  the episode ends with the reward;
  formula misread      at some step the response restates the formula line ("current
                       formula") other than it is: the steps after it plan from a formula
                       that is not the frame's;
  plan changed         the thoughts plan another formula than the first step's;
  next symbol wrong    the thoughts name a "Next" symbol that is not the plan's symbol after
                       the formula typed so far;
  action off the plan  the action played is not the symbol the thoughts name next
                       ("Next: S");
  other                none of these at any step, and no win (e.g. cut at --max_steps).

Each episode gets the label of its earliest step where one of them happens (checked in
that order within a step).

Writes WORKDIR/<game>/cards_episodes.{md,json} (the JSON with every episode's steps).
"""

from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from latent_mca.cards.envs import POINTS_GAMES
from latent_mca.cards.grounding import formula_line, next_symbol, plan_solves, planned, truth
from latent_mca.rl import rollout as rollout_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards

OUTCOMES = ("won", "formula misread", "plan changed", "next symbol wrong",
            "action off the plan", "other")


def define_flags() -> None:
  """The command line's flags; defined when run as a script, not on import (tests import
  this module beside other experiments that define --config and --workdir)."""
  config_flags.DEFINE_config_file(
      "config", "configs/cards.py:points24", "The cards config the workdir was run with.")
  flags.DEFINE_string("workdir", None, "The cards job's workdir.", required=True)
  flags.DEFINE_string("game", "points24", "A points game of the workdir.")
  flags.DEFINE_integer("envs", 64, "Fresh deals, played at once.")
  flags.DEFINE_integer("max_steps", 24, "Steps before unfinished episodes are cut.")
  flags.DEFINE_integer("seed", 0, "Seed of the deals and the sampling.")


def play(actor, params, extra, envs: int, max_steps: int, seed: int) -> list[dict]:
  """Each environment's first episode: {"steps": [{"view", "response", "action"}], "won",
  "finished"}, played in lockstep from fresh deals."""
  rng = jax.random.key(seed)
  obs, state = actor.reset(jax.random.fold_in(rng, 0), envs)
  np_rng = np.random.default_rng(seed)
  episodes = [{"steps": [], "won": False, "finished": False} for _ in range(envs)]
  for t in tqdm(range(max_steps), desc="steps"):
    host = jax.device_get(state)
    views = [actor.env.describe(jax.tree.map(lambda x: x[i], host)) for i in range(envs)]
    act_rng, env_rng = jax.random.split(jax.random.fold_in(rng, t + 1))
    _, index, _, texts = actor.act(params, extra, obs, act_rng, np_rng)
    obs, state, _, done, info = actor.env_step(jax.random.split(env_rng, envs), state,
                                               jnp.asarray(index, jnp.int32))
    done, success = np.asarray(done), np.asarray(info["success"])
    for i, episode in enumerate(episodes):
      if episode["finished"]:
        continue  # step_autoreset dealt it a new deal: only the first episode counts
      episode["steps"].append({"view": views[i], "response": texts[i],
                               "action": actor.env.actions[index[i]]})
      episode["finished"], episode["won"] = bool(done[i]), bool(done[i] and success[i])
    if all(e["finished"] for e in episodes):
      break
  return episodes


def outcome(game: str, episode: dict) -> str | None:
  """`OUTCOMES`' label of an episode whose first plan solves its deal; None otherwise."""
  steps = episode["steps"]
  first = steps[0]
  plan = planned(first["response"])
  if not plan_solves(plan, truth(game, first["view"]), first["view"]["target"]):
    return None
  if episode["won"]:
    return "won"
  for step in steps:
    response, named = step["response"], next_symbol(step["response"])
    if not reads_formula(step):
      return "formula misread"
    if planned(response) != plan:
      return "plan changed"
    if named != plan_next(plan[0], step["view"]["formula"]):
      return "next symbol wrong"
    if step["action"] != named:
      return "action off the plan"
  return "other"


def reads_formula(step: dict) -> bool:
  """Whether the step's response restates the formula line as the frame shows it."""
  return formula_line(step["response"]) == "".join(step["view"]["formula"])


def plan_next(plan: list[str], typed: list[str]) -> str | None:
  """The symbol of `plan` after the formula `typed` so far ("=" once it is all typed), as
  the expert names it; None where `typed` has left the plan."""
  if list(typed) != plan[:len(typed)]:
    return None
  return plan[len(typed)] if len(typed) < len(plan) else "="


def summarize(game: str, episodes: list[dict]) -> dict:
  """Counts of `play`'s episodes: finished, won, first plan right, and each outcome."""
  labels = [outcome(game, e) for e in episodes]
  read = [reads_formula(s) for e in episodes for s in e["steps"] if s["view"]["formula"]]
  counts = collections.Counter(label for label in labels if label is not None)
  return {"episodes": len(episodes), "finished": sum(e["finished"] for e in episodes),
          "won": sum(e["won"] for e in episodes),
          "first_plan_solves": sum(label is not None for label in labels),
          "outcomes": {label: counts.get(label, 0) for label in OUTCOMES},
          "mean_steps": float(np.mean([len(e["steps"]) for e in episodes])),
          # every episode's steps after the first symbol: the formula line restated right
          "formula_read": float(np.mean(read)) if read else None}


def _share(value) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


def main(argv):
  del argv
  opts = flags.FLAGS
  if opts.game not in POINTS_GAMES:
    raise app.UsageError(f"--game must be one of {', '.join(POINTS_GAMES)}, got {opts.game!r}")
  if opts.game not in cards.games(opts.config):
    raise app.UsageError(f"{opts.game} is not one of the config's games "
                         f"({opts.config.games})")
  actor = cards.Actor(opts.config, opts.workdir, opts.game, rollout_lib.TOKEN)
  params, extra = actor.start_variables(opts.workdir, jax.random.key(0))
  episodes = play(actor, params, extra, opts.envs, opts.max_steps, opts.seed)
  summary = summarize(opts.game, episodes)
  out = os.path.join(opts.workdir, opts.game, "cards_episodes")
  backbone_lib.write_json(out + ".json", {"summary": summary, "episodes": episodes})
  lines = [f"# {opts.game}: the warm start's whole episodes", "",
           f"`python -m experiments.cards_episodes --workdir {opts.workdir} --game "
           f"{opts.game} --envs {opts.envs}`: the first episode on each of {opts.envs} fresh "
           "deals.", "",
           "Each episode whose first plan solves its deal is labelled by its earliest "
           "failure (see the module's docstring).", "",
           "| episodes | finished | won | first plan solves the deal | " +
           " | ".join(f"of those: {o}" if o == "won" else o for o in OUTCOMES) +
           " | mean steps | formula line restated right (steps after the first symbol) |",
           "|" + "---:|" * (6 + len(OUTCOMES)),
           "| " + " | ".join(str(summary[k]) for k in ("episodes", "finished", "won",
                                                        "first_plan_solves"))
           + " | " + " | ".join(str(summary["outcomes"][o]) for o in OUTCOMES)
           + f" | {summary['mean_steps']:.1f} | {_share(summary['formula_read'])} |", ""]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
