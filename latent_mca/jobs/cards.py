"""The card-games job: chain-of-thought PPO on NumberLine, EZPoints, Points24 and Blackjack.

`config.stages` lists the stages of `latent_mca.stages.cards` to run, in order (all of
them by default: expert data, tokenizer, reading pretraining, SFT warm start, its
evaluation, the latent action model, PPO in token and latent space, the report). Every
stage writes under the workdir and reuses what a previous run finished.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging

from latent_mca.cards import experts
from latent_mca.config_schema import ConfigError, write_config
from latent_mca.jobs import pipeline
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.rl import ppo
from latent_mca.stages import cards
from latent_mca.stages import latent
from latent_mca.training import precision
from latent_mca.training.state import optimizer_config


def default_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of the cards job: the reference's PPO settings (SPEC section 4)."""
  c = ml_collections.ConfigDict()
  c.job = "cards"
  c.stages = cards.ALL_STAGES
  c.games = "numberline,ezpoints,points24,blackjack"
  c.seed = 0
  # "shared": one warm start (sft, latent model) on every listed game; "per_game": one per
  # game, in workdir/<game>/, as the reference trains one model per task
  # (`stages.cards.warm_starts`).
  c.warm_start = cards.SHARED
  c.env = ml_collections.ConfigDict(dict(solvable_only=True))  # Points24: solvable deals only
  c.image_size = 168  # the frames' side fed to the model (the games render 300x300)
  c.max_new_tokens = 72  # response tokens per step (the experts' longest: 66; the reference: 256)
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1024))
  c.backbone = pipeline.default_config().backbone
  # The mesh of acting and of the PPO learner (by default every device data-parallel) and the
  # logical-axis rules (`latent_mca.parallel.mesh`); the model's numerics
  # (`latent_mca.training.precision`), as the pipeline's.
  c.mesh = mesh_lib.mesh_config()
  c.precision = precision.precision_config()
  # per game; plan: the points games' plan in the thoughts, "canonical" (one per multiset
  # of values) or "deal" (by card order, as results/cards_* were made; `cards.experts`);
  # noise: the share of steps that play a random legal action (never a points game's "=")
  # instead of the expert's, whose response for the state is still what is saved (DART):
  # states off the expert's plan, e.g. formula lines that are no prefix of it; 0: off.
  c.expert = ml_collections.ConfigDict(dict(transitions=2048, num_envs=64, plan="canonical",
                                            noise=0.0))
  sft_optimizer = optimizer_config()
  sft_optimizer.update(dict(learning_rate=2e-3, warmup_steps=30, final_fraction=0.05,
                            weight_decay=0.01))
  # counterfactual_cards: the share of Points24 first-step rows swapped for the expert's
  # response to another deal, its restated cards out of the loss, so the plan must follow
  # the restatement, not the frame (`stages.cards.counterfactual_cards`); 0: off.
  # from_reading: the parameter groups SFT takes from the reading stage, "all" or a comma
  # list of visual, embed_tokens, decoder (decoder:K: its lowest K layers), lm_head; the
  # others start fresh (`stages.cards.sft_start_params`). reading_every: every that
  # many-th of the num_steps batches is one of the games' readings on fresh frames (the
  # reading stage's rows, config.reading.batch_size of them), the rest expert responses;
  # 0: none (`stages.cards._MixedLoader`). reading_formula_symbols: the points games'
  # formulas in those rows, as reading.formula_symbols; -1: the reading stage's value.
  c.sft = ml_collections.ConfigDict(dict(num_steps=600, batch_size=16, optimizer=sft_optimizer,
                                         checkpoint_every=200, log_every=25,
                                         counterfactual_cards=0.0, from_reading="all",
                                         reading_every=0, reading_formula_symbols=-1))
  # Reading pretraining (`stages.cards.reading`): glyph_steps of one centred symbol whose
  # glyph shrinks from glyph_scale times NumberLine's size to NumberLine's over 2/3 of them,
  # then `steps` of the games' readings (one game per step in turn); eval_frames held-out
  # frames per game for the value tokens' accuracy. 0 + 0 steps: off (as
  # results/cards_cpu was made; results/cards_cpu_reading with these defaults).
  # formula_symbols: 0, the points games' frames are 0..4 uniformly random actions after a
  # deal (formulas of at most 4 symbols); N > 0, random legal formulas of 0..N symbols
  # (`reading.random_states`), in the stage's rows and in sft.reading_every's.
  reading_optimizer = optimizer_config()
  reading_optimizer.update(dict(learning_rate=2e-3, warmup_steps=30, final_fraction=0.05,
                                weight_decay=0.01))
  c.reading = ml_collections.ConfigDict(dict(
      glyph_steps=300, steps=1200, glyph_scale=4.0, batch_size=16, optimizer=reading_optimizer,
      checkpoint_every=200, log_every=25, eval_frames=64, formula_symbols=0))
  c.latent = latent.latent_defaults()
  c.latent_idm = latent.stage_defaults(200, 16, 0, 1e-3, "inverse_warmup", warmup_steps=20)
  c.latent_bc = latent.stage_defaults(200, 16, 0, 1e-3, "policy_bc", warmup_steps=20)
  for stage in (c.latent_idm, c.latent_bc):
    for unused in ("seq_len", "eval_every", "eval_examples"):
      del stage[unused]
  # success over the last `episodes` episodes (1000 for Blackjack), as the reference counts
  c.eval = ml_collections.ConfigDict(dict(episodes=200, blackjack_episodes=1000, num_envs=64))
  # PPO: RL4VLM's settings (`rl.ppo.PPOConfig`: clip 0.1, value clip 0.1, value coef 0.5,
  # gamma 0.9, GAE lambda 0.95, 4 epochs, temperature 0.2, thought coef 0.5, Adam lr 1e-5
  # cosine to 1e-9, gradient norm 0.01), at CPU sizes: 16 environments x 8 steps per update
  # (the reference: 1 x 512-1024), minibatches of 32 (the reference: 128), 4 updates (the
  # reference: 14-29). value_clip or ratio_guard <= 0 turns that clip off; trainable ""
  # is the action space's default (`cards.agent.TRAINABLE`).
  c.ppo = ml_collections.ConfigDict({
      f.name: f.default for f in dataclasses.fields(ppo.PPOConfig) if f.name != "max_new_tokens"})
  c.ppo.update(dict(num_envs=16, num_steps=8, minibatch_size=32, num_updates=4,
                    lr_decay_updates=4, latent_top_k=32, trainable=("",)))
  # {game: {section: {field: value}}}: one game's expert, sft, latent_idm, latent_bc or ppo
  # values in place of the ones above (sft and latent_* not with warm_start=shared; reading
  # with warm_start=separate only; `stages.cards.game_config`), e.g. `gpu`'s
  # per_game.points24 (`points24_recipe`).
  c.per_game = ml_collections.ConfigDict()
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.stages` in order; returns the metrics of all of them."""
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in cards.STAGES]
  if unknown:
    raise ConfigError(f"config.stages: unknown stage(s) {unknown}; known: "
                      f"{', '.join(cards.STAGES)}")
  cards.games(config)  # a bad games list fails before any work
  cards.check_warm_start(config)
  cards.check_per_game(config)
  _check(config)
  for game in cards.games(config):
    game_config = cards.game_config(config, game)
    if game_config is not config:  # the game has settings of its own
      try:
        _check(game_config)
      except ConfigError as e:
        raise ConfigError(f"with config.per_game.{game}'s values: {e}") from None
  if config.warm_start == cards.SEPARATE:
    return _run_separately(config, workdir, stages)
  metrics = {}
  for stage in stages:
    logging.info("cards stage %s", stage)
    metrics.update(cards.STAGES[stage](config, workdir))
  return metrics


def _run_separately(config: ml_collections.ConfigDict, workdir: str, stages: list[str]) -> dict:
  """warm_start="separate": each game's job (`cards.separate_config`, its config written to
  workdir/<game>/config.json) in workdir/<game>/, its metrics under "<game>/", then the
  report over them all."""
  metrics = {}
  for game_config, folder in cards.jobs_of(config, workdir):
    game = game_config.games
    os.makedirs(folder, exist_ok=True)
    if jax.process_index() == 0:
      write_config(game_config, folder)
    logging.info("cards: %s, a job of its own in %s", game, folder)
    for key, value in run(game_config, folder).items():
      metrics[key if key.startswith(f"{game}/") else f"{game}/{key}"] = value
  if "report" in stages:
    metrics.update(cards.STAGES["report"](config, workdir))
  return metrics


def _check(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first field of `config` out of its range."""
  if not 0.0 <= config.sft.counterfactual_cards <= 1.0:
    raise ConfigError(f"config.sft.counterfactual_cards must be a share in [0, 1], got "
                      f"{config.sft.counterfactual_cards}")
  cards.reading_groups(config)
  if config.sft.reading_every < 0 or config.sft.reading_every == 1:
    raise ConfigError(f"config.sft.reading_every must be 0 (no reading batches) or >= 2 (one "
                      f"in that many batches), got {config.sft.reading_every}")
  cards.check_expert_counts(config)
  if config.expert.plan not in experts.PLANS:
    raise ConfigError(f"config.expert.plan: unknown plan {config.expert.plan!r}; the plans "
                      f"are {', '.join(experts.PLANS)}")
  cards.check_reading_config(config)


def gpu_budget(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Gives `c` (in place; also returned) a GPU's budget for the warm start: 4096 expert
  transitions per game, 1000 glyph and 8000 reading steps at batch 32, then one warm start
  per game (`warm_start=per_game`), each 2000 SFT steps at batch 32 (the defaults are
  2048, 300 + 1200 at 16 and one shared warm start of 600 steps at 16: what 2 CPU cores
  run in a few hours). PPO and the latent model keep their sizes (per game)."""
  c.warm_start = cards.PER_GAME
  c.expert.transitions = 4096
  c.reading.update(dict(glyph_steps=1000, steps=8000, batch_size=32))
  c.sft.update(dict(num_steps=2000, batch_size=32))
  return c


def points24_recipe() -> ml_collections.ConfigDict:
  """The Points24 settings ({section: {field: value}}) whose warm start wins above the
  reference on 2 CPU cores (results/points24_plans/README.md): 32768 expert transitions,
  4000 SFT steps of which every second is a reading batch whose points-game frames show
  formulas of 0..15 symbols (the reading stage keeps its short ones), SFT taking only the
  vision tower from the reading stage, 1000 latent BC steps (at 200 the latent policy
  wins 2.0% before PPO, at 1000 5.0%) and PPO at the reference's learning rate 1e-5.
  configs/cards.py:points24 is the defaults with them; `gpu` sets them as
  per_game.points24."""
  return ml_collections.ConfigDict(dict(
      expert=dict(transitions=32768),
      sft=dict(num_steps=4000, from_reading="visual", reading_every=2,
               reading_formula_symbols=15),
      latent_bc=dict(num_steps=1000),
      ppo=dict(learning_rate=1e-5)))


# The reading stage of a job of one game alone on 2 CPU cores (`numberline_recipe`,
# `blackjack_recipe`): 1000 glyph steps, then 4000 reading steps at batch 16, about as many
# frames of that game as the H100 four-game job's reading stage had (1000 + 8000 at 32 over
# four games), which read every game's values on all held-out frames.
ALONE_READING = dict(glyph_steps=1000, steps=4000)


def numberline_recipe() -> ml_collections.ConfigDict:
  """The NumberLine settings ({section: {field: value}}) for a job of NumberLine alone on 2
  CPU cores: with the defaults' reading stage (300 + 1200 steps) the model reads the
  numbers' tokens on 79% of held-out frames, its warm start restates both numbers right on
  45% of fresh deals (`cards_grounding`; the action it plays is the expert's for what it
  restated on 100%) and wins 85.0% after SFT, below the reference's 89.4
  (results/cards_cpu_separate/numberline_defaults/). These give it the reading stage of a
  game alone (`ALONE_READING`). configs/cards.py:numberline is the defaults with them;
  `cpu` sets them as per_game.numberline."""
  return ml_collections.ConfigDict(dict(reading=dict(ALONE_READING)))


def blackjack_recipe() -> ml_collections.ConfigDict:
  """The Blackjack settings ({section: {field: value}}) for a job of Blackjack alone on 2
  CPU cores: the defaults read its cards on 73% of held-out frames (0.43 shuffled) and
  win 32.1% after SFT, below the reference's 40.2. These give it what the warm start that
  won 39.4 (and token PPO from it 41.7: results/cards_gpu_h100/blackjack_alone_cpu/) had:
  4096 expert transitions, the reading stage of a game alone (`ALONE_READING`) and 2000
  SFT steps at batch 16. With those and the defaults' 4 PPO updates, token and latent PPO
  both won 39.7 in fresh environments (results/cards_cpu_separate/blackjack_ppo4/); with 16
  updates (the learning rate decaying over all 16), 39.8 and 40.8, 42.5 and 43.4 in
  training (blackjack_ppo16/), so the recipe gives PPO 16. configs/cards.py:blackjack is the
  defaults with them; `cpu` sets them as per_game.blackjack."""
  return ml_collections.ConfigDict(dict(
      expert=dict(transitions=4096),
      reading=dict(ALONE_READING),
      sft=dict(num_steps=2000),
      ppo=dict(num_updates=16, lr_decay_updates=16)))


def smoke_config() -> ml_collections.ConfigDict:
  """Every stage at toy sizes: a 2-layer backbone of width 32, a few steps and episodes."""
  c = default_config()
  c.image_size = 56
  c.max_new_tokens = 24
  c.expert.update(dict(transitions=16, num_envs=8))
  pipeline.smoke_model(c)
  for stage in (c.sft, c.latent_idm, c.latent_bc):
    stage.update(dict(num_steps=4, batch_size=4, checkpoint_every=2, log_every=2))
    stage.optimizer.warmup_steps = 0
  c.reading.update(dict(glyph_steps=2, steps=2, batch_size=4, checkpoint_every=2, log_every=2,
                        eval_frames=4))
  c.reading.optimizer.warmup_steps = 0
  c.eval.update(dict(episodes=4, blackjack_episodes=4, num_envs=4))
  c.ppo.update(dict(num_envs=4, num_steps=2, minibatch_size=4, num_updates=2, epochs=2,
                    lr_decay_updates=2))
  return c
