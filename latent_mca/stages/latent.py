"""The latent action model's stages of the pipeline (SPEC section 2), in order:

  inverse_warmup  paired data: inverse dynamics, codebook, world-model merge MLPs.
  cycle_warmup    paired data: projector P and inverse projector P' (skipped without
                  a projector: the no-projector ablation has nothing to initialise).
  inverse_joint   half paired, half text-only: the modules of both stages above.
  policy_bc       paired + text-only: the policy clones the IDM's argmax codes.
  latent_sft      task dialogues: the backbone's language model and the world model,
                  conditioned on the frozen policy's argmax code (latent_sft.codes=
                  "policy", SPEC) or the frozen IDM's ("idm").

The first starts from the final backbone of `config.latent.backbone_stage` (pretrain)
and fresh latent modules; each later one from the final checkpoint of the enabled stage
before it, and raises `CheckpointNotFoundError` naming that stage when it is missing.
The frozen backbone (stages 1-4) never gets a gradient; which parameters a stage trains
is its optimizer's `trainable` patterns (defaults in `default_config`), so everything
else is frozen by construction. Each stage trains on the mesh of `config.mesh`
(`latent_mca.parallel.mesh`: parameters and optimizer state sharded by the logical-axis
rules, batches split over data parallelism) and writes under workdir/<stage>/:

  checkpoints/, metrics.jsonl  the loop's: the step's losses, and eval/ measurements on
                               the held-out paired and text-only sets (latent_sft: the
                               dialogues' test_in) every eval_every steps.
  eval_initial.json            the same measurements before the stage's first update.
  curves.png                   the stage's losses and measurements over training.

The held-out measurements (`steps.latent_eval_sums`), each suffixed by its set:
wm_loss_idm / wm_loss_shuffled / wm_loss_fixed (world-model next-token CE with the IDM's
codes, with codes resampled from their marginal, with one fixed code: the world model
uses the action when the first is clearly the lowest), wm_accuracy (its next-token accuracy
with the IDM's codes) and wm_accuracy_policy (with the policy's argmax codes: the tokens the
latent policy would write), perplexity and
codes_used (codebook usage), bc_accuracy (policy vs IDM codes) with bc_majority (the
most frequent code's share: what always guessing it scores), and on paired data
proj_nll / proj_nll_inverse (per-token Gaussian NLL of P and P') with proj_identity
(the NLL of predicting h_TV by h_T with unit variance).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from latent_mca.data.batching import DataLoader, ZipLoader
from latent_mca.data.processor import Processor
from latent_mca.latent import steps as steps_lib
from latent_mca.latent.config import LatentConfig
from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import distributed
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import data as data_lib
from latent_mca.training import checkpoint, loop, metrics as metrics_lib, state as state_lib

ORDER = ("inverse_warmup", "cycle_warmup", "inverse_joint", "policy_bc", "latent_sft")

# What each stage trains (regexes over parameter paths), as SPEC section 2 says.
TRAINABLE = {
    "inverse_warmup": (r"(inverse_dynamics|codebook|world_model)/.*",),
    "cycle_warmup": (r"(projector|inverse_projector)/.*",),
    "inverse_joint": (r"(inverse_dynamics|codebook|world_model|projector|inverse_projector)/.*",),
    "policy_bc": (r"policy/.*",),
    "latent_sft": (r"backbone/(decoder|embed_tokens|lm_head)/.*", r"world_model/.*"),
}
_PROJECTORS = (r"(projector|inverse_projector)/.*",)
_TRAIN_PROJECTORS = tuple(s for s, patterns in TRAINABLE.items()
                          if any("projector" in p for p in patterns))


def latent_defaults() -> ml_collections.ConfigDict:
  """`config.latent`: the fields of `LatentConfig` (SPEC constants) and where to start.

  world_model_hidden and projector_hidden: 0 derives them (the backbone's MLP width, d/2).
  """
  fields = {f: (0 if v is None else v) for f, v in vars(LatentConfig()).items()}
  return ml_collections.ConfigDict(dict(backbone_stage="pretrain", **fields))


def stage_defaults(num_steps: int, batch_size: int, seq_len: int, learning_rate: float,
                   stage: str, warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """A latent stage's config: steps, batch shape, optimizer (with the stage's trainable
  parameters) and the evaluation / checkpoint / log intervals."""
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=learning_rate, warmup_steps=warmup_steps,
                        final_fraction=0.1, trainable=TRAINABLE[stage]))
  c = ml_collections.ConfigDict(dict(
      num_steps=num_steps, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
      eval_every=max(num_steps // 3, 1), eval_examples=64, checkpoint_every=max(num_steps // 2, 1),
      log_every=10))
  if stage == "latent_sft":
    # The world model's action: "policy" (SPEC: the frozen policy's argmax code) or "idm"
    # (the frozen IDM's code, inferred from the next token as in stages 1-3).
    c.codes = "policy"
  return c


def latent_config(config) -> LatentConfig:
  """The LatentConfig of `config.latent` (raises LatentConfigError naming a bad field)."""
  fields = {k: v for k, v in config.latent.items() if k != "backbone_stage"}
  for name in ("world_model_hidden", "projector_hidden"):
    fields[name] = fields[name] or None
  return LatentConfig(**fields)


def enabled(stage: str, latent: LatentConfig) -> bool:
  """Whether a stage has anything to train under the ablation switches."""
  return stage != "cycle_warmup" or latent.use_projector


def source_stage(stage: str, config, latent: LatentConfig) -> str:
  """The stage whose final checkpoint `stage` starts from."""
  for earlier in reversed(ORDER[:ORDER.index(stage)]):
    if enabled(earlier, latent):
      return earlier
  return config.latent.backbone_stage


def train_step(stage: str, system: steps_lib.LatentSystem, **static) -> Callable:
  """The stage's step bound to `system.for_step(stage)`: one object per (stage, switches
  the step reads, static options), so an ablation whose switch the step does not read
  runs the full run's compiled program (`loop.jit_step` shares it)."""
  return _train_step(stage, system.for_step(stage), **static)


@functools.cache
def _train_step(stage: str, system: steps_lib.LatentSystem, **static) -> Callable:
  return functools.partial(steps_lib.STEPS[stage], system=system, **static)


@functools.cache
def _jitted(fn: Callable, system: steps_lib.LatentSystem, **static) -> Callable:
  """One compiled function per (function, system, static options), shared by all stages."""
  return jax.jit(functools.partial(fn, system, **static))


def latent_eval_fn(system: steps_lib.LatentSystem, eval_sets: dict[str, list],
                   seed: int) -> Callable:
  """state -> {measurement_<set>: value} over fixed held-out batches (`latent_eval_sums`)."""

  def eval_fn(state) -> dict:
    out = {}
    for name, batches in eval_sets.items():
      fn = _jitted(steps_lib.latent_eval_sums, system, text_only=name == "text_only")
      totals = None
      for i, batch in enumerate(batches):
        rng = jax.random.fold_in(jax.random.key(seed), i)
        sums = jax.device_get(fn(state.params, state.extra, batch, rng))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      out.update({f"{k}_{name}": v for k, v in steps_lib.summarize_eval(totals).items()})
    return out

  return eval_fn


def dialogue_eval_fn(system: steps_lib.LatentSystem, eval_sets: dict[str, list],
                     codes: str = "policy") -> Callable:
  """state -> {"loss", "accuracy", "loss_<task>", "accuracy_<task>", "codes_used"} of the
  world model with the policy's codes on each task's test_in (with codes="idm", the IDM's,
  and the policy's as "loss_policy" and "accuracy_policy")."""
  fn = _jitted(steps_lib.latent_sft_sums, system, codes=codes)

  def eval_fn(state) -> dict:
    out = {}
    if codes != "policy":
      policy = dialogue_eval_fn(system, eval_sets)(state)
      out.update(loss_policy=policy["loss"], accuracy_policy=policy["accuracy"])
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "codes": 0.0}
    for name, batches in eval_sets.items():
      sums = [jax.device_get(fn(state.params, state.extra, batch)) for batch in batches]
      s = {k: float(sum(b[k] for b in sums)) for k in ("loss_sum", "correct", "count")}
      out[f"loss_{name}"] = s["loss_sum"] / max(s["count"], 1.0)
      out[f"accuracy_{name}"] = s["correct"] / max(s["count"], 1.0)
      totals = {k: totals[k] + s.get(k, 0.0) for k in ("loss_sum", "correct", "count")} | {
          "codes": totals["codes"] + sum(b["code_counts"] for b in sums)}
    out["loss"] = totals["loss_sum"] / max(totals["count"], 1.0)
    out["accuracy"] = totals["correct"] / max(totals["count"], 1.0)
    out["codes_used"] = float((totals["codes"] > 0).sum())
    return out

  return eval_fn


def _panels(stage: str, sets: list[str]) -> list:
  """What curves.png shows for a stage (panels whose metrics were not logged are dropped)."""
  if stage == "latent_sft":
    return ["loss", "accuracy", "codes_used",
            [f"eval/loss_{s}" for s in sets] + ["eval/loss_policy"],
            [f"eval/accuracy_{s}" for s in sets] + ["eval/accuracy_policy"]]
  train = {
      "inverse_warmup": ["ntp_loss", "perplexity", "codes_used"],
      "cycle_warmup": [["nll_forward", "nll_inverse"]],
      "inverse_joint": [["ntp_loss_paired", "ntp_loss_text_only"], ["proj_nll", "cycle_nll"],
                        "perplexity", "codes_used"],
      "policy_bc": [["bc_accuracy_paired", "bc_accuracy_text_only"],
                    ["token_accuracy_paired", "token_accuracy_text_only"], "loss"],
  }[stage]
  evals = []
  for s in sets:
    evals += [[f"eval/wm_loss_{k}_{s}" for k in ("idm", "shuffled", "fixed")],
              [f"eval/perplexity_{s}"], [f"eval/codes_used_{s}"],
              [f"eval/bc_accuracy_{s}", f"eval/bc_majority_{s}"],
              [f"eval/wm_accuracy_{s}", f"eval/wm_accuracy_policy_{s}"],
              [f"eval/proj_nll_{s}", f"eval/proj_identity_{s}", f"eval/proj_nll_inverse_{s}"]]
  return train + evals


def _plot(stage_dir: str, panels: list) -> None:
  metrics_lib.plot_metrics(os.path.join(stage_dir, "metrics.jsonl"),
                           os.path.join(stage_dir, "curves.png"), panels, skip_missing=True)


def initial_variables(config, workdir: str, stage: str, system: steps_lib.LatentSystem,
                      model_cfg: qwen2_5_vl.Qwen2_5_VLConfig) -> tuple[dict, dict]:
  """(params, extra) a stage starts from: the previous enabled stage's final ones, or for
  the first the backbone stage's final params and freshly initialised latent modules.

  Raises:
    CheckpointNotFoundError: the stage it starts from has not finished in this workdir.
  """
  source = source_stage(stage, config, system.config)
  abstract_backbone = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
  if source not in ORDER:
    backbone = checkpoint.load_params(os.path.join(workdir, source), abstract_backbone)
    return system.init(backbone, jax.random.key(config.seed))
  params, extra = system.abstract(abstract_backbone)
  loaded = checkpoint.load_final(os.path.join(workdir, source), {"params": params,
                                                                  "extra": extra})
  return loaded["params"], loaded["extra"]


def run_stage(config, workdir: str, stage: str, measure: bool = True) -> dict:
  """Runs one latent stage to its num_steps (resuming if it was interrupted); returns
  its final metrics, prefixed "<stage>/" (eval_initial/ for those before training).
  measure=False skips the held-out measurements (eval_initial.json and eval/ metrics):
  what trains is the same, only faster (the ablations' stages)."""
  latent = latent_config(config)
  if not enabled(stage, latent):
    logging.info("%s: skipped (use_projector=False leaves no projector to train)", stage)
    return {}
  c = config[stage]
  processor = Processor(data_lib.load_tokenizer(config, workdir))
  model_cfg = backbone_lib.model_config(config, processor)
  system = steps_lib.LatentSystem.build(model_cfg, latent)
  params, extra = initial_variables(config, workdir, stage, system, model_cfg)

  if stage == "latent_sft":
    data = data_lib.sft_data(config, workdir, c)
    loader = data_lib.train_loader(data, seed=config.seed)
    eval_sets = {name: data_lib.eval_batches(data, name, c.eval_examples) for name in data.eval}
    eval_fn = dialogue_eval_fn(system, eval_sets, c.codes)
  else:
    parts = ["paired"]
    if stage in ("inverse_joint", "policy_bc") and latent.use_text_only:
      parts.append("text_only")  # half of each batch
    if c.batch_size % len(parts):
      raise ValueError(f"{stage}.batch_size={c.batch_size} must be even: half of each batch "
                       "is paired, half text-only")
    data = data_lib.latent_data(config, workdir, c.seq_len, c.batch_size // len(parts))
    loader = ZipLoader({p: DataLoader(data[p].train, data[p].batch_size,
                                      collate_fn=data[p].collate_fn, seed=config.seed + i,
                                      **distributed.process_shard())
                        for i, p in enumerate(parts)})
    # Held-out batches of half a batch's rows in every stage, whatever its parts: stages
    # of one batch size then share one compiled measurement program per set.
    eval_rows = max(c.batch_size // 2, 1)
    eval_data = data if eval_rows == data["paired"].batch_size else data_lib.latent_data(
        config, workdir, c.seq_len, eval_rows)
    eval_sets = {name: data_lib.eval_batches(part, name, c.eval_examples)
                 for name, part in eval_data.items()}
    eval_fn = latent_eval_fn(system, eval_sets, config.seed)

  # Without a projector the stages that would train it keep it frozen (the others leave it
  # alone anyway, and share the full run's optimizer and program).
  frozen = () if latent.use_projector or stage not in _TRAIN_PROJECTORS else _PROJECTORS
  tx = state_lib.make_optimizer(c.optimizer, c.num_steps, frozen=frozen)
  make_state = functools.partial(state_lib.TrainState.create, tx=tx,
                                 rng=jax.random.key(config.seed), extra=extra)
  layout = mesh_lib.Layout.from_config(config.mesh, make_state, system.boxed_params())
  if stage == "latent_sft":
    mesh_lib.check_batch_size(c.batch_size, layout.mesh, layout.rules,
                              "config.latent_sft.batch_size")
  else:
    mesh_lib.check_batch_size(c.batch_size // len(parts), layout.mesh, layout.rules,
                              f"config.{stage}.batch_size / {len(parts)} (each part's)")
  state = layout.init_state(make_state, params)
  stage_dir = os.path.join(workdir, stage)
  os.makedirs(stage_dir, exist_ok=True)
  initial = {}
  if measure:
    initial = backbone_lib.cached_json(os.path.join(stage_dir, "eval_initial.json"),
                                       lambda: metrics_lib.scalars(eval_fn(state)))
  static = {"codes": c.codes} if stage == "latent_sft" else {}
  step = train_step(stage, system, **static)
  state, history = loop.train(stage, workdir, state, step, loader, c.num_steps,
                              eval_fn=eval_fn if measure else None,
                              eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                              log_every=c.log_every, layout=layout)
  _plot(stage_dir, _panels(stage, list(eval_sets)))
  final = loop.final_metrics(history)
  out = {f"{stage}/{k}": v for k, v in final.items()}
  out.update({f"{stage}/eval_initial/{k}": v for k, v in initial.items()})
  logging.info("%s: %s", stage, out)
  return out


STAGES = {name: functools.partial(run_stage, stage=name) for name in ORDER}
