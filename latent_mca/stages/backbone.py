"""The backbone stages of the embedded pipeline: `pretrain` and task `sft` of Qwen2.5-VL.

  pretrain: a Qwen2.5-VL-architecture model, randomly initialised at the tiny size of
    `config.backbone` (vocabulary and image token ids from the tokenizer), or loaded from
    the local Hugging Face folder `config.backbone.checkpoint`, trains all its parameters
    with next-token cross-entropy on paired (answer after the image) and text-only
    (whole document) data; see `latent_mca.stages.data` for the formats.
  sft: starts from pretrain's final parameters and fine-tunes them the same way on the
    role-play and personalised dialogues' sft split (assistant turns only).

Both run `latent_mca.training.train` (jitted, checkpointed, resumable to the bit) with
one `train_step` on the mesh of `config.mesh` (`latent_mca.parallel.mesh`; by default
every device on data parallelism), in the numerics of `config.precision`, and write
under workdir/<stage>/:

  checkpoints/, metrics.jsonl  the loop's (loss, accuracy, grad_norm; eval/ metrics).
  curves.png                   train loss and accuracy, eval loss by held-out set.
  eval_initial.json            the eval metrics before the first update.
  hf/                          the final model as a Hugging Face folder (config.json,
                               model.safetensors and the tokenizer) that `transformers`'
                               Qwen2_5_VLForConditionalGeneration and
                               `qwen2_5_vl.from_pretrained` load.

`train_step(state, batch, rng, *, model)` is the pure step; bind the model with
`functools.partial(train_step, model=model)` to get the `(state, batch, rng) ->
(state, metrics)` function to jit or shard_map.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from latent_mca.data.batching import DataLoader
from latent_mca.data.tokenizers import ENDOFTEXT, VISION_END, VISION_START
from latent_mca.models import qwen2_5_vl
from latent_mca.stages import data as data_lib
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.training import checkpoint, loop, metrics as metrics_lib, precision
from latent_mca.training import state as state_lib

PRETRAIN, SFT = "pretrain", "sft"


def model_config(config, processor) -> qwen2_5_vl.Qwen2_5_VLConfig:
  """The backbone's configuration: the checkpoint's, or the tiny one of `config.backbone`.

  Both take `config.backbone.remat` and the dtypes of `config.precision`. The tiny
  model's vocabulary is the tokenizer's (len(tokenizer) rows) and its special token ids
  are the tokenizer's.

  Raises:
    ValueError: a checkpoint whose vocabulary or image token does not fit the tokenizer.
  """
  b = config.backbone
  numerics = dict(remat=b.remat, **precision.model_dtypes(config.precision))
  if b.checkpoint:
    model = qwen2_5_vl.read_config(b.checkpoint, **numerics)
    tokenizer_size = len(processor.tokenizer)
    if model.text.vocab_size < tokenizer_size or model.image_token_id != processor.image_token_id:
      raise ValueError(f"{b.checkpoint}: the model (vocabulary {model.text.vocab_size}, image "
                       f"token {model.image_token_id}) does not fit its tokenizer "
                       f"({tokenizer_size} tokens, image token {processor.image_token_id})")
    return model
  tokenizer = processor.tokenizer

  def token_id(token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)

  text = qwen2_5_vl.TextConfig(vocab_size=len(tokenizer), **_hashable(b.text))
  vision = qwen2_5_vl.VisionConfig(out_hidden_size=text.hidden_size, **_hashable(b.vision))
  return qwen2_5_vl.Qwen2_5_VLConfig(
      text=text, vision=vision, tie_word_embeddings=b.tie_word_embeddings,
      image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
      vision_start_token_id=token_id(VISION_START),
      vision_end_token_id=token_id(VISION_END),
      bos_token_id=None, eos_token_id=(tokenizer.eos_token_id, token_id(ENDOFTEXT)),
      pad_token_id=processor.pad_token_id, **numerics)


def _hashable(fields) -> dict:
  """Config fields with lists as tuples: model configs are hashable (static jit arguments)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


# ----------------------------------------------------------------------------- steps


def next_token_sums(model: qwen2_5_vl.Qwen2_5_VL, params, batch) -> dict[str, jax.Array]:
  """Summed next-token cross-entropy and correct argmax predictions over the learned tokens.

  Token t + 1 is predicted from the logits at t and counts where loss_mask[t + 1] = 1.
  Returns {"loss_sum", "correct", "count"}, float32 scalars, so that means over several
  batches (eval) weigh every token alike.
  """
  out = model.apply({"params": params}, batch["input_ids"],
                    attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"])
  logits = out.logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
  targets = batch["input_ids"][:, 1:]  # [B, T-1]
  weight = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T-1]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)  # [B, T-1]
  return {"loss_sum": jnp.sum(loss * weight), "correct": jnp.sum(correct * weight),
          "count": jnp.sum(weight)}


def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array, *,
               model: qwen2_5_vl.Qwen2_5_VL) -> tuple[state_lib.TrainState, dict]:
  """One update of next-token cross-entropy over the batch's learned tokens (pretrain and SFT).

  Args:
    state: params of `model`; `state.tx` decides which of them train.
    batch: a `latent_mca.stages.data` batch (input_ids, attention_mask, loss_mask [B, T];
      pixel_values [N, 1176], image_grid_thw [K, 3]).
    rng: unused: the backbone has no dropout, so the step is deterministic.
    model: the backbone module (bind with functools.partial).

  Returns:
    (the updated state, {"loss", "accuracy", "grad_norm"}: mean loss and argmax accuracy
    over the learned tokens, global norm of the gradients before clipping).
  """
  del rng

  def loss_fn(params):
    sums = next_token_sums(model, params, batch)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {"loss": loss, "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
             "grad_norm": optax.global_norm(grads)}
  return state.apply_gradients(grads), metrics


def make_eval_fn(model: qwen2_5_vl.Qwen2_5_VL,
                 eval_sets: dict[str, list[dict]]) -> Callable[[Any], dict]:
  """state -> {"loss", "accuracy", "loss_<set>", "accuracy_<set>"} over fixed eval batches.

  Means are over the learned tokens: of each set, and of all sets together.
  """
  sums_fn = jax.jit(functools.partial(next_token_sums, model))

  def eval_fn(state) -> dict:
    totals, out = {}, {}
    for name, batches in eval_sets.items():
      sums = jax.device_get([sums_fn(state.params, batch) for batch in batches])
      s = {key: float(sum(b[key] for b in sums)) for key in ("loss_sum", "correct", "count")}
      out[f"loss_{name}"] = s["loss_sum"] / max(s["count"], 1.0)
      out[f"accuracy_{name}"] = s["correct"] / max(s["count"], 1.0)
      totals = {key: totals.get(key, 0.0) + value for key, value in s.items()}
    out["loss"] = totals["loss_sum"] / max(totals["count"], 1.0)
    out["accuracy"] = totals["correct"] / max(totals["count"], 1.0)
    return out

  return eval_fn


# ----------------------------------------------------------------------------- stages


class _TokenClock:
  """Wraps a loader to measure training throughput: real (non-pad) tokens per second.

  The clock starts when the second batch is asked for, after the first step compiled.
  """

  def __init__(self, loader: DataLoader):
    self._loader, self._served, self.tokens, self.start = loader, 0, 0, None

  def __next__(self) -> dict:
    batch = next(self._loader)
    self._served += 1
    if self._served == 2:
      self.start = time.perf_counter()
    if self._served >= 2:
      self.tokens += int(batch["attention_mask"].sum())
    return batch

  def state(self) -> dict:
    return self._loader.state()

  def restore(self, state: dict) -> None:
    self._loader.restore(state)

  def tokens_per_s(self) -> float | None:
    """Tokens of the steps after the first, over the time since; None if fewer than 2 steps."""
    return None if self.start is None else self.tokens / (time.perf_counter() - self.start)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Writes `value` to `path` as JSON whole or not at all (a temporary file, then a rename)."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def cached_json(path: str, compute: Callable[[], dict]) -> dict:
  """The dict in `path`, or compute() written there (so a rerun of a stage reuses it)."""
  if os.path.isfile(path):
    return read_json(path)
  value = compute()
  write_json(path, value)
  return value


def _save_hf(model, params, processor, folder: str, step: int) -> None:
  """Writes the model and tokenizer as a Hugging Face folder, unless it already holds `step`."""
  stamp = os.path.join(folder, "latent_mca_step.json")
  if os.path.isfile(stamp):
    with open(stamp) as f:
      if json.load(f)["step"] == step:
        return
  qwen2_5_vl.save_pretrained(model, params, folder)
  processor.tokenizer.save_pretrained(folder)
  with open(stamp, "w") as f:
    json.dump({"step": step}, f)


def _run(config, workdir: str, stage: str, data: data_lib.StageData,
         model: qwen2_5_vl.Qwen2_5_VL, params) -> dict:
  """Trains `params` on `data` with the stage's config, then writes curves and the HF folder."""
  c = config[stage]
  stage_dir = os.path.join(workdir, stage)
  os.makedirs(stage_dir, exist_ok=True)
  eval_sets = {name: data_lib.eval_batches(data, name, c.eval_examples) for name in data.eval}
  eval_fn = make_eval_fn(model, eval_sets)
  tx = state_lib.make_optimizer(c.optimizer, c.num_steps)
  make_state = functools.partial(state_lib.TrainState.create, tx=tx,
                                 rng=jax.random.key(config.seed))
  layout = mesh_lib.Layout.from_config(config.mesh, make_state,
                                       qwen2_5_vl.abstract_params(model.config))
  mesh_lib.check_batch_size(c.batch_size, layout.mesh, layout.rules,
                            f"config.{stage}.batch_size")
  state = layout.init_state(make_state, params)
  initial = cached_json(os.path.join(stage_dir, "eval_initial.json"),
                         lambda: metrics_lib.scalars(eval_fn(state)))
  clock = _TokenClock(data_lib.train_loader(data, seed=config.seed))
  state, history = loop.train(
      stage, workdir, state, functools.partial(train_step, model=model), clock, c.num_steps,
      eval_fn=eval_fn, eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
      log_every=c.log_every, layout=layout)
  _save_hf(model, state.params, data.processor, os.path.join(stage_dir, "hf"), c.num_steps)
  metrics_lib.plot_metrics(os.path.join(stage_dir, "metrics.jsonl"),
                           os.path.join(stage_dir, "curves.png"),
                           ["loss", "accuracy"] + [f"eval/loss_{name}" for name in eval_sets])
  final = loop.final_metrics(history)
  out = {f"{stage}/{k}": v for k, v in final.items()}
  out.update({f"{stage}/eval_initial/{k}": v for k, v in initial.items()})
  if clock.tokens_per_s() is not None:
    out[f"{stage}/tokens_per_s"] = clock.tokens_per_s()
  logging.info("%s: eval loss %.4f before, %.4f after; %s", stage, initial["loss"],
               final["eval/loss"], out)
  return out


def pretrain(config, workdir: str) -> dict:
  """Pretrains the backbone on paired + text-only data; returns its final metrics.

  Metrics are prefixed "pretrain/": the last logged train and eval/ values, eval_initial/
  (before training) and tokens_per_s.
  """
  data = data_lib.pretrain_data(config, workdir)
  model_cfg = model_config(config, data.processor)
  if config.backbone.checkpoint:
    params = qwen2_5_vl.load_params(config.backbone.checkpoint, model_cfg)
  else:
    params = qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed))
  return _run(config, workdir, PRETRAIN, data, qwen2_5_vl.Qwen2_5_VL(model_cfg), params)


def sft(config, workdir: str) -> dict:
  """Fine-tunes pretrain's final backbone on the dialogue tasks' sft split; metrics prefixed "sft/".

  Raises:
    CheckpointNotFoundError: pretrain has not finished in this workdir (names its folder).
  """
  data = data_lib.sft_data(config, workdir)
  model_cfg = model_config(config, data.processor)
  abstract = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))  # ShapeDtypeStructs
  params = checkpoint.load_params(os.path.join(workdir, PRETRAIN), abstract)
  return _run(config, workdir, SFT, data, qwen2_5_vl.Qwen2_5_VL(model_cfg), params)
