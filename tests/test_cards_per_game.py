"""Per-game settings of the cards job (`config.per_game`, `stages.cards.game_config`)."""

import json
import os

import pytest

from configs import cards as cards_configs
from latent_mca.config_schema import ConfigError
from latent_mca.jobs import cards as cards_job
from latent_mca.stages import cards


def _per_game(config, game: str, **sections):
  config = config.copy_and_resolve_references()
  config.per_game[game] = sections
  return config


def test_a_game_without_settings_takes_the_config_itself():
  config = cards_configs.get_config("all")
  assert cards.game_config(config, "points24") is config


def test_a_games_settings_replace_the_jobs_in_a_copy_for_that_game_alone():
  config = cards_configs.get_config("all")
  config.warm_start = cards.PER_GAME
  config = _per_game(config, "points24", sft=dict(num_steps=7, optimizer=dict(
      learning_rate=5e-4)), ppo=dict(learning_rate=1e-5))
  cards.check_per_game(config)
  points24 = cards.game_config(config, "points24")
  assert (points24.sft.num_steps, points24.sft.optimizer.learning_rate,
          points24.ppo.learning_rate) == (7, 5e-4, 1e-5)
  assert points24.sft.batch_size == config.sft.batch_size  # the rest is the job's
  assert points24.sft.optimizer.warmup_steps == config.sft.optimizer.warmup_steps
  assert (config.sft.num_steps, config.ppo.learning_rate) == (600, 1e-4)  # not touched
  assert cards.game_config(config, "blackjack") is config
  assert cards.warm_start_config(config, ["points24"]).sft.num_steps == 7
  shared = config.copy_and_resolve_references()
  shared.warm_start = cards.SHARED
  assert cards.warm_start_config(shared, ["points24", "blackjack"]) is shared


def test_the_gpu_config_gives_points24_its_recipe_and_the_others_the_jobs():
  gpu = cards_configs.get_config("gpu")
  cards.check_per_game(gpu)
  points24 = cards.game_config(gpu, "points24")
  recipe = cards_configs.get_config("points24")
  for section in ("expert", "latent_bc", "ppo"):
    assert points24[section] == recipe[section], section
  assert points24.latent_bc.num_steps == 1000 != gpu.latent_bc.num_steps
  for field in ("num_steps", "from_reading", "reading_every", "reading_formula_symbols"):
    assert points24.sft[field] == recipe.sft[field], field
  assert points24.sft.batch_size == gpu.sft.batch_size == 32  # the GPU's budget otherwise
  for game in ("numberline", "ezpoints", "blackjack"):
    assert cards.game_config(gpu, game) is gpu


@pytest.mark.parametrize("game,sections,message", [
    ("poker", dict(ppo=dict(learning_rate=1e-5)), "config.per_game.poker: no such game"),
    ("points24", dict(env=dict(solvable_only=False)),
     "config.per_game.points24.env: only expert, reading, sft, latent_idm, latent_bc, ppo"),
    ("points24", dict(reading=dict(steps=3)),
     "config.per_game.points24.reading: the games share one reading stage unless each is a "
     "job of its own; use --config.warm_start=separate"),
    ("points24", dict(ppo=dict(learning_rat=1e-5)),
     r"per_game.points24.ppo.learning_rat: no such field \(that group has .*learning_rate"),
    ("points24", dict(sft=dict(optimizer=3)), "per_game.points24.sft.optimizer overrides a "
     "group"),
    ("blackjack", dict(sft=dict(num_steps=3)), "one shared warm start"),
])
def test_bad_per_game_settings_are_config_errors_naming_them(tmp_path, game, sections,
                                                             message):
  config = cards_configs.get_config("smoke")
  if game != "blackjack":
    config.warm_start = cards.PER_GAME
  config = _per_game(config, game, **sections)
  with pytest.raises(ConfigError, match=message):
    cards_job.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_a_game_of_its_own_takes_its_own_reading_stage():
  config = cards_configs.get_config("cpu")
  config.per_game.blackjack = dict(reading=dict(steps=3000))
  cards.check_per_game(config)
  assert cards.separate_config(config, "blackjack").reading.steps == 3000
  assert cards.separate_config(config, "ezpoints").reading.steps == 1200


def test_a_per_game_value_out_of_range_names_the_game(tmp_path):
  config = cards_configs.get_config("smoke")
  config.warm_start = cards.PER_GAME
  config = _per_game(config, "blackjack", sft=dict(reading_every=1))
  with pytest.raises(ConfigError, match="with config.per_game.blackjack's values: "
                     "config.sft.reading_every must be 0"):
    cards_job.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_a_job_trains_evaluates_and_reports_each_game_with_its_own_settings(tmp_path):
  """numberline at the smoke sizes; blackjack with fewer expert transitions, SFT steps and
  PPO updates of its own: each stage's outputs show which it ran with."""
  config = cards_configs.get_config("smoke")
  config.update(dict(games="numberline,blackjack", warm_start=cards.PER_GAME,
                     stages="expert,tokenizer,reading,sft,eval_sft,ppo_token,report"))
  config.reading.update(dict(glyph_steps=0, steps=0))
  config.sft.update(dict(num_steps=4, log_every=1))
  config = _per_game(config, "blackjack", expert=dict(transitions=8),
                     sft=dict(num_steps=2), ppo=dict(num_updates=1, lr_decay_updates=1))
  workdir = str(tmp_path)
  cards_job.run(config, workdir)
  transitions = {g: json.load(open(os.path.join(workdir, "expert", f"{g}.json")))
                 ["transitions"] for g in ("numberline", "blackjack")}
  assert transitions == {"numberline": 16, "blackjack": 8}
  steps = {g: [json.loads(line)["step"] for line in
               open(os.path.join(workdir, g, "sft", "metrics.jsonl"))][-1]
           for g in ("numberline", "blackjack")}
  assert steps == {"numberline": 4, "blackjack": 2}
  updates = {g: json.load(open(os.path.join(workdir, g, "ppo_token", "result.json")))
             ["updates"] for g in ("numberline", "blackjack")}
  assert updates == {"numberline": 2, "blackjack": 1}
  table = open(os.path.join(workdir, "cards_results.md")).read()
  assert ("(`config.per_game`): Blackjack: expert.transitions=8, ppo.lr_decay_updates=1, "
          "ppo.num_updates=1, sft.num_steps=2.") in table
  # a second run with the same settings reuses every game's outputs
  assert cards_job.run(config, workdir)["blackjack/ppo_token/success_rate"] == json.load(
      open(os.path.join(workdir, "blackjack", "ppo_token", "eval.json")))["success_rate"]
