"""The embedded default pipeline over the synthetic world, stage by stage.

`config.stages` lists the stages to run, in order. Every stage writes under the
workdir and is idempotent: a second run reuses what exists. The stages:

  prepare_data: builds the tfds datasets (paired, text-only, role-play,
    personalised: the synthetic world's, or MMRole / PCogAlignBench for the dialogue
    tasks given config.data.mmrole_dir / pcogalign_dir) under workdir/data and trains
    the BPE tokenizer on their training text into workdir/tokenizer.
  pretrain: trains a tiny Qwen2.5-VL from scratch on paired + text-only data (or
    starts from `backbone.checkpoint`); workdir/pretrain/ holds checkpoints,
    metrics.jsonl, curves.png and an HF export in hf/.
  sft: token-level task SFT from pretrain's final params on the role-play and
    personalised sft split; the same outputs under workdir/sft/.
  inverse_warmup, cycle_warmup, inverse_joint, policy_bc, latent_sft: the latent
    action model's stages (SPEC section 2), from pretrain's backbone; see
    `latent_mca.stages.latent` for what each trains and measures.
  rl: GRPO / Dr.GRPO / DAPO / BNPO in latent and token space (`latent_mca.stages.rl`).
  evaluate: every policy on the held-out test sets with the judge (`stages.evaluate`).
  ablations: no cycle / no projector / no text-only data, each retrained, latent RL and
    evaluated like the full run (`stages.ablations`).
  report: the study's tables, claims and plots over every seed (`stages.report`).

Training stages resume from their last checkpoint when rerun; a stage whose
predecessor has not finished raises an error naming it. `config.seeds` runs every stage
but report once per seed (the first seed in the workdir, the others in seed_<s>/), and
each seed's stage wall times go to its stage_seconds.json.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import logging

import transformers
from tqdm import tqdm

from latent_mca.compilation_cache import fast_compile
from latent_mca.config_schema import ConfigError
from latent_mca.data import real
from latent_mca.data.tokenizers import train_bpe_tokenizer
from latent_mca.parallel import distributed
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.stages import ablations as ablations_lib
from latent_mca.stages import backbone
from latent_mca.stages import data as data_lib
from latent_mca.stages import evaluate as evaluate_lib
from latent_mca.stages import latent
from latent_mca.stages import report as report_lib
from latent_mca.stages import rl
from latent_mca.training import metrics as metrics_lib
from latent_mca.training import precision
from latent_mca.training.state import optimizer_config


def default_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of the pipeline.

  On 2 CPU cores: prepare_data about 30 s, pretrain about 1.5-2.5 min, sft about 1 min.
  """
  c = ml_collections.ConfigDict()
  c.job = "pipeline"
  c.stages = "prepare_data"  # comma-separated, run in order
  c.seed = 0
  # Several seeds, comma-separated ("" = just `seed`): every stage but report runs once per
  # seed, the first seed's in the workdir itself (so adding seeds to a finished run reuses
  # it), seed s's in workdir/seed_<s>; report then aggregates over all of them.
  c.seeds = ""
  # XLA compiles quickly instead of producing fast code (`compilation_cache.fast_compile`):
  # for tiny models, whose programs take longer to compile than to run (the smoke config).
  c.xla_fast_compile = False
  # The real benchmarks, from local folders in their published layouts (`latent_mca.data.real`);
  # empty = the synthetic world's task of that kind. Either one replaces its task's four splits
  # (`tfds_builders.MMRoleTask` / `PCogAlignBenchTask`):
  #   mmrole_dir (the MMRole_dataset folder): the dialogues have no train/test split, so
  #     in-distribution characters' dialogues go 50 / 40 / 10% to sft / rl / test_in by a hash
  #     of their id (`tasks.split_of`, as the synthetic ones), out-of-distribution ones to test_out.
  #   pcogalign_dir (PCogAlignBench or its version_v4/): test_in / test_out are
  #     HCMAS-golden-test.json / HCSHR-golden-test.json, the only files with reference replies;
  #     sft / rl divide HCMAS-train.json 5 : 4 by id hash, keeping the instances that carry a
  #     reference reply ("golden_response", absent from the published train file: add them).
  # Examples without a reference reply (or a user turn before it) are dropped and counted in
  # the log; a split left empty is an error. A folder that lacks a file of the layout fails
  # before anything is built, naming the field and the file. A changed folder (its JSON
  # files' sizes or times) is built anew. Images are stored resized to at most image_size^2
  # pixels (aspect kept as the processor keeps it), the stages' per-image budget. dialogue_in /
  # dialogue_out size the synthetic tasks only: a benchmark is read whole. The paired and
  # text-only pretraining data stay synthetic: neither benchmark has image-caption pairs or a
  # text-only corpus. Real data needs the LLM judge for rl (the programmatic one checks
  # synthetic scenes): --config.rl.judge.kind=llm.
  c.data = ml_collections.ConfigDict(dict(
      image_size=56,  # pixels of the rendered scenes (224+ for real runs); real images' budget
      paired_train=2000, paired_test=200,
      text_train=2000, text_test=200,
      dialogue_in=1000, dialogue_out=100,  # per task; in-distribution -> sft / rl / test_in
      mmrole_dir="", pcogalign_dir="",
      skip_bad=False,  # benchmarks: skip (and log) bad files and examples instead of failing
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=2048))
  # The backbone: a local Hugging Face Qwen2.5-VL folder (pretrain starts from it and uses
  # its tokenizer), or, empty, a tiny model trained from scratch with the sizes below; its
  # vocabulary and special token ids are the prepared tokenizer's. Field names are those of
  # `qwen2_5_vl.TextConfig` / `VisionConfig`.
  c.backbone = ml_collections.ConfigDict(dict(
      checkpoint="",
      text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                mrope_section=(4, 6, 6), max_position_embeddings=4096),  # sums to head_dim/2
      vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                  fullatt_block_indexes=(1,)),
      tie_word_embeddings=True,
      # Rematerialisation of each block in the backward pass (real sizes): "none", "full",
      # "dots_saveable" or "dots_with_no_batch_dims_saveable" (`qwen2_5_vl.REMAT_POLICIES`).
      remat="none",
  ))
  # Parallelism and numerics of the training stages: the mesh (by default every device
  # data-parallel) and the logical-axis rules (`latent_mca.parallel.mesh`); the compute and
  # parameter dtypes (`latent_mca.training.precision`: fp32, or a bf16 forward over fp32
  # master weights).
  c.mesh = mesh_lib.mesh_config()
  c.precision = precision.precision_config()
  # Multi-host: how experiments.run starts JAX's distributed runtime (or the LATENT_MCA_*
  # environment variables; nothing set = one process). See `latent_mca.parallel.distributed`.
  c.distributed = distributed.distributed_config()
  # Backbone pretraining on paired (answer after the image) + text-only documents, all
  # parameters; batches of batch_size x seq_len tokens (the ~1% of longer examples are cut
  # at the end) with an image budget of one image per example. eval_examples: per held-out
  # set (0 = all of it). With sft below, about 3 minutes on 2 CPU cores (compiling included).
  pretrain_optimizer = optimizer_config()
  pretrain_optimizer.update(dict(learning_rate=2e-3, warmup_steps=50, final_fraction=0.1,
                                 weight_decay=0.01))
  c.pretrain = ml_collections.ConfigDict(dict(
      num_steps=400, batch_size=8, seq_len=128, optimizer=pretrain_optimizer,
      eval_every=100, eval_examples=64, checkpoint_every=200, log_every=25,
  ))
  # Task SFT from pretrain's final params on the dialogues' sft split (assistant turns only);
  # evaluated on test_in. At seq_len 256, ~3% of the dialogues lose the end of their reply.
  sft_optimizer = optimizer_config()
  sft_optimizer.update(dict(learning_rate=1e-3, warmup_steps=20, final_fraction=0.1,
                            weight_decay=0.01))
  c.sft = ml_collections.ConfigDict(dict(
      num_steps=200, batch_size=4, seq_len=256, optimizer=sft_optimizer,
      eval_every=50, eval_examples=64, checkpoint_every=100, log_every=25,
  ))
  # The latent action model (SPEC section 2): its constants, then one config per stage
  # (steps, batch, seq_len, optimizer with the parameters the stage trains, intervals).
  # The SPEC gives no learning rates for these stages; these suit the tiny backbone. The
  # SPEC's IDM of 4 layers and policy of 8 sit on a 36-layer 3B backbone; on the demo's
  # 4-layer one they are 2 and 4 (configs/qwen2_5_vl_*.py keep the SPEC's). With the
  # stages' lengths this keeps the whole study within 30 minutes on 2 CPU cores.
  c.latent = latent.latent_defaults()
  c.latent.update(dict(idm_layers=2, policy_layers=4))
  c.inverse_warmup = latent.stage_defaults(150, 8, 128, 1e-3, "inverse_warmup", warmup_steps=20)
  c.cycle_warmup = latent.stage_defaults(100, 8, 128, 3e-3, "cycle_warmup")
  c.inverse_joint = latent.stage_defaults(100, 8, 128, 5e-4, "inverse_joint")
  c.policy_bc = latent.stage_defaults(100, 8, 128, 1e-3, "policy_bc", warmup_steps=20)
  c.latent_sft = latent.stage_defaults(100, 4, 256, 5e-4, "latent_sft", warmup_steps=20)
  for stage in latent.ORDER:
    c[stage].eval_every = c[stage].num_steps // 2
  # The demo's latent_sft conditions the world model on the IDM's codes, not the policy's
  # argmax (SPEC): with the policy's, the world model learns to ignore the code (at 48% of
  # reply steps all the policy's top-32 codes decode one token) and latent RL cannot move
  # the reward. results/latent_sft_codes.md has both measured.
  c.latent_sft.codes = "idm"
  # RL (SPEC sections 2-3): each listed algorithm in each listed action space (rl.run_all).
  c.rl = rl.rl_defaults()
  # The demo's sizes, chosen so that the whole study (11 RL runs with the ablations') fits
  # in 30 minutes on 2 CPU cores: prompts of up to 192 tokens (5% of the rl split are longer
  # and left out), replies of up to 64, 8 steps of 2 prompts x 8 at lr 2e-4 (the
  # reference's 1e-6 is for 3B), evaluated on 8 fixed rl-split prompts before and after
  # (results/rl_demo_cpu/ has a 40-step, 4-prompt run of each at lr 1e-4). Replies of 64,
  # not the sft replies' ~48: the sft policy's replies average ~37 tokens, and DAPO's
  # overlong penalty starts at 0.8 x max_new_tokens (51 here), which must lie beyond the
  # replies the task needs.
  c.rl.update(dict(prompt_length=192, max_new_tokens=64, num_steps=8, prompts_per_step=2,
                   eval_every=0, eval_prompts=8))
  # DAPO's overlong penalty (up to -1) is sized for its +-1 rewards; the judge's rewards
  # are ~0.15 with a within-group spread of ~0.05, so the demo weighs the penalty 0.1.
  c.rl.overlong_penalty_factor = 0.1
  c.rl.optimizer.learning_rate = 2e-4
  # The evaluate stage: every policy's judge reward on 16 prompts of each test set, one
  # reply each, 32 prompts per rollout (`stages.evaluate`).
  c.evaluate = evaluate_lib.evaluate_defaults()
  c.evaluate.update(dict(examples=16, batch_prompts=32))
  # The ablations stage: each switch off, retrained from its first changed stage, latent RL
  # with `algorithm` and evaluated as the full run's row (`stages.ablations`).
  c.ablations = ablations_lib.ablations_defaults()
  return c


ALL_STAGES = "prepare_data,pretrain,sft," + ",".join(latent.ORDER)
# The whole study: the stages above, RL in both spaces, evaluation, ablations and the report.
STUDY_STAGES = ALL_STAGES + ",rl,evaluate,ablations,report"


def smoke_config() -> ml_collections.ConfigDict:
  """Every stage at tiny sizes (a world of 40 examples per split, a 2-layer backbone of
  width 32, a few steps each): checks the whole graph, compiling most of the time."""
  c = default_config()
  c.stages = STUDY_STAGES
  c.xla_fast_compile = True
  c.rl.algorithm, c.rl.action_space = "grpo,dr_grpo,dapo,bnpo", "token,latent"
  c.data.update(dict(paired_train=40, paired_test=8, text_train=40, text_test=8,
                     dialogue_in=40, dialogue_out=8))
  c.tokenizer.vocab_size = 2000  # the small corpus gives fewer: dialogues fit sft's seq_len
  smoke_model(c)
  c.rl.update(dict(num_steps=4, prompts_per_step=2, group_size=4, max_new_tokens=16,
                   prompt_length=256, eval_every=0, eval_prompts=4, checkpoint_every=2,
                   token_top_layers=1))
  c.rl.optimizer.learning_rate = 1e-3
  stages = [("pretrain", 24, 64), ("sft", 12, 224)] + [
      (stage, 6, 224 if stage == "latent_sft" else 64) for stage in latent.ORDER]
  for stage, steps, seq_len in stages:
    c[stage].update(dict(num_steps=steps, batch_size=4, seq_len=seq_len, eval_every=0,
                         eval_examples=8, checkpoint_every=steps // 3, log_every=2))
    c[stage].optimizer.update(dict(learning_rate=1e-2, warmup_steps=0))
  return c


def smoke_model(c: ml_collections.ConfigDict) -> None:
  """Shrinks `c.backbone` and `c.latent` in place to the smoke tests' sizes: a 2-layer
  backbone of width 32, a 1-block vision tower, 16 codes and 1-layer latent heads."""
  c.backbone.text.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1,
                              mrope_section=(2, 3, 3)))
  c.backbone.vision.update(dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                fullatt_block_indexes=(0,)))
  c.latent.update(dict(num_codes=16, idm_layers=1, policy_layers=1))


_NOT_TEXT = ("id", "image_path")  # identifiers and serialised scenes, not language


def _texts(value):
  """Every string in a decoded example, nested ones too (dialogue turns, profiles)."""
  if isinstance(value, bytes):
    yield value.decode()
  elif isinstance(value, dict):
    for key, item in value.items():
      if key not in _NOT_TEXT:
        yield from _texts(item)
  elif isinstance(value, (list, tuple)):
    for item in value:
      yield from _texts(item)


def _training_texts(sources: dict):
  """The text of every training split (paired/text-only "train", dialogue "sft" and "rl")."""
  for name, source in sources.items():
    if name.rsplit("/", 1)[1] not in ("train", "sft", "rl"):
      continue
    for i in tqdm(range(len(source)), desc=f"tokenizer corpus {name}", leave=False):
      yield from _texts(source[i])


def prepare_tokenizer(config, workdir: str, sources: dict) -> transformers.PreTrainedTokenizerBase:
  """The BPE tokenizer in workdir/tokenizer: loaded if there, else trained on the train splits."""
  folder = os.path.join(workdir, "tokenizer")
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    logging.info("reusing the tokenizer in %s", folder)
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  tokenizer = train_bpe_tokenizer(_training_texts(sources), vocab_size=config.tokenizer.vocab_size)
  tmp = folder + ".tmp"  # written whole, then renamed: an interrupted run leaves no half folder
  tokenizer.save_pretrained(tmp)
  os.replace(tmp, folder)
  return tokenizer


def prepare_data(config, workdir: str) -> dict:
  """Builds (or reuses) every dataset and the tokenizer; returns split sizes and vocab size."""
  data_dir = os.path.join(workdir, "data")
  sources = {}
  for name, builder in data_lib.datasets(config, data_dir).items():
    try:
      builder.download_and_prepare()
    except real.DataError as e:  # raised reading a benchmark folder: name the field too
      raise real.DataError(f"config.data.{data_lib.REAL_TASKS[name][0]}: {e}") from e
    for split, source in builder.as_data_source().items():
      sources[f"{name}/{split}"] = source
  tokenizer = prepare_tokenizer(config, workdir, sources)
  sizes = {name: len(source) for name, source in sources.items()}
  with open(os.path.join(workdir, "data_summary.json"), "w") as f:
    json.dump(dict(examples=sizes, tokenizer_size=len(tokenizer)), f, indent=2)
  logging.info("datasets: %s; tokenizer: %d tokens", sizes, len(tokenizer))
  return {**{f"examples/{k}": v for k, v in sizes.items()}, "tokenizer_size": len(tokenizer)}


STAGES = {"prepare_data": prepare_data, "pretrain": backbone.pretrain, "sft": backbone.sft,
          **latent.STAGES, "rl": rl.run_all,
          "evaluate": evaluate_lib.evaluate, "ablations": ablations_lib.run,
          "report": report_lib.report}
ACROSS_SEEDS = ("report",)  # stages that run once, over every seed's workdir


def seeds(config) -> list[int]:
  """config.seeds as integers (config.seed alone when empty)."""
  try:
    out = [int(s) for s in config.seeds.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"config.seeds={config.seeds!r}: comma-separated integers, e.g. 0,1,2")
  if len(set(out)) < len(out):
    raise ConfigError(f"config.seeds={config.seeds!r} repeats a seed")
  return out or [config.seed]


def seed_workdir(workdir: str, config, seed: int) -> str:
  """Where a seed's stages run: the workdir for the first seed, workdir/seed_<s> for others."""
  return workdir if seed == seeds(config)[0] else os.path.join(workdir, f"seed_{seed}")


def _record_seconds(workdir: str, stage: str, seconds: float) -> None:
  """Adds a stage's wall time to workdir/stage_seconds.json (a resumed stage counts the
  rerun's time; a reused one, its few seconds)."""
  os.makedirs(workdir, exist_ok=True)  # a stage that had nothing to write leaves none
  path = os.path.join(workdir, "stage_seconds.json")
  times = backbone.read_json(path) if os.path.isfile(path) else {}
  times[stage] = round(seconds, 1)
  backbone.write_json(path, times)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.stages` in order, for every seed; returns the metrics of all of them
  (prefixed seed_<s>/ when there are several seeds)."""
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ConfigError(f"config.stages: unknown stage(s) {unknown}; known: {sorted(STAGES)}")
  if config.xla_fast_compile:
    fast_compile()
  # Plots are drawn by a second process while the stages go on; all finished on return.
  with metrics_lib.background_plots():
    return _run_stages(config, workdir, stages)


def _run_stages(config: ml_collections.ConfigDict, workdir: str, stages: list[str]) -> dict:
  chosen = seeds(config)
  metrics = {}
  for seed in chosen:
    one = config.copy_and_resolve_references()
    one.seed = seed
    folder = seed_workdir(workdir, config, seed)
    for stage in stages:
      if stage in ACROSS_SEEDS:
        continue
      logging.info("stage %s (seed %d)", stage, seed)
      began = time.time()
      out = STAGES[stage](one, folder)
      _record_seconds(folder, stage, time.time() - began)
      prefix = f"seed_{seed}/" if len(chosen) > 1 else ""
      metrics.update({prefix + k: v for k, v in out.items()})
  for stage in stages:
    if stage in ACROSS_SEEDS:
      logging.info("stage %s (seeds %s)", stage, chosen)
      metrics.update(STAGES[stage](config, workdir))
  return metrics
