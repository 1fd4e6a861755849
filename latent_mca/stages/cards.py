"""The card games' stages (SPEC section 4): expert data, SFT warm start, PPO in both spaces.

  expert      per game, the expert solver plays `expert.transitions` steps in
              `expert.num_envs` environments, the points games' thoughts planning
              by `expert.plan` (`cards.experts`); its chain-of-thought responses and the
              states they answer are saved (workdir/expert/<game>.npz, .json). Frames are
              rendered again from the states when batched: rendering is cheap, storing
              300x300 frames is not.
  tokenizer   a byte-level BPE trained on the prompts and the expert responses.
  reading     reading pretraining (`latent_mca.cards.reading`; 0 steps make it a no-op
              that writes nothing): a tiny Qwen2.5-VL from scratch
              learns to name one symbol alone in a frame, its glyph shrinking from
              `reading.glyph_scale` times NumberLine's size to NumberLine's over 2/3 of
              `reading.glyph_steps`, then to restate every listed game's fresh frames
              (the expert response's opening), one game per batch in turn
              (`reading.steps`). Then, per game, the value tokens' accuracy on 64
              held-out frames, true and shuffled across the rows (equal: the frames are
              not read). Without it the warm start never learns to read its frames
              (results/cards_reading/).
  sft         the supervised warm start: a tiny Qwen2.5-VL trained from the reading
              stage's params where workdir/reading holds them, else from scratch (or
              `backbone.checkpoint`, which wins) on every listed game's expert
              responses, one game per batch in turn; loss on the response tokens.
              `warm_start=per_game` trains one per game instead (workdir/<game>/sft),
              each with the whole `sft` budget; the latent stage follows it.
  eval_sft    the warm start alone, acting in token space: success rate over the last
              `eval.episodes` episodes (`eval.blackjack_episodes` for Blackjack, as the
              reference counts).
  latent      the latent action model on the expert data, from sft's frozen backbone:
              inverse dynamics + codebook + world model (stage 1's loss), then the
              latent policy cloning the IDM's codes (stage 4's).
  eval_latent that latent policy alone, acting in latent space, evaluated as eval_sft
              evaluates the warm start (<game>/eval_latent.json).
  ppo_token   PPO per game from sft, training the backbone and the value head; then the
              trained policy evaluated as eval_sft evaluates the warm start
              (<game>/ppo_token/result.json: training, eval.json: the evaluation).
  ppo_latent  PPO per game from `latent`, training the latent policy and the value head
              (the world model decodes, frozen); evaluated likewise.
  report      workdir/cards_results.md (+ .json): success rates beside the reference's.

PPO follows RL4VLM: `ppo.num_steps` steps of `ppo.num_envs` environments per update,
GAE, `ppo.epochs` epochs of clipped PPO over minibatches, log pi = thought_coef *
thoughts + action (`cards.agent`). Its success rate in training is over the last
episodes finished in training, as the reference reports it; a short run finishes fewer
than the window, so the trained policy is also evaluated in fresh environments. Each PPO
run checkpoints after every update and resumes from the last one (its environments then
start fresh episodes).

Every stage reuses what an earlier run finished, as long as it was made from the
checkpoints there now: sft records the reading stage's final checkpoint, latent sft's,
each evaluation and PPO run its start's (`training.lineage`); what was made from a
checkpoint trained again since is moved aside (`<name>.stale<k>`) and made again.

Acting and the PPO learner run on the mesh of `config.mesh`
(`latent_mca.parallel.mesh`), as the pipeline's RL stage does: the learner's TrainState
(the LatentSystem's params and the value head, Adam's moments) is sharded by the
logical-axis rules, the PPO step is jitted with its shardings in and out (donated) and
the minibatches' rows are split over the batch axes (data x fsdp, the packed frames
replicated); the rollouts split the environments over the same axes, with the params
gathered whole onto each device. ppo.num_envs, ppo.minibatch_size and eval.num_envs
must be multiples of the batch shards (data x fsdp).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL
import PIL.features
from absl import logging
from tqdm import tqdm

from latent_mca.cards import agent as agent_lib
from latent_mca.cards import arith
from latent_mca.cards import envs as envs_lib
from latent_mca.cards import experts
from latent_mca.cards import parser
from latent_mca.cards import pixels as pixels_lib
from latent_mca.cards import prompts as prompts_lib
from latent_mca.cards import reading as reading_lib
from latent_mca.cards import render as render_lib
from latent_mca.config_schema import ConfigError
from latent_mca.data.processor import Processor
from latent_mca.data.image_processing import ImageProcessorConfig
from latent_mca.data.tokenizers import IM_END, train_bpe_tokenizer
from latent_mca.latent import steps as steps_lib
from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.rl import ppo as ppo_lib
from latent_mca.rl import rollout as rollout_lib
from latent_mca.rl import step as rl_step_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import data as data_lib
from latent_mca.stages import latent as latent_lib
from latent_mca.training import checkpoint, lineage, loop, metrics as metrics_lib
from latent_mca.training import state as state_lib

READING, SFT, LATENT_IDM, LATENT_BC = "reading", "sft", "latent_idm", "latent_bc"
# RL4VLM's success rates (%, LLaVA-1.6-7B; SPEC section 4).
REFERENCE = {
    "RL4VLM": dict(numberline=89.4, ezpoints=50.0, points24=2.3, blackjack=40.2),
    "SFT only": dict(numberline=24.8, ezpoints=23.0, points24=2.6, blackjack=23.1),
    "GPT-4V": dict(numberline=65.5, ezpoints=10.5, points24=0.0, blackjack=25.5),
    "CNN + RL": dict(numberline=87.1, ezpoints=0.0, points24=0.0, blackjack=38.8),
}


def games(config) -> list[str]:
  names = [g.strip() for g in config.games.split(",") if g.strip()]
  unknown = [g for g in names if g not in envs_lib.GAMES]
  if unknown or not names:
    raise ConfigError(f"config.games: {unknown or 'none given'}; choose from "
                      f"{', '.join(envs_lib.GAMES)}")
  return names


# config.warm_start: "shared" trains one warm start (sft, then the latent model) on every
# listed game, in the workdir; "per_game" trains one per game, as the reference does
# (RL4VLM fine-tunes one model per task), in workdir/<game>/ beside that game's evaluation
# and PPO runs, each from the same reading stage with the whole `sft` (and latent) budget;
# "separate" runs each game as a job of its own in workdir/<game>/ (its own expert data,
# tokenizer, reading stage and warm start: the job `separate_config` gives, which
# `jobs.cards.run` runs), then one report over them.
SHARED, PER_GAME, SEPARATE = "shared", "per_game", "separate"
WARM_STARTS = (SHARED, PER_GAME, SEPARATE)


def check_warm_start(config) -> None:
  if config.warm_start not in WARM_STARTS:
    raise ConfigError(f"config.warm_start: {config.warm_start!r}; choose "
                      f"{', '.join(WARM_STARTS[:-1])} or {WARM_STARTS[-1]}")


def warm_starts(config, workdir: str) -> list[tuple[str, list[str]]]:
  """(folder, games) of each warm start to train: the workdir and every listed game, or
  workdir/<game> and that game alone per game (`config.warm_start`)."""
  check_warm_start(config)
  if config.warm_start == SEPARATE:
    raise ConfigError(f"config.warm_start={SEPARATE!r}: each game is a job of its own "
                      "(`jobs.cards.run`); run a stage on workdir/<game> with "
                      "`separate_config(config, game)`")
  names = games(config)
  if config.warm_start == SHARED:
    return [(workdir, names)]
  return [(os.path.join(workdir, g), [g]) for g in names]


def separate_config(config, game: str):
  """The job `game` runs as with warm_start="separate", in workdir/<game>/: `config` with
  its `per_game[game]` values (`game_config`), that game alone and one (shared) warm
  start; what configs/cards.py:<game> gives where config is configs/cards.py:cpu."""
  out = copy.deepcopy(game_config(config, game))
  out.games, out.warm_start = game, SHARED
  out.per_game = type(out.per_game)()
  return out


def jobs_of(config, workdir: str) -> list[tuple[object, str]]:
  """(config, workdir) of each job the listed games run in: the one job, or with
  warm_start="separate" each game's (`separate_config`, workdir/<game>)."""
  if config.warm_start != SEPARATE:
    return [(config, workdir)]
  return [(separate_config(config, g), os.path.join(workdir, g)) for g in games(config)]


def game_workdir(config, workdir: str, game: str) -> str:
  """The workdir of the job whose results for `game` sit in <it>/<game>/: `workdir`, or
  workdir/<game> for a job of its own (warm_start="separate")."""
  return os.path.join(workdir, game) if config.warm_start == SEPARATE else workdir


def warm_start_config(config, names: Sequence[str]):
  """The config a warm start of `names` (`warm_starts`) trains with: its game's
  (`game_config`) per game, else `config` (shared warm starts take no per-game settings)."""
  return game_config(config, names[0]) if config.warm_start == PER_GAME else config


def warm_start_dir(config, workdir: str, game: str) -> str:
  """The folder of the warm start `game` starts its evaluation and PPO from (per game, and
  of a game's own job, workdir/<game>)."""
  check_warm_start(config)
  return workdir if config.warm_start == SHARED else os.path.join(workdir, game)


# config.per_game: {game: {section: {field: value}}}, what one game's expert data, warm start
# and latent model (per_game warm starts only) and PPO take instead of the top-level values,
# e.g. per_game.points24.ppo.learning_rate, as the reference tunes each task. `game_config`
# applies them; the stages and `Actor` / `ExpertData` call it.
PER_GAME_SECTIONS = ("expert", "reading", "sft", "latent_idm", "latent_bc", "ppo")
_WARM_START_SECTIONS = ("sft", "latent_idm", "latent_bc")
_OWN_JOB_SECTIONS = ("reading",)  # one per job: per game only in a game's own job


def _override(target, values, path: str) -> None:
  for key, value in values.items():
    if key not in target:
      raise ConfigError(f"{path}.{key}: no such field (that group has "
                        f"{', '.join(sorted(target))})")
    if hasattr(target[key], "items"):
      if not hasattr(value, "items"):
        raise ConfigError(f"{path}.{key} overrides a group: give it fields, got {value!r}")
      _override(target[key], value, f"{path}.{key}")
    else:
      target[key] = value


def overridden(config, overrides, name: str = "config"):
  """A copy of `config` with the values of `overrides` ({section: {field: value}}, nested
  as the config) in place of its own; ConfigError naming a field it lacks (`name` its
  path)."""
  out = copy.deepcopy(config)
  for section, values in overrides.items():
    _override(out[section], values, f"{name}.{section}")
  return out


def game_config(config, game: str):
  """`config` with `config.per_game[game]`'s values in place of the top-level ones (a copy;
  `config` itself where the game has none)."""
  overrides = config.get("per_game", {}).get(game)
  if not overrides:
    return config
  return overridden(config, overrides, f"per_game.{game}")


def check_per_game(config) -> None:
  """ConfigError naming what is wrong in `config.per_game`: a game or section not allowed,
  a field the config lacks, or warm-start settings with one shared warm start."""
  for game, overrides in config.get("per_game", {}).items():
    if game not in envs_lib.GAMES:
      raise ConfigError(f"config.per_game.{game}: no such game; choose from "
                        f"{', '.join(envs_lib.GAMES)}")
    for section in overrides:
      if section not in PER_GAME_SECTIONS:
        raise ConfigError(f"config.per_game.{game}.{section}: only "
                          f"{', '.join(PER_GAME_SECTIONS)} can be set per game")
      if section in _WARM_START_SECTIONS and config.warm_start == SHARED:
        raise ConfigError(f"config.per_game.{game}.{section}: one shared warm start "
                          f"(config.warm_start={SHARED!r}) has no per-game {section}; use "
                          f"--config.warm_start={PER_GAME} or set it for every game")
      if section in _OWN_JOB_SECTIONS and config.warm_start != SEPARATE:
        raise ConfigError(f"config.per_game.{game}.{section}: the games share one {section} "
                          f"stage unless each is a job of its own; use "
                          f"--config.warm_start={SEPARATE} or set it for every game")
    game_config(config, game)  # unknown fields


def _stage_prefix(config, stage: str, names: Sequence[str]) -> str:
  """The metrics' prefix of a warm-start stage: "sft/", per game "sft/<game>/"."""
  return f"{stage}/" if config.warm_start == SHARED else f"{stage}/{names[0]}/"


def check_made_from(config, path: str, result: dict) -> None:
  """ConfigError unless the result at `path` (eval_sft.json, a PPO run's result.json) was
  made from the warm start `config.warm_start` names; results written before the option
  were made from the shared one."""
  made = result.get("warm_start", SHARED)
  if made != config.warm_start:
    raise ConfigError(
        f"{path} was made from the {made!r} warm start, but config.warm_start is "
        f"{config.warm_start!r}: move it (a PPO run: its folder) aside to make it again, or "
        f"run with --config.warm_start={made}")


def make_env(config, game: str):
  options = {"solvable_only": config.env.solvable_only} if game == "points24" else {}
  return envs_lib.make(game, **options)


def _json(path: str):
  return backbone_lib.read_json(path)


# ----------------------------------------------------------------------------- expert data


def _expert_paths(workdir: str, game: str) -> tuple[str, str]:
  base = os.path.join(workdir, "expert", game)
  return base + ".npz", base + ".json"


RENDER = "render.json"  # workdir/render.json: how the machine that made it draws frames


def _render_info() -> dict:
  return {"fingerprint": render_lib.fingerprint(), "pillow": PIL.__version__,
          "freetype": PIL.features.version("freetype2")}


def check_render(workdir: str) -> None:
  """Records (once) how this machine draws the frames, in workdir/render.json; on a
  machine that draws them differently (another Pillow / FreeType), logs a warning that
  says so: what was trained on the first machine's frames is then read on other pixels."""
  path = os.path.join(workdir, RENDER)
  here = _render_info()
  if not os.path.isfile(path):
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      backbone_lib.write_json(path, here)
    return
  made = _json(path)
  if made["fingerprint"] != here["fingerprint"]:
    logging.warning(
        "%s: this machine draws the card frames differently from the one that made this "
        "workdir (Pillow %s with FreeType %s here, %s with %s there): policies trained "
        "there may not read the frames drawn here", path, here["pillow"], here["freetype"],
        made.get("pillow"), made.get("freetype"))


def expert(config, workdir: str) -> dict:
  """Plays every game with its expert and saves the states and responses (once)."""
  check_render(workdir)
  out = {}
  for game in games(config):
    game_cfg = game_config(config, game)
    npz, meta = _expert_paths(workdir, game)
    if not os.path.isfile(meta):
      _write_expert(game_cfg, game, npz, meta)
    info = _json(meta)
    check_plan(game_cfg, game, info, meta)
    check_noise(game_cfg, info, meta)
    check_transitions(game_cfg, info, meta)
    out.update({f"expert/{game}/{k}": info[k] for k in ("transitions", "episodes",
                                                        "success_rate")})
  return out


def check_plan(config, game: str, info: dict, meta: str) -> None:
  """ConfigError unless a points game's saved expert data plans as config.expert.plan
  (data saved before the option planned by "deal")."""
  saved = info.get("plan", "deal")
  if game in envs_lib.POINTS_GAMES and saved != config.expert.plan:
    raise ConfigError(f"{meta}: the expert data plans by {saved!r}, config.expert.plan is "
                      f"{config.expert.plan!r}; pass --config.expert.plan={saved} to go on "
                      "with this workdir, or use a new one")


def check_noise(config, info: dict, meta: str) -> None:
  """ConfigError unless the saved expert data was played with config.expert.noise (data
  saved before the option: 0)."""
  saved = info.get("noise", 0.0)
  if saved != config.expert.noise:
    raise ConfigError(f"{meta}: the expert data was played with noise {saved}, "
                      f"config.expert.noise is {config.expert.noise}; pass "
                      f"--config.expert.noise={saved} to go on with this workdir, or use a new one")


def check_expert_counts(config) -> None:
  """ConfigError unless config.expert's environment and transition counts are positive and
  its noise a probability below 1."""
  e = config.expert
  if e.num_envs <= 0 or e.transitions <= 0:
    raise ConfigError(f"config.expert.num_envs and config.expert.transitions must be positive, "
                      f"got {e.num_envs} and {e.transitions}")
  if not 0.0 <= e.noise < 1.0:
    raise ConfigError(f"config.expert.noise must be in [0, 1), got {e.noise}")


def check_transitions(config, info: dict, meta: str) -> None:
  """ConfigError unless the saved expert data holds as many transitions as
  config.expert.transitions asks for (rounded up to whole steps of config.expert.num_envs),
  so a changed count is not silently trained on the old data."""
  e = config.expert
  check_expert_counts(config)
  asked = -(-e.transitions // e.num_envs) * e.num_envs
  if info["transitions"] != asked:
    raise ConfigError(f"{meta}: the expert data holds {info['transitions']} transitions, "
                      f"config.expert.transitions={e.transitions} asks for {asked}; pass "
                      f"--config.expert.transitions={info['transitions']} to go on with this "
                      "workdir, or use a new one")


def noise_actions(env, state, rng: np.random.Generator) -> np.ndarray:
  """int [B]: `config.expert.noise`'s random actions for a batch of states, uniform over
  the legal ones (`CardEnv.legal_actions`) except a points game's "=", which would end
  the episode instead of leaving it off the plan."""
  legal = np.array(jax.vmap(env.legal_actions)(state))
  if env.name in envs_lib.POINTS_GAMES:
    legal[:, env.actions.index("=")] = False
  return np.array([rng.choice(np.flatnonzero(row)) for row in legal])


def _write_expert(config, game: str, npz: str, meta: str) -> None:
  """Plays config.expert.transitions steps of `game` with the expert (with probability
  config.expert.noise a step plays a random action instead, DART-style: Laskey et al.,
  2017; the expert's response for that state is what is saved)."""
  env = make_env(config, game)
  n, steps = config.expert.num_envs, -(-config.expert.transitions // config.expert.num_envs)
  key = jax.random.fold_in(jax.random.key(config.seed), envs_lib.GAMES.index(game))
  rng = np.random.default_rng([config.seed, envs_lib.GAMES.index(game)])
  state = jax.jit(jax.vmap(env.reset_state))(jax.random.split(key, n))
  step = jax.jit(jax.vmap(env.step_autoreset))
  states, texts, episodes = [], [], Episodes(n)
  for t in tqdm(range(steps), desc=f"expert {game}", leave=False):
    host = jax.device_get(state)
    actions = []
    for i in range(n):
      text, action = experts.expert_response(game, env.describe(
          jax.tree.map(lambda x: x[i], host)), config.expert.plan)
      texts.append(text)
      actions.append(env.actions.index(action))
    if config.expert.noise:
      actions = np.where(rng.random(n) < config.expert.noise,
                         noise_actions(env, host, rng), actions)
    states.append(host)
    keys = jax.random.split(jax.random.fold_in(key, t + 1), n)
    _, state, _, done, info = step(keys, state, jnp.asarray(actions, jnp.int32))
    episodes.add(np.asarray(done), np.asarray(info["success"]), np.zeros(n, np.float32))
  leaves = [np.concatenate([jax.tree.leaves(s)[k] for s in states])
            for k in range(len(jax.tree.leaves(states[0])))]
  os.makedirs(os.path.dirname(npz), exist_ok=True)
  tmp = npz + ".tmp.npz"
  np.savez(tmp, *leaves)
  os.replace(tmp, npz)
  backbone_lib.write_json(meta, {"game": game, "plan": config.expert.plan,
                                 "noise": config.expert.noise,
                                 "transitions": len(texts),
                                 "episodes": len(episodes),
                                 "success_rate": (episodes.success_rate(len(episodes)) / 100
                                                  if len(episodes) else 0.0),
                                 "responses": texts})


class ExpertData:
  """One game's expert transitions: states (batched pytree) and response texts."""

  def __init__(self, config, workdir: str, game: str):
    npz, meta = _expert_paths(workdir, game)
    if not os.path.isfile(meta):
      raise checkpoint.CheckpointNotFoundError(meta, "expert", "run the expert stage first")
    config = game_config(config, game)
    self.game, self.env = game, make_env(config, game)
    template = self.env.reset_state(jax.random.key(0))
    with np.load(npz) as f:
      leaves = [f[f"arr_{k}"] for k in range(len(f.files))]
    self.states = jax.tree.unflatten(jax.tree.structure(template), leaves)
    info = _json(meta)
    check_plan(config, game, info, meta)
    check_noise(config, info, meta)
    self.texts = info["responses"]
    self.observe = jax.jit(jax.vmap(self.env.observe))

  def __len__(self) -> int:
    return len(self.texts)

  def frames(self, index: np.ndarray):
    return self.observe(jax.tree.map(lambda x: x[index], self.states))


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def tokenizer(config, workdir: str) -> dict:
  """Trains (once) the BPE on the prompts and every expert response."""
  folder = tokenizer_dir(workdir)
  if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    texts = []
    for game in envs_lib.GAMES:  # every game's: one tokenizer fits any later games list
      _, meta = _expert_paths(workdir, game)
      texts.append(prompts_lib.prompt(game))
      if os.path.isfile(meta):
        texts += _json(meta)["responses"]
    tok = train_bpe_tokenizer(texts, vocab_size=config.tokenizer.vocab_size)
    tok.save_pretrained(folder + ".tmp")
    os.replace(folder + ".tmp", folder)
  return {"tokenizer/size": len(load_processor(config, workdir).tokenizer)}


def load_processor(config, workdir: str) -> Processor:
  """The processor of the cards' tokenizer, one frame = (image_size / 14)^2 patches."""
  folder = tokenizer_dir(workdir)
  if not config.backbone.checkpoint and not os.path.isfile(
      os.path.join(folder, "tokenizer.json")):
    raise checkpoint.CheckpointNotFoundError(folder, "tokenizer", "run the tokenizer stage first")
  check_render(workdir)  # every stage that draws frames loads the processor
  area = config.image_size ** 2
  return Processor(data_lib.load_tokenizer(config, workdir),
                   image_config=ImageProcessorConfig(min_pixels=area, max_pixels=area))


# ----------------------------------------------------------------------------- model & layout


class Layout:
  """Token layout shared by SFT and RL: prompts left-padded to one length, then responses."""

  def __init__(self, config, processor: Processor, names: Sequence[str]):
    self.processor, self.image_size = processor, config.image_size
    self.max_new_tokens = config.max_new_tokens
    ids = {g: agent_lib.game_prompt_ids(processor, g, config.image_size) for g in names}
    self.prompt_length = max(len(v) for v in ids.values())
    pad = processor.pad_token_id
    self.prompts = {g: agent_lib.left_pad(v, self.prompt_length, pad) for g, v in ids.items()}
    self.im_end = processor.tokenizer.convert_tokens_to_ids(IM_END)

  def response_ids(self, text: str, unweighted: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss weights) int32 of a response and IM_END, cut at `max_new_tokens`; the
    tokens that overlap the characters text[a:b] of `unweighted` = (a, b) weigh 0."""
    encoded = self.processor.tokenizer(text + IM_END, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"][:self.max_new_tokens], np.int32)
    weights = np.ones(len(ids), np.int32)
    if unweighted is not None:
      a, b = unweighted
      for t, (start, end) in enumerate(encoded["offset_mapping"][:len(ids)]):
        weights[t] = not (start < b and end > a)
    return ids, weights

  def sft_batch(self, data: ExpertData, index: np.ndarray,
                responses: Sequence[tuple[str, tuple[int, int] | None]] | None = None) -> dict:
    """input_ids / attention_mask / loss_mask [B, T + M] and the frames' patches.

    `responses` (text, unweighted span) replace the rows' expert responses, the span's
    tokens left out of the loss (`counterfactual_cards`)."""
    b, m, pad = len(index), self.max_new_tokens, self.processor.pad_token_id
    prompt_ids, prompt_mask = self.prompts[data.game]
    if responses is None:
      responses = [(data.texts[i], None) for i in index]
    ids = np.full((b, m), pad, np.int32)
    mask = np.zeros((b, m), np.int32)
    loss = np.zeros((b, m), np.int32)
    for row, (text, unweighted) in enumerate(responses):
      r, w = self.response_ids(text, unweighted)
      ids[row, :len(r)], mask[row, :len(r)], loss[row, :len(r)] = r, 1, w
    pixel_values, grid = pixels_lib.frames_to_pixels(data.frames(index), self.image_size)
    return {"input_ids": np.concatenate([np.tile(prompt_ids, (b, 1)), ids], 1),
            "attention_mask": np.concatenate([np.tile(prompt_mask, (b, 1)), mask], 1),
            "loss_mask": np.concatenate([np.zeros((b, self.prompt_length), np.int32), loss], 1),
            "pixel_values": pixel_values, "image_grid_thw": grid}


_FIRST_STEP = '"current formula": "",'  # a points game's response with nothing typed yet


def counterfactual_cards(text: str, game: str, plan: str, rng: np.random.Generator
                         ) -> tuple[str, tuple[int, int] | None]:
  """(response, unweighted span): a Points24 first-step response swapped for the expert's
  response to another solvable deal, whose restated cards (the span) are left out of the
  loss; any other response as it is, span None.

  The swapped response's plan cannot be read off the frame, only off the cards it
  restates, so SFT on such rows asks the plan to follow the restatement. Measured
  (results/points24_plans/README.md): at 1.0 it does not make the warm start plan (2.0%
  of the cards it restated against 1.2%), because the frame was not what stopped the
  plan: starting SFT from the reading stage's params is (a text model started from them
  plans 0.0%, from scratch 9.8%).
  """
  if game != "points24" or _FIRST_STEP not in text:
    return text, None
  values = [int(v) for v in arith.draw_solvable(rng, 1)[0]]
  swapped, _ = experts.expert_response(game, {"values": values, "target": 24, "formula": ()},
                                       plan)
  return swapped, (swapped.index("[") + 1, swapped.index("]"))


class _ExpertLoader:
  """SFT batches: game (step mod #games), rows drawn with a key of (seed, step). Resumable.

  With `counterfactual` > 0 (`sft.counterfactual_cards`), each Points24 first-step row is
  swapped with that probability for `counterfactual_cards`'s response (`plan`: the
  expert's)."""

  def __init__(self, layout: Layout, data: list[ExpertData], batch_size: int, seed: int,
               wrap=None, counterfactual: float = 0.0, plan: str = "canonical"):
    self.layout, self.data, self.batch_size, self.seed = layout, data, batch_size, seed
    self.wrap, self.step = wrap or (lambda b: b), 0
    self.counterfactual, self.plan = counterfactual, plan

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    data = self.data[self.step % len(self.data)]
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    index = rng.integers(0, len(data), self.batch_size)
    responses = None
    if self.counterfactual > 0:
      swap = rng.random(len(index)) < self.counterfactual
      responses = [counterfactual_cards(data.texts[i], data.game, self.plan, rng) if s
                   else (data.texts[i], None) for i, s in zip(index, swap)]
    return self.wrap(self.layout.sft_batch(data, index, responses))

  def state(self) -> dict:
    return {"step": self.step}

  def restore(self, state: dict) -> None:
    self.step = int(state["step"])


# A batch holding this key is a reading batch in SFT (`_MixedLoader`); `_sft_step` pops it.
_READING_ROWS = "reading_rows"


class _MixedLoader:
  """`sft.reading_every` > 0: every that many-th batch is one of the games' readings (the
  reading stage's rows on fresh frames, no glyphs; marked with `_READING_ROWS`), the rest
  the expert loader's, in its order. Resumable."""

  def __init__(self, expert: _ExpertLoader, reading: _ReadingLoader, every: int):
    self.expert, self.reading, self.every, self.step = expert, reading, every, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self.step += 1
    if self.step % self.every:
      return next(self.expert)
    return dict(next(self.reading), **{_READING_ROWS: np.ones((), np.int32)})

  def state(self) -> dict:
    return {"step": self.step, "expert": self.expert.state(), "reading": self.reading.state()}

  def restore(self, state: dict) -> None:
    self.step = int(state["step"])
    self.expert.restore(state["expert"])
    self.reading.restore(state["reading"])


def _sft_step(state, batch, rng, *, model):
  """`backbone.train_step`; on a reading batch (`_MixedLoader`) its metrics are named
  "reading/..." (the batch's keys are fixed at trace time: one compilation per kind)."""
  batch = dict(batch)
  reading_rows = batch.pop(_READING_ROWS, None) is not None
  state, metrics = backbone_lib.train_step(state, batch, rng, model=model)
  if reading_rows:
    metrics = {f"{READING}/{k}": v for k, v in metrics.items()}
  return state, metrics


def _setup(config, workdir: str):
  names = games(config)
  processor = load_processor(config, workdir)
  layout = Layout(config, processor, envs_lib.GAMES)
  model_cfg = backbone_lib.model_config(config, processor)
  return names, processor, layout, model_cfg


# ----------------------------------------------------------------------------- reading


def check_reading_config(config) -> None:
  """ConfigError naming the field of `config.reading` that is out of range."""
  r = config.reading
  for name in ("glyph_steps", "steps", "formula_symbols"):
    if r[name] < 0:
      raise ConfigError(f"config.reading.{name} must be >= 0, got {r[name]}")
  for name in ("batch_size", "checkpoint_every", "log_every", "eval_frames"):
    if r[name] <= 0:
      raise ConfigError(f"config.reading.{name} must be positive, got {r[name]}")
  if r.glyph_scale < 1:
    raise ConfigError(f"config.reading.glyph_scale must be >= 1 (a multiple of NumberLine's "
                      f"glyph size), got {r.glyph_scale}")
  if config.sft.reading_formula_symbols < -1:
    raise ConfigError(f"config.sft.reading_formula_symbols must be >= 0, or -1 for "
                      f"config.reading.formula_symbols, got {config.sft.reading_formula_symbols}")
  total = r.glyph_steps + r.steps
  if total and r.optimizer.schedule == "cosine" and total <= r.optimizer.warmup_steps:
    raise ConfigError(f"config.reading.optimizer.warmup_steps={r.optimizer.warmup_steps} "
                      f"must be below config.reading.glyph_steps + config.reading.steps = "
                      f"{total}")


def sft_formula_symbols(config) -> int:
  """The points games' formula length in SFT's reading rows (`sft.reading_every`):
  `sft.reading_formula_symbols`, or the reading stage's (`reading.formula_symbols`) where
  it is -1."""
  n = config.sft.reading_formula_symbols
  return config.reading.formula_symbols if n == -1 else n


class _ReadingLoader:
  """The reading stage's batches by step: the glyph curriculum's `glyph_steps`, then one
  game's readings per step in turn. Drawn with keys of (seed, step): resumable."""

  def __init__(self, config, processor, names: Sequence[str], glyph_steps: int | None = None,
               seed: int | None = None, formula_symbols: int | None = None):
    """glyph_steps, seed and formula_symbols default to config.reading's and config's."""
    r = config.reading
    self.processor, self.size = processor, config.image_size
    self.seed = config.seed if seed is None else seed
    self.glyph_steps = r.glyph_steps if glyph_steps is None else glyph_steps
    self.scale, self.batch_size = r.glyph_scale, r.batch_size
    length = reading_lib.prompt_length(processor, config.image_size, names)
    self.glyph_prompt = reading_lib.padded_prompt(processor, config.image_size, None, length)
    envs = [make_env(config, g) for g in names]
    symbols = r.formula_symbols if formula_symbols is None else formula_symbols
    self.width = reading_lib.reading_width(processor.tokenizer, envs, symbols)
    self.frames = [reading_lib.GameFrames(processor, env, g, config.image_size, length,
                                          symbols, self.width) for env, g in zip(envs, names)]
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    i, self.step = self.step, self.step + 1
    if i < self.glyph_steps:
      batch = reading_lib.glyph_batch(
          self.processor, self.glyph_prompt, np.random.default_rng([self.seed, i]),
          self.batch_size, reading_lib.shrink_scale(i, self.glyph_steps, self.scale), self.size,
          width=self.width)
    else:
      frames = self.frames[(i - self.glyph_steps) % len(self.frames)]
      batch = frames.batch(jax.random.fold_in(jax.random.key(self.seed), i), self.batch_size)
    batch.pop("value_mask")
    return batch

  def state(self) -> dict:
    return {"step": self.step}

  def restore(self, state: dict) -> None:
    self.step = int(state["step"])


def reading_steps(config) -> int:
  return config.reading.glyph_steps + config.reading.steps


def reading(config, workdir: str) -> dict:
  """Reading pretraining (the glyph curriculum, then the games' readings) and, per game,
  the value tokens' accuracy on held-out frames. 0 steps in all: nothing."""
  check_reading_config(config)
  names, total, r = games(config), reading_steps(config), config.reading
  if not total:
    return {}
  stage_dir = os.path.join(workdir, READING)
  result_path = os.path.join(stage_dir, "result.json")
  if os.path.isfile(result_path):
    result = _json(result_path)
    saved = result.get("formula_symbols", 0)  # results written before it was an option
    if saved != r.formula_symbols:
      raise ConfigError(f"{stage_dir} was trained with config.reading.formula_symbols="
                        f"{saved}, the config asks for {r.formula_symbols}: use another "
                        f"workdir (or set it back)")
    if result["num_steps"] == total and result["games"] == names:
      return result["metrics"]
  processor = load_processor(config, workdir)
  model_cfg = backbone_lib.model_config(config, processor)
  if config.backbone.checkpoint:
    params = qwen2_5_vl.load_params(config.backbone.checkpoint, model_cfg)
  else:
    params = qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed))
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  tx = state_lib.make_optimizer(r.optimizer, total)
  state = state_lib.TrainState.create(params, tx, jax.random.key(config.seed))
  loader = _ReadingLoader(config, processor, names)
  state, history = loop.train(READING, workdir, state,
                              functools.partial(backbone_lib.train_step, model=model),
                              loader, total, checkpoint_every=r.checkpoint_every,
                              log_every=r.log_every)
  metrics_lib.plot_metrics(os.path.join(stage_dir, "metrics.jsonl"),
                           os.path.join(stage_dir, "curves.png"), ["loss", "accuracy"])
  out = {f"reading/{k}": v for k, v in loop.final_metrics(history).items()}
  sums = jax.jit(functools.partial(backbone_lib.next_token_sums, model))
  for frames in loader.frames:
    # The same held-out frames in every run (training draws with keys of (seed, step)).
    key = jax.random.key(10_000 + envs_lib.GAMES.index(frames.game))
    for suffix, shuffle in (("value_accuracy", False), ("value_accuracy/shuffled", True)):
      out[f"reading/{frames.game}/{suffix}"] = reading_lib.value_accuracy(
          sums, state.params, frames.batch(key, r.eval_frames, shuffle))
  backbone_lib.write_json(result_path, {"num_steps": total, "games": names,
                                        "formula_symbols": r.formula_symbols, "metrics": out})
  return out


# ----------------------------------------------------------------------------- SFT


# The backbone's top-level parameter groups (`qwen2_5_vl.Qwen2_5_VL`; lm_head only where the
# head is untied), which `config.sft.from_reading` picks from.
PARAM_GROUPS = ("visual", "embed_tokens", "decoder", "lm_head")


def reading_groups(config) -> dict[str, int | None]:
  """The parameter groups `config.sft.from_reading` takes from the reading stage: {group:
  None (all of it), or for "decoder:K" the number of its lowest layers taken}.

  Raises:
    ConfigError: an empty list, a name that is not one of PARAM_GROUPS, or a layer count
      that is not a positive integer.
  """
  spec = config.sft.from_reading.strip()
  if spec == "all":
    return dict.fromkeys(PARAM_GROUPS)
  groups, bad = {}, []
  for item in (n.strip() for n in spec.split(",") if n.strip()):
    name, colon, layers = item.partition(":")
    if name not in PARAM_GROUPS or (colon and (name != "decoder" or not layers.isdigit()
                                               or int(layers) < 1)):
      bad.append(item)
    else:
      groups[name] = int(layers) if layers else None
  if bad or not groups:
    raise ConfigError(f"config.sft.from_reading: {spec!r}; give 'all' or a comma list of "
                      f"{', '.join(PARAM_GROUPS)}, decoder:K for its lowest K layers "
                      f"(not understood: {bad or 'none given'})")
  return groups


def _merge_decoder(read: dict, fresh: dict, layers: int) -> dict:
  """The decoder with its lowest `layers` (scanned: stacked on axis 0) from `read`, its
  upper layers and final norm from `fresh`."""
  total = jax.tree.leaves(read["layers"])[0].shape[0]
  if layers > total:
    raise ConfigError(f"config.sft.from_reading: decoder:{layers}, but the decoder has "
                      f"{total} layers")
  stacked = jax.tree.map(lambda r, f: jnp.concatenate([r[:layers], f[layers:]]),
                         read["layers"], fresh["layers"])
  return dict(fresh, layers=stacked)


def _starts_from_reading(config, workdir: str) -> bool:
  return not config.backbone.checkpoint and bool(
      reading_steps(config) or os.path.isdir(os.path.join(workdir, READING)))


def sft_sources(config, workdir: str) -> lineage.Sources:
  """The checkpoints a warm start is made from (`training.lineage`): the reading stage's
  where it starts from it (`sft_start_params`)."""
  if not _starts_from_reading(config, workdir):
    return {}
  return {READING: checkpoint.final_id(os.path.join(workdir, READING))}


def sft_start_params(config, workdir: str, model_cfg):
  """The params SFT starts from: `backbone.checkpoint`'s if set; else the reading stage's
  final ones where workdir/reading holds a checkpoint (and where the config asks for
  reading steps, it must), the groups `config.sft.from_reading` leaves out fresh; else
  fresh (seed `config.seed`, as the reading stage's own start).

  Raises:
    CheckpointNotFoundError: config.reading asks for steps but the reading stage did not
      run (or did not finish).
    ConfigError: `config.sft.from_reading` asks for more decoder layers than there are.
  """
  if config.backbone.checkpoint:
    return qwen2_5_vl.load_params(config.backbone.checkpoint, model_cfg)
  if not _starts_from_reading(config, workdir):
    return qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed))
  stage_dir = os.path.join(workdir, READING)
  groups = reading_groups(config)
  abstract = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
  read = checkpoint.load_params(stage_dir, abstract)
  logging.info("sft starts from the reading stage's params (%s): %s; fresh: %s", stage_dir,
               config.sft.from_reading, ", ".join(sorted(set(read) - set(groups))) or "none")
  if all(group in groups and groups[group] is None for group in read):  # all whole
    return read
  fresh = qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed))
  start = {}
  for group in read:
    if group not in groups:
      start[group] = fresh[group]
    elif group == "decoder" and groups[group] is not None:
      start[group] = _merge_decoder(read[group], fresh[group], groups[group])
    else:
      start[group] = read[group]
  return start


def sft(config, workdir: str) -> dict:
  """The supervised warm start(s) on the listed games' expert responses (from
  `sft_start_params`): one on every game, or one per game (`warm_starts`)."""
  _, processor, layout, model_cfg = _setup(config, workdir)
  # one step object: every warm start reuses its compilation (`loop.jit_step`)
  train_step = functools.partial(_sft_step, model=qwen2_5_vl.Qwen2_5_VL(model_cfg))
  out = {}
  for folder, names in warm_starts(config, workdir):
    config_w = warm_start_config(config, names)
    c = config_w.sft
    lineage.check_folders([os.path.join(folder, SFT)], sft_sources(config_w, workdir))
    data = [ExpertData(config, workdir, g) for g in names]
    params = sft_start_params(config_w, workdir, model_cfg)
    tx = state_lib.make_optimizer(c.optimizer, c.num_steps)
    state = state_lib.TrainState.create(params, tx, jax.random.key(config.seed))
    loader = _ExpertLoader(layout, data, c.batch_size, config.seed,
                           counterfactual=c.counterfactual_cards, plan=config_w.expert.plan)
    if c.reading_every:
      # fresh frames: the reading stage drew its own with keys of config.seed
      reading = _ReadingLoader(config_w, processor, names, glyph_steps=0, seed=config.seed + 2,
                               formula_symbols=sft_formula_symbols(config_w))
      loader = _MixedLoader(loader, reading, c.reading_every)
    _, history = loop.train(SFT, folder, state, train_step, loader, c.num_steps,
                            checkpoint_every=c.checkpoint_every, log_every=c.log_every)
    stage_dir = os.path.join(folder, SFT)
    metrics_lib.plot_metrics(os.path.join(stage_dir, "metrics.jsonl"),
                             os.path.join(stage_dir, "curves.png"),
                             ["loss", "accuracy", f"{READING}/loss", f"{READING}/accuracy"],
                             skip_missing=True)
    prefix = _stage_prefix(config, SFT, names)
    out.update({prefix + k: v for k, v in loop.final_metrics(history).items()})
  return out


def _sft_backbone(folder: str, model_cfg):
  """The final params of the warm start in `folder` (`warm_start_dir`)."""
  abstract = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
  return checkpoint.load_params(os.path.join(folder, SFT), abstract)


# ----------------------------------------------------------------------------- latent model


def latent(config, workdir: str) -> dict:
  """Stage 1 (IDM, codebook, world model) then stage 4 (policy BC) on the expert data, from
  each warm start's frozen backbone, on that warm start's games (`warm_starts`)."""
  _, processor, layout, model_cfg = _setup(config, workdir)
  system = steps_lib.LatentSystem.build(model_cfg, latent_lib.latent_config(config))
  stage_steps = [(stage, functools.partial(step_fn, system=system))
                 for stage, step_fn in ((LATENT_IDM, steps_lib.inverse_warmup_step),
                                        (LATENT_BC, steps_lib.policy_bc_step))]
  out = {}
  for folder, names in warm_starts(config, workdir):
    data = [ExpertData(config, workdir, g) for g in names]
    config_w = warm_start_config(config, names)
    # trained again (IDM, then BC) where the warm start was
    lineage.check_folders([os.path.join(folder, stage) for stage in (LATENT_IDM, LATENT_BC)],
                          {SFT: checkpoint.final_id(os.path.join(folder, SFT))})
    start = None
    for stage, train_step in stage_steps:
      c = config_w[stage]
      if start is None:
        params, extra = system.init(_sft_backbone(folder, model_cfg),
                                    jax.random.key(config.seed))
      else:
        params, extra = start
      tx = state_lib.make_optimizer(c.optimizer, c.num_steps)
      state = state_lib.TrainState.create(params, tx, jax.random.key(config.seed), extra)
      loader = _ExpertLoader(layout, data, c.batch_size, config.seed + 1,
                             wrap=lambda b: {"paired": {"image": b}})
      state, history = loop.train(stage, folder, state, train_step, loader, c.num_steps,
                                  checkpoint_every=c.checkpoint_every,
                                  log_every=c.log_every)
      start = (state.params, state.extra)
      prefix = _stage_prefix(config, stage, names)
      out.update({prefix + k: v for k, v in loop.final_metrics(history).items()})
  return out


def _latent_variables(folder: str, system, model_cfg):
  """The final (params, extra) of the latent policy of the warm start in `folder`."""
  abstract_backbone = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
  params, extra = system.abstract(abstract_backbone)
  loaded = checkpoint.load_final(os.path.join(folder, LATENT_BC),
                                 {"params": params, "extra": extra})
  return loaded["params"], loaded["extra"]


# ----------------------------------------------------------------------------- acting


class Actor:
  """One game's environments acting with the agent in one space, batched and jitted.

  The mesh and rules are `config.mesh`'s (`mesh_lib`; not the card picture's `Layout`):
  the rollout splits the environments over its batch axes (data x fsdp), `learner`
  lays out the PPO learner on it.
  """

  def __init__(self, config, workdir: str, game: str, space: str):
    config = game_config(config, game)
    _, processor, layout, model_cfg = _setup(config, workdir)
    self.config, self.game, self.space, self.layout = config, game, space, layout
    self.env = make_env(config, game)
    self.system = steps_lib.LatentSystem.build(model_cfg, latent_lib.latent_config(config))
    p = config.ppo
    self.agent = agent_lib.AgentConfig(
        self.system, ppo_lib.ValueHead(), ppo_config(config), space=space,
        temperature=p.temperature)
    latent_space = space == rollout_lib.LATENT
    sampling = rollout_lib.SamplingConfig(
        group_size=1, max_new_tokens=config.max_new_tokens, temperature=p.temperature,
        top_k=p.latent_top_k if latent_space else 0,
        stop_token_ids=tuple(model_cfg.eos_token_id), pad_token_id=model_cfg.pad_token_id or 0)
    self.mesh, self.rules = mesh_lib.make_mesh(config.mesh), mesh_lib.rules(config.mesh)
    # The environments' rows are split over the batch axes (data x fsdp), in the rollout
    # and in the learner; devices that differ only along "tensor" act on the same rows.
    self.shards = mesh_lib.batch_parallelism(self.mesh, self.rules)
    self.rollout = rollout_lib.sharded_rollout(self.system, self.mesh, space=space,
                                               sampling=sampling,
                                               axes=mesh_lib.batch_axes(self.rules))
    self.env_step = jax.jit(jax.vmap(self.env.step_autoreset))
    self.env_reset = jax.jit(jax.vmap(self.env.reset))
    # The game's own prompt, unpadded: left padding to the longest game's (as in the SFT
    # batches) changes no result, only the cost.
    ids = agent_lib.game_prompt_ids(processor, game, config.image_size)
    self.prompt_ids, self.prompt_mask = ids, np.ones(len(ids), np.int32)
    self.model_cfg = model_cfg

  def start_variables(self, workdir: str, rng) -> tuple[dict, dict]:
    """(params with a fresh value head, extra) of the space's warm start for the game
    (`warm_start_dir`)."""
    folder = warm_start_dir(self.config, workdir, self.game)
    if self.space == rollout_lib.TOKEN:
      params, extra = self.system.init(_sft_backbone(folder, self.model_cfg), rng)
    else:
      params, extra = _latent_variables(folder, self.system, self.model_cfg)
    params = dict(params, **{agent_lib.VALUE_HEAD: agent_lib.init_value_head(self.agent, rng)})
    return params, extra

  def check_batch_size(self, batch_size: int, field: str) -> None:
    """ConfigError naming `field` unless the mesh's batch shards divide `batch_size`."""
    mesh_lib.check_batch_size(batch_size, self.mesh, self.rules, field)

  def learner(self, make_state, params):
    """(layout, state, step) of the PPO learner on the mesh: the state make_state(params)
    sharded at birth by a `mesh_lib.Layout` of the agent's boxed params (the
    LatentSystem's and the value head's), and `ppo_step` jitted for it
    (`loop.jit_step`: fn(state, batch, step), the state donated). Place the batches with
    `rl.step.place_batch` and call the step inside `layout.context()`."""
    return ppo_learner(self.agent, self.mesh, self.rules, make_state, params)

  def prompts(self, obs) -> dict:
    """The rollout's prompts for a batch of frames, the images packed per batch shard."""
    return agent_lib.prompt_batch(self.prompt_ids, self.prompt_mask, obs,
                                  self.layout.image_size, shards=self.shards)

  def reset(self, rng, num_envs: int):
    obs, state = self.env_reset(jax.random.split(rng, num_envs))
    return obs, state

  def act(self, params, extra, obs, rng, np_rng):
    """(transition fields of one step, action indices, parse fallbacks) for a batch of frames."""
    prompts = self.prompts(obs)
    out = self.rollout(params, extra, prompts, rng)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    texts = rollout_lib.response_texts(out, self.layout.processor.tokenizer.decode)
    index, fallback = parser.parse_actions(texts, self.env.actions, np_rng)
    thought, action = _span_masks(self.layout.processor.tokenizer, tokens, mask)
    logp = np.asarray(out.logp)
    coef = self.config.ppo.thought_coef
    values = np.asarray(agent_lib.prompt_values(self.agent, params, prompts))
    fields = {"frames": np.asarray(obs), "tokens": tokens, "mask": mask,
              "actions": np.asarray(out.actions), "thought_mask": thought,
              "action_mask": action,
              "old_logp": (coef * (logp * thought).sum(1) + (logp * action).sum(1)),
              "old_values": values}
    return fields, index, fallback, texts


@functools.cache
def _ppo_step(agent: agent_lib.AgentConfig):
  """One step object per agent config: `loop.jit_step` compiles it once per layout."""
  return functools.partial(agent_lib.ppo_step, config=agent)


def ppo_learner(agent: agent_lib.AgentConfig, mesh, rules, make_state, params):
  """(layout, state, step): `Actor.learner` on a given mesh and logical-axis rules.

  The layout (`mesh_lib.Layout`) shards the state as the agent's boxed params say
  (`agent.boxed_params`: the backbone's and latent modules' logical axes, and the value
  head's), Adam's moments alike; the state is created sharded; the step is
  `agent.ppo_step` jitted by `loop.jit_step` with the state's shardings in and out.
  """
  layout = mesh_lib.Layout.build(mesh, rules, make_state, agent_lib.boxed_params(agent))
  step = loop.jit_step(_ppo_step(agent), layout)
  return layout, layout.init_state(make_state, params), step


def _span_masks(tokenizer, tokens: np.ndarray, mask: np.ndarray):
  thought = np.zeros(tokens.shape, np.float32)
  action = np.zeros(tokens.shape, np.float32)
  for row in range(tokens.shape[0]):
    n = int(mask[row].sum())
    t, a = parser.action_token_mask(tokenizer, tokens[row, :n].tolist())
    thought[row, :n], action[row, :n] = t, a
  return thought, action


def ppo_config(config) -> ppo_lib.PPOConfig:
  """`config.ppo` as a PPOConfig (value_clip / ratio_guard <= 0: off)."""
  fields = {f.name for f in dataclasses.fields(ppo_lib.PPOConfig)}
  values = {k: v for k, v in config.ppo.items() if k in fields}
  for name in ("value_clip", "ratio_guard"):
    if values[name] <= 0:
      values[name] = None
  return ppo_lib.PPOConfig(max_new_tokens=config.max_new_tokens, **values)


class Episodes:
  """Finished episodes of a batch of environments, counted without a bias to short ones.

  "Success over the last N episodes" taken in the order episodes finish favours short ones
  when environments run in parallel: stop as soon as N have finished and the long ones
  (NumberLine's failures run to the 10-step limit; its successes end in 1 to 5) have not
  finished yet, so a policy that fails a third of its deals could score 100%. Here an
  episode counts once every episode begun before it, in any environment, has finished: the
  episodes begun before the earliest start of those still running, ordered by when they
  began. Which episodes count then depends on their starts alone, never on their length
  or outcome. (The reference plays one environment, where the two orders agree.)
  """

  def __init__(self, num_envs: int, records=(), step: int = 0):
    """records: (start step, env, success, return) of episodes that already count."""
    self.records = [tuple(r) for r in records]
    self.step = step
    self.starts = np.full(num_envs, step, np.int64)  # when each env's current episode began

  def add(self, done: np.ndarray, success: np.ndarray, ret: np.ndarray) -> None:
    """One step of every environment (auto-resetting: a done env begins anew next step)."""
    for env in np.flatnonzero(done):
      self.records.append((int(self.starts[env]), int(env), bool(success[env]), float(ret[env])))
      self.starts[env] = self.step + 1
    self.step += 1

  def counted(self) -> list[tuple]:
    """The episodes that count (every episode begun before them has finished), by start."""
    cutoff = int(self.starts.min()) if len(self.starts) else self.step
    return sorted(r for r in self.records if r[0] < cutoff)

  def __len__(self) -> int:
    return len(self.counted())

  def success_rate(self, last: int) -> float:
    window = [r[2] for r in self.counted()[-last:]]
    return 100.0 * float(np.mean(window)) if window else float("nan")

  def state(self) -> dict:
    """The episodes that count, for a checkpoint. A resumed run resets its environments, so
    the episodes still running (and those begun after them) are left out."""
    return {"records": [list(r) for r in self.counted()], "step": self.step}

  @classmethod
  def restore(cls, num_envs: int, state: dict, where: str = "the checkpoint") -> "Episodes":
    """From `state()`. Raises ValueError for an earlier version's state (outcomes in
    finishing order, without their starts), which cannot be counted by start."""
    if "records" not in state:
      raise ValueError(f"{where} was written by an earlier version that counted episodes in "
                       "the order they finished, which cannot be counted by start; delete "
                       "that run's folder to run it again")
    return cls(num_envs, state["records"], state["step"])


# How a result's episodes were counted: "by start" (`Episodes`). Results written before it
# (no such field) counted in finishing order; the report marks them.
COUNTED = "by start"


def window(config, game: str) -> int:
  return config.eval.blackjack_episodes if game == "blackjack" else config.eval.episodes


def _rollout_steps(actor: Actor, params, extra, obs, env_state, steps: int, rng, np_rng,
                   episodes: Episodes, ret: np.ndarray):
  """Plays `steps` steps; returns (transitions [steps, E, ...], obs, env_state, ret, stats)."""
  fields, rewards, dones, fallbacks = [], [], [], []
  for t in range(steps):
    act_rng, env_rng = jax.random.split(jax.random.fold_in(rng, t))
    f, index, fallback, _ = actor.act(params, extra, obs, act_rng, np_rng)
    keys = jax.random.split(env_rng, obs.shape[0])
    obs, env_state, reward, done, info = actor.env_step(keys, env_state,
                                                        jnp.asarray(index, jnp.int32))
    reward, done = np.asarray(reward, np.float32), np.asarray(done)
    ret = ret + reward
    episodes.add(done, np.asarray(info["success"]), ret)
    ret = np.where(done, 0.0, ret)
    fields.append(f)
    rewards.append(reward)
    dones.append(done)
    fallbacks.append(fallback)
  stacked = {k: np.stack([f[k] for f in fields]) for k in fields[0]}
  stacked.update(rewards=np.stack(rewards), dones=np.stack(dones).astype(np.float32))
  return stacked, obs, env_state, ret, float(np.mean(fallbacks))


def evaluate(actor: Actor, params, extra, path: str, label: str, **fields) -> dict:
  """Plays actor's game with (params, extra) in `eval.num_envs` fresh environments until
  `window` episodes count (`Episodes`), acting as in training (the PPO temperature),
  `label` naming the policy on the progress bar; writes path (json) and returns
  {success_rate, episodes, window, counted, random_action_rate, **fields}.

  Every policy is evaluated from the same keys (the seed's), so the warm start and its PPO
  runs begin on the same deals."""
  config, game = actor.config, actor.game
  need, n = window(config, game), config.eval.num_envs
  actor.check_batch_size(n, "config.eval.num_envs")
  rng = jax.random.fold_in(jax.random.key(config.seed), 7)
  obs, env_state = actor.reset(rng, n)
  episodes, ret = Episodes(n), np.zeros(n, np.float32)
  np_rng = np.random.default_rng([config.seed, 7])
  fallback = []
  with tqdm(total=need, desc=f"evaluate {game} {label}") as bar:
    while len(episodes) < need:
      _, obs, env_state, ret, fb = _rollout_steps(
          actor, params, extra, obs, env_state, 1, jax.random.fold_in(rng, len(fallback)),
          np_rng, episodes, ret)
      fallback.append(fb)
      bar.update(min(need, len(episodes)) - bar.n)
  result = {"success_rate": episodes.success_rate(need), "episodes": len(episodes),
            "window": need, "counted": COUNTED, "random_action_rate": float(np.mean(fallback)),
            **fields}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  backbone_lib.write_json(path, result)
  return result


def eval_sft(config, workdir: str) -> dict:
  """The warm start alone, per game: success over the last `window` episodes played."""
  out = {}
  for game in games(config):
    path = os.path.join(workdir, game, "eval_sft.json")
    result = _evaluate_start(config, workdir, game, rollout_lib.TOKEN, path, "sft")
    out[f"{game}/sft/success_rate"] = result["success_rate"]
  return out


def start_sources(config, workdir: str, game: str, space: str) -> lineage.Sources:
  """The checkpoint the space's start for `game` is (`Actor.start_variables`), by its id
  (`training.lineage`): the warm start's SFT, or its latent policy's BC."""
  stage = SFT if space == rollout_lib.TOKEN else LATENT_BC
  folder = warm_start_dir(config, workdir, game)
  return {stage: checkpoint.final_id(os.path.join(folder, stage))}


def _evaluate_start(config, workdir: str, game: str, space: str, path: str, label: str,
                    **fields) -> dict:
  """The result at `path` of `evaluate` on the space's start (`Actor.start_variables`):
  evaluated where there is none or where it was made from an earlier start (that one is
  moved aside: `lineage.check_result`), checked to be of config's warm start
  (`check_made_from`)."""
  sources = start_sources(config, workdir, game, space)
  lineage.check_result(path, sources)
  if not os.path.isfile(path):
    actor = Actor(config, workdir, game, space)
    rng = jax.random.fold_in(jax.random.key(config.seed), 7)
    params, extra = actor.start_variables(workdir, rng)
    evaluate(actor, params, extra, path, label, warm_start=config.warm_start,
             made_from=dict(sources), **fields)
  result = _json(path)
  check_made_from(config, path, result)
  return result


def eval_latent(config, workdir: str) -> dict:
  """The latent policy of the `latent` stage alone (before PPO), per game, as `eval_sft`
  evaluates the warm start: it tells a weak start from a harmful PPO update.

  The result records the policy's BC steps; one made after fewer or more steps than the
  config's is evaluated again, the old one kept beside it (eval_latent.bc<steps>.json)."""
  out = {}
  for game in games(config):
    path = os.path.join(workdir, game, "eval_latent.json")
    bc_steps = game_config(config, game).latent_bc.num_steps
    if os.path.isfile(path):
      made = _json(path).get("bc_steps")
      if made != bc_steps:
        os.replace(path, os.path.join(workdir, game, f"eval_latent.bc{made}.json"))
    result = _evaluate_start(config, workdir, game, rollout_lib.LATENT, path, "latent bc",
                             bc_steps=bc_steps)
    out[f"{game}/latent_bc/success_rate"] = result["success_rate"]
  return out


# ----------------------------------------------------------------------------- PPO


def _flatten(transitions: dict) -> dict:
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in transitions.items()}


def _ppo_run(config, workdir: str, game: str, space: str) -> tuple[dict, dict]:
  """(training result, evaluation) of PPO on `game` in `space`, each written to the run's
  folder (result.json, eval.json).

  The training result is success over the last `window` episodes finished in training (as
  the reference reports it; a short run finishes fewer). The evaluation plays the trained
  policy in fresh environments until `window` episodes count, as `eval_sft` plays the
  warm start. A run whose result.json exists is done and is evaluated if it was not yet; a
  run (done or not) made from an earlier start is moved aside and made again
  (`lineage.check_folders`)."""
  name = f"ppo_{space}"
  stage_dir = os.path.join(workdir, game, name)
  sources = dict(start_sources(config, workdir, game, space))
  lineage.check_folders([stage_dir], sources)
  result_path = os.path.join(stage_dir, "result.json")
  eval_path = os.path.join(stage_dir, "eval.json")
  trained = _json(result_path) if os.path.isfile(result_path) else None
  if trained is not None:
    check_made_from(config, result_path, trained)
  if trained is not None and os.path.isfile(eval_path):
    evaluation = _json(eval_path)
    if evaluation.get("updates") == trained["updates"]:
      return trained, evaluation
  actor = Actor(config, workdir, game, space)
  config = actor.config  # the game's (`game_config`)
  p = config.ppo
  actor.check_batch_size(p.num_envs, "config.ppo.num_envs")
  actor.check_batch_size(p.minibatch_size, "config.ppo.minibatch_size")
  rng = jax.random.fold_in(jax.random.key(config.seed), 11)
  params, extra = actor.start_variables(workdir, rng)
  os.makedirs(stage_dir, exist_ok=True)
  pcfg = actor.agent.ppo
  optimizer, horizon = ppo_lib.ppo_optimizer_config(pcfg)
  optimizer.trainable = tuple(t for t in p.trainable if t) or agent_lib.TRAINABLE[space]
  n_items = pcfg.batch_size
  tx = state_lib.make_optimizer(optimizer, horizon)
  make_state = functools.partial(state_lib.TrainState.create, tx=tx,
                                 rng=jax.random.key(config.seed), extra=extra)
  layout, state, step = actor.learner(make_state, params)
  need = window(config, game)
  history, episodes = [], Episodes(p.num_envs)
  log = metrics_lib.MetricsLog(os.path.join(stage_dir, "metrics.jsonl"))
  with checkpoint.Checkpointer(stage_dir) as ckpt:
    start = 0
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(state)
      state, start, history = restored.state, restored.step, restored.history
      episodes = Episodes.restore(p.num_envs, restored.loader_state, stage_dir)
    if trained is not None:
      if start != trained["updates"]:
        raise ValueError(f"{result_path} reports {trained['updates']} updates but the "
                         f"run's last checkpoint is of update {start}: the trained policy "
                         "to evaluate is gone (delete the folder to train it again)")
      return trained, evaluate(actor, state.params, state.extra, eval_path, name,
                               updates=start, warm_start=config.warm_start, made_from=sources)
    log.reset(history)
    obs, env_state = actor.reset(jax.random.fold_in(rng, 1000 + start), p.num_envs)
    ret = np.zeros(p.num_envs, np.float32)
    with tqdm(total=p.num_updates, initial=start, desc=f"{game} {name}") as bar:
      for update in range(start + 1, p.num_updates + 1):
        update_rng = jax.random.fold_in(rng, update)
        np_rng = np.random.default_rng([config.seed, update])
        transitions, obs, env_state, ret, fallback = _rollout_steps(
            actor, state.params, state.extra, obs, env_state, p.num_steps, update_rng, np_rng,
            episodes, ret)
        last_value = agent_lib.prompt_values(actor.agent, state.params, actor.prompts(obs))
        advantages, returns = ppo_lib.advantages_and_returns(
            pcfg, jnp.asarray(transitions["rewards"]), jnp.asarray(transitions["old_values"]),
            jnp.asarray(transitions["dones"]), last_value)
        transitions.update(advantages=np.asarray(advantages), returns=np.asarray(returns))
        flat = _flatten(transitions)
        flat["prompt_ids"] = np.tile(actor.prompt_ids, (n_items, 1))
        flat["prompt_mask"] = np.tile(actor.prompt_mask, (n_items, 1))
        sums: dict[str, list] = {}
        order = np.asarray(ppo_lib.minibatch_indices(jax.random.fold_in(update_rng, 1),
                                                     n_items, pcfg.minibatch_size, pcfg.epochs))
        for minibatches in order:
          for index in minibatches:
            # Rows split over the batch axes, the packed frames replicated.
            batch = rl_step_lib.place_batch(
                layout, agent_lib.update_batch(flat, index, actor.layout.image_size))
            # ppo_step draws no key: the step number only keys jit_step's unused fold_in.
            with layout.context():
              state, metrics = step(state, batch, update)
            for key, value in metrics_lib.scalars(metrics).items():
              sums.setdefault(key, []).append(value)
        record = {"step": update, **{k: float(np.mean(v)) for k, v in sums.items()},
                  "reward_mean": float(transitions["rewards"].mean()),
                  "random_action_rate": fallback, "episodes": len(episodes),
                  "success_rate": episodes.success_rate(need)}
        history.append(record)
        log.append(record)
        ckpt.save(update, state, loader_state=episodes.state(),
                  history=list(history), num_steps=p.num_updates)
        bar.set_postfix(success=f"{record['success_rate']:.1f}", refresh=False)
        bar.update(1)
  metrics_lib.plot_metrics(os.path.join(stage_dir, "metrics.jsonl"),
                           os.path.join(stage_dir, "curves.png"),
                           ["success_rate", "reward_mean", "value_loss", "policy_loss"])
  trained = {"success_rate": episodes.success_rate(need), "episodes": len(episodes),
             "window": need, "counted": COUNTED, "updates": p.num_updates,
             "env_steps": p.num_updates * n_items, "warm_start": config.warm_start,
             "made_from": sources}
  backbone_lib.write_json(result_path, trained)
  return trained, evaluate(actor, state.params, state.extra, eval_path, name,
                          updates=p.num_updates, warm_start=config.warm_start,
                          made_from=sources)


def _ppo_stage(config, workdir: str, space: str) -> dict:
  out = {}
  for game in games(config):
    trained, evaluation = _ppo_run(config, workdir, game, space)
    out[f"{game}/ppo_{space}/success_rate"] = evaluation["success_rate"]
    out[f"{game}/ppo_{space}/train_success_rate"] = trained["success_rate"]
  return out


def ppo_token(config, workdir: str) -> dict:
  return _ppo_stage(config, workdir, rollout_lib.TOKEN)


def ppo_latent(config, workdir: str) -> dict:
  return _ppo_stage(config, workdir, rollout_lib.LATENT)


# ----------------------------------------------------------------------------- report


# (label, result file, the space whose start it was made from): the policies evaluated
# alike (`evaluate`), then PPO's success over the last episodes of its training, as the
# reference reports it.
_T, _L = rollout_lib.TOKEN, rollout_lib.LATENT
ROWS = (("SFT only", "eval_sft.json", _T), ("latent BC only", "eval_latent.json", _L),
        ("token PPO", "ppo_token/eval.json", _T),
        ("latent PPO", "ppo_latent/eval.json", _L),
        ("token PPO, in training", "ppo_token/result.json", _T),
        ("latent PPO, in training", "ppo_latent/result.json", _L))
TITLES = {"numberline": "NumberLine", "ezpoints": "EZPoints", "points24": "Points24",
          "blackjack": "Blackjack"}


def flat_fields(tree, prefix: str = "") -> dict:
  """{dotted path: value} of the leaves of a nested mapping (a config or its dict)."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _per_game_lines(config, names: Sequence[str]) -> list[str]:
  """The report's lines naming each listed game's `config.per_game` values, if any."""
  per_game = config.get("per_game", {})
  listed = [g for g in names if per_game.get(g)]
  if not listed:
    return []
  return ["Per-game settings, in place of the job's for that game (`config.per_game`): "
          + "; ".join(f"{TITLES[g]}: " + ", ".join(
              f"{k}={v}" for k, v in flat_fields(per_game[g]).items())
                      for g in listed) + ".", ""]


def report(config, workdir: str) -> dict:
  """workdir/cards_results.md and .json: our success rates beside the reference's."""
  names = games(config)
  table, out, stale, starts = {}, {}, set(), {}
  for label, rel, space in ROWS:
    for game in names:
      path = os.path.join(game_workdir(config, workdir, game), game, rel)
      if os.path.isfile(path):
        table.setdefault(label, {})[game] = result = _json(path)
        if (game, space) not in starts:
          starts[game, space] = start_sources(config, workdir, game, space)
        if lineage.changed(result.get("made_from"), starts[game, space]):
          stale.add((label, game))
  read = (f", reading pretraining first ({config.reading.glyph_steps} glyph steps, "
          f"{config.reading.steps} reading steps)" if reading_steps(config) else "")
  each = {SHARED: "one warm start on every game listed", PER_GAME: "one warm start per game",
          SEPARATE: "each game a job of its own in <workdir>/<game>/ (its own expert data, "
                    "tokenizer, reading stage and warm start)"}[config.warm_start]
  lines = ["# Card games: success rate (%)", "",
           f"Ours: a tiny Qwen2.5-VL trained from scratch{read}, {each} "
           "(config in config.json); "
           f"success over the last {config.eval.episodes} episodes "
           f"({config.eval.blackjack_episodes} for Blackjack), as the reference counts, "
           "taken by when they began (an episode counts once every episode begun before it "
           "has finished, so short episodes do not crowd out long ones). The warm start "
           "and the trained PPO policies are each evaluated in "
           f"{config.eval.num_envs} fresh environments from the same keys; the rows "
           "'in training' are PPO's last episodes of training, as the reference reports "
           f"them ({config.ppo.num_updates} updates of {config.ppo.num_envs} x "
           f"{config.ppo.num_steps} steps: fewer episodes than the window where the "
           "count says so). Reference: RL4VLM with LLaVA-1.6-7B (SPEC section 4).", "",
           *_per_game_lines(config, names),
           "| method | " + " | ".join(TITLES[g] for g in names) + " |",
           "|---|" + "---:|" * len(names)]
  finishing_order = False
  for label, _, _ in ROWS:
    cells = []
    for game in names:
      r = table.get(label, {}).get(game)
      r = r if r is not None and r["episodes"] else None
      mark = "" if r is None or r.get("counted") == COUNTED else " †"
      finishing_order |= bool(mark)
      mark += " ‡" if r is not None and (label, game) in stale else ""
      cells.append("—" if r is None else f"{r['success_rate']:.1f} ({r['episodes']} ep.){mark}")
      if r is not None:
        out[f"{game}/{label}"] = r["success_rate"]
    lines.append(f"| ours: {label} | " + " | ".join(cells) + " |")
  experts_row = []
  for game in names:
    _, meta = _expert_paths(game_workdir(config, workdir, game), game)
    experts_row.append(f"{100 * _json(meta)['success_rate']:.1f}" if os.path.isfile(meta)
                       else "—")
  lines.append("| expert solver (the SFT data) | " + " | ".join(experts_row) + " |")
  for label, values in REFERENCE.items():
    lines.append(f"| reference: {label} | " + " | ".join(f"{values[g]:.1f}" for g in names)
                 + " |")
  if finishing_order:
    lines += ["", "† written by an earlier version, which took the episodes in the order they "
              "finished: with environments in parallel that favours short episodes "
              "(NumberLine's failures run to its 10-step limit), so these overstate success."]
  if stale:
    lines += ["", "‡ made from an earlier warm start (or latent policy) than the one in the "
              "workdir now, which was trained again since: run its stage again to make it "
              "from this one (the old result is kept beside it)."]
  path = os.path.join(workdir, "cards_results.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)
  backbone_lib.write_json(os.path.join(workdir, "cards_results.json"), table)
  logging.info("cards results:\n%s", "\n".join(lines))
  return {f"report/{k}": v for k, v in out.items()}


def restore_results(config, table_path: str, workdir: str, names: Sequence[str]) -> list[str]:
  """Writes the results of the games `names` that a report's table (its cards_results.json,
  at `table_path`) holds back where their job wrote them under `workdir`
  (`game_workdir`), so that a report over `workdir` takes them as they were made.

  For a report over jobs some of which ran in a workdir that is gone: a game of
  warm_start="separate" run again, the others' results restored beside it. Their
  checkpoints are not restored, so nothing marks these results stale (`lineage.changed`),
  and the expert row needs the game's expert stage run in its workdir (seconds; the expert
  is deterministic). A file already there is kept; one that differs is an error. Returns
  the paths written."""
  if not os.path.isfile(table_path):
    raise FileNotFoundError(f"{table_path}: no such results table (a cards report's "
                            "cards_results.json)")
  table = _json(table_path)
  for game in names:
    if not any(game in table.get(label, {}) for label, _, _ in ROWS):
      raise ValueError(f"{table_path} holds no results for {game!r} (it has "
                       f"{sorted({g for row in table.values() for g in row})})")
  missing = {}  # {path: result} of the files not there yet
  for label, rel, _ in ROWS:
    for game in names:
      if game in table.get(label, {}):
        path = os.path.join(game_workdir(config, workdir, game), game, rel)
        result = table[label][game]
        if not os.path.isfile(path):
          missing[path] = result
        elif _json(path) != result:
          raise FileExistsError(f"{path} is there and differs from {label!r} for {game} in "
                                f"{table_path}: left as it is, nothing restored")
  for path, result in missing.items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    backbone_lib.write_json(path, result)
  return list(missing)


STAGES = {"expert": expert, "tokenizer": tokenizer, "reading": reading, "sft": sft,
          "eval_sft": eval_sft, "latent": latent, "eval_latent": eval_latent,
          "ppo_token": ppo_token,
          "ppo_latent": ppo_latent, "report": report}
ALL_STAGES = ",".join(STAGES)
