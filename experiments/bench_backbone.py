r"""Benchmarks our Qwen2.5-VL backbone against the PyTorch reference, side by side.

  python -m experiments.bench_backbone [--preset cpu-small|gpu-3b] [--out_dir results]

OURS is `latent_mca.models.qwen2_5_vl` (JAX/Flax); the REFERENCE is
`transformers.Qwen2_5_VLForConditionalGeneration`. Both run one config, one set
of random weights (ours from `init_params` and `rescale_kernels`, written with
`save_pretrained` and loaded by `transformers` from that folder) and the same
inputs: every sample is
`[vision_start] + image tokens + [vision_end] + random text tokens` with one
image of random pixel values. Measured, as the median of `--repeats` calls
after a warm-up call:

  forward       logits of the whole batch (reference: eval mode, inference_mode);
  train step    loss and gradients w.r.t. all parameters; the loss is the mean
                next-token cross-entropy over the text targets (targets that are
                image tokens are left out); reference: train mode, zeroed grads,
                `loss.backward()`;
  decode        greedy decoding of exactly `new_tokens` tokens (ours `generate`
                without stop tokens; reference `generate(do_sample=False)` with
                eos disabled), prefill included.

Our compile time is reported separately (ahead-of-time lower + compile for the
forward and train step; first call minus the median for `generate`). The
reference runs first and is freed before ours runs, so on a GPU the two never
compete for memory. Sanity checks, recorded next to the timings: logits, loss
and gradient norm of both, and whether both decode the same greedy tokens (a
mismatch fails an fp32 run after the results are written; in bf16 it is only
reported, with the reference's top-2 logit gap where the tokens part).

Writes `results/bench_backbone_<device>.json` (everything) and `.md` (the table).
"""

import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any, Callable

# JAX would otherwise grab 75% of GPU memory up front, leaving the reference none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch
import transformers

from latent_mca.generation import generate
from latent_mca.models import qwen2_5_vl

_PRESET = flags.DEFINE_enum("preset", "cpu-small", ["cpu-small", "gpu-3b"], "What to run.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results", "Folder for the .json and .md results.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed calls per measurement (preset default).")
_BATCH = flags.DEFINE_integer("batch", None, "Samples per batch (preset default).")
_TEXT_TOKENS = flags.DEFINE_integer(
    "text_tokens", None, "Text tokens per sample after the image (preset default).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", None, "Tokens to decode (preset default).")
_REMAT = flags.DEFINE_boolean(
    "remat", None, "Rematerialise blocks in the train step: our config.remat, the reference's "
    "gradient checkpointing (preset default).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", None, "torch.set_num_threads for the reference (default: os.cpu_count()).")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "Peak dense bf16 TFLOP/s of the device for MFU; detected for H100/H200.")

_ATTENTION_FLOPS = "12 * layers * (heads * head_dim) * seq^2 * batch / 2"
_MFU_FORMULA = (f"MFU = (6 * n_params_text * batch * seq + {_ATTENTION_FLOPS}) / step_time / "
                "peak. n_params_text = decoder params + the LM-head matrix (vocab x hidden; a "
                "tied embedding is counted once, as the head; the embedding lookup is free). "
                "6 = 2 flops per multiply-add x (forward + 2x backward); the attention term "
                "is QK^T and AV, halved for the causal mask. The vision tower's flops are not "
                "counted, so MFU is slightly understated; remat recomputation is not counted.")


@dataclasses.dataclass(frozen=True)
class Preset:
  """One benchmark setting: model config, batch shape and repeat counts."""

  name: str
  config: qwen2_5_vl.Qwen2_5_VLConfig
  batch: int
  text_tokens: int
  image_grid: tuple[int, int, int]
  new_tokens: int
  repeats: int
  gpu: bool


def _cpu_small() -> Preset:
  text = qwen2_5_vl.TextConfig(
      vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12))
  vision = qwen2_5_vl.VisionConfig(
      depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
      fullatt_block_indexes=(3,))
  # Special ids at the top of the small vocabulary; the text tokens are drawn below them.
  # An untied head, so that the two presets cover both LM-head paths.
  cfg = qwen2_5_vl.Qwen2_5_VLConfig(
      text=text, vision=vision, tie_word_embeddings=False, image_token_id=4092,
      video_token_id=4093, vision_start_token_id=4094, vision_end_token_id=4095,
      bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
  return Preset("cpu-small", cfg, batch=1, text_tokens=128, image_grid=(1, 16, 16),
                new_tokens=32, repeats=10, gpu=False)


def _gpu_3b() -> Preset:
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.qwen2_5_vl_3b(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                 remat=True)
  # 958 text tokens + 64 image tokens + vision start/end = 1024 tokens per sample.
  return Preset("gpu-3b", cfg, batch=8, text_tokens=958, image_grid=(1, 16, 16),
                new_tokens=128, repeats=5, gpu=True)


_PRESETS = {"cpu-small": _cpu_small, "gpu-3b": _gpu_3b}


def _with_flag_overrides(preset: Preset) -> Preset:
  changes = {name: flag.value for name, flag in [
      ("batch", _BATCH), ("text_tokens", _TEXT_TOKENS), ("new_tokens", _NEW_TOKENS),
      ("repeats", _REPEATS)] if flag.value is not None}
  if _REMAT.value is not None:
    changes["config"] = preset.config.replace(remat=_REMAT.value)
  return dataclasses.replace(preset, **changes)


@jax.jit
def rescale_kernels(params: dict) -> dict:
  """Rescales every matrix (`kernel` leaf) of the params to std 1/sqrt(fan_in).

  With init_params' small normal weights every block's output is tiny next to
  the token embedding, so greedy decoding repeats one token whatever the
  context, and comparing decoded tokens would not test positions or the cache.
  Timings do not depend on the values.
  """
  def rescale(path, x):
    if path[-1].key != "kernel":
      return x
    x32 = x.astype(jnp.float32)
    return (x32 * (1 / np.sqrt(x.shape[-2]) / jnp.std(x32))).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(rescale, params)


# ------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
  """One batch as numpy arrays, shared by both implementations."""

  input_ids: np.ndarray  # [B, T] int32
  attention_mask: np.ndarray  # [B, T] int32, all ones
  pixel_values: np.ndarray  # [B * t * h * w, patch_dim] float32
  image_grid_thw: np.ndarray  # [B, 3] int32
  loss_weights: np.ndarray  # [B, T - 1] float32, 1 where the target token is text


def make_inputs(preset: Preset, seed: int = 0) -> Inputs:
  """`[vision_start] + image tokens + [vision_end] + text` per sample, one image each."""
  cfg = preset.config
  rng = np.random.default_rng(seed)
  t, h, w = preset.image_grid
  b = preset.batch
  image_tokens = t * h * w // cfg.vision.spatial_merge_size**2
  first_special = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                      cfg.vision_end_token_id)
  # Ids 0-2 are pad/bos/eos in the small preset; keep random text clear of every special id.
  text = rng.integers(3, first_special, size=(b, preset.text_tokens))
  input_ids = np.concatenate([
      np.full((b, 1), cfg.vision_start_token_id), np.full((b, image_tokens), cfg.image_token_id),
      np.full((b, 1), cfg.vision_end_token_id), text], axis=1).astype(np.int32)
  return Inputs(
      input_ids=input_ids,
      attention_mask=np.ones_like(input_ids),
      pixel_values=rng.standard_normal((b * t * h * w, cfg.vision.patch_dim), dtype=np.float32),
      image_grid_thw=np.tile(np.array([[t, h, w]], np.int32), (b, 1)),
      loss_weights=(input_ids[:, 1:] != cfg.image_token_id).astype(np.float32))


# ------------------------------------------------------------------ timing
def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
  """(seconds, result) of one call; `call` must block until its work is done."""
  start = time.perf_counter()
  result = call()
  return time.perf_counter() - start, result


def _median_time(call: Callable[[], Any], repeats: int) -> dict:
  times = [_timed(call)[0] for _ in range(repeats)]
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
          "max_s": float(np.max(times)), "repeats": repeats}


# ------------------------------------------------------------------ reference
def _torch_device(preset: Preset) -> torch.device:
  return torch.device("cuda" if preset.gpu else "cpu")


def _torch_sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _next_token_loss(logits, input_ids, weights):
  """Mean next-token cross-entropy (fp32) weighted by `weights` [B, T-1]; torch tensors."""
  logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
  nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]
  return (nll * weights).sum() / weights.sum()


def bench_reference(preset: Preset, folder: str, inputs: Inputs) -> tuple[dict, dict]:
  """Times the reference; returns (measurements, outputs for the sanity checks)."""
  cfg = preset.config
  device = _torch_device(preset)
  torch_dtype = torch.bfloat16 if cfg.dtype == jnp.bfloat16 else torch.float32
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True)
  # A missing tensor would be silently random-initialised; the comparison would be meaningless.
  missing = [k for k in info["missing_keys"]
             if not (cfg.tie_word_embeddings and k.endswith("lm_head.weight"))]
  if missing or info["mismatched_keys"]:
    raise RuntimeError(f"reference did not load our checkpoint: missing {missing}, "
                       f"mismatched {info['mismatched_keys']}")
  model.to(device)
  # eos disabled (not suppressed, as min_new_tokens would) so both decode the same K tokens.
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  ids = torch.from_numpy(inputs.input_ids).long().to(device)
  batch = dict(
      input_ids=ids,
      attention_mask=torch.from_numpy(inputs.attention_mask).long().to(device),
      pixel_values=torch.from_numpy(inputs.pixel_values).to(device),
      image_grid_thw=torch.from_numpy(inputs.image_grid_thw).long().to(device),
      # Without it the reference falls back to 1-D text positions for the image tokens.
      mm_token_type_ids=(ids == cfg.image_token_id).long())
  weights = torch.from_numpy(inputs.loss_weights).to(device)
  sync = lambda: _torch_sync(device)
  results, outputs = {}, {}

  model.eval()

  @torch.inference_mode()
  def forward():
    logits = model(**batch, use_cache=False).logits
    sync()
    return logits

  first_s, logits = _timed(forward)
  results["forward"] = {"first_call_s": first_s, **_median_time(forward, preset.repeats)}
  outputs["logits_shape"] = list(logits.shape)
  outputs["logits0"] = logits[0].float().cpu().numpy()
  del logits

  model.train()
  if cfg.remat:
    model.activation_checkpointing_enable()

  def train_step():
    model.zero_grad(set_to_none=True)
    loss = _next_token_loss(model(**batch, use_cache=False).logits, ids, weights)
    loss.backward()
    sync()
    return loss

  first_s, loss = _timed(train_step)
  results["train_step"] = {"first_call_s": first_s, **_median_time(train_step, preset.repeats)}
  outputs["loss"] = float(loss.detach())
  outputs["grad_norm"] = float(torch.sqrt(sum(
      p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None)))
  model.zero_grad(set_to_none=True)
  if cfg.remat:
    model.activation_checkpointing_disable()
  model.eval()

  k = preset.new_tokens
  prompt_len = ids.shape[1]

  @torch.inference_mode()
  def decode(**extra):
    out = model.generate(**batch, do_sample=False, max_new_tokens=k, **extra)
    sync()
    return out

  # The warm-up call also records the top-2 logit gap of every step: a greedy mismatch
  # between the implementations at a near-tie is numerics, at a clear winner a bug.
  first_s, warm = _timed(lambda: decode(output_scores=True, return_dict_in_generate=True))
  top2 = torch.stack(warm.scores, dim=1).float().topk(2, dim=-1).values  # [B, K, 2]
  outputs["top2_gap"] = (top2[..., 0] - top2[..., 1]).cpu().numpy()
  outputs["tokens"] = warm.sequences[:, prompt_len:].cpu().numpy()
  timing = _median_time(lambda: decode(), preset.repeats)
  results["decode"] = {"first_call_s": first_s, **timing}
  repeat_tokens = decode()[:, prompt_len:].cpu().numpy()
  if not np.array_equal(repeat_tokens, outputs["tokens"]):
    raise RuntimeError("the reference's greedy decoding is not deterministic across calls")

  results["threads"] = {"torch_num_threads": torch.get_num_threads(),
                        "torch_num_interop_threads": torch.get_num_interop_threads()}
  results["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
  results["attn_implementation"] = model.config._attn_implementation
  results["gradient_checkpointing"] = bool(cfg.remat)
  return results, outputs


# ------------------------------------------------------------------ ours
def _aot_compile(fn, *args) -> tuple[Any, float]:
  """jit + lower + compile ahead of time: (compiled executable, seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def bench_ours(preset: Preset, params_host: dict, inputs: Inputs) -> tuple[dict, dict]:
  """Times our model; returns (measurements, outputs for the sanity checks)."""
  cfg = preset.config
  model = qwen2_5_vl.Qwen2_5_VL(cfg)
  params = jax.device_put(params_host)
  ids, mask, pixels, thw, weights = (jax.device_put(x) for x in (
      inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.image_grid_thw,
      inputs.loss_weights))
  results, outputs = {}, {}

  def forward(params, ids, mask, pixels, thw):
    return model.apply({"params": params}, ids, attention_mask=mask, pixel_values=pixels,
                       image_grid_thw=thw).logits

  def loss_fn(params, ids, mask, pixels, thw, weights):
    logits = forward(params, ids, mask, pixels, thw)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  fwd, compile_s = _aot_compile(forward, params, ids, mask, pixels, thw)
  call = lambda: jax.block_until_ready(fwd(params, ids, mask, pixels, thw))
  first_s, logits = _timed(call)
  results["forward"] = {"compile_s": compile_s, "first_call_s": first_s,
                        **_median_time(call, preset.repeats)}
  outputs["logits_shape"] = list(logits.shape)
  outputs["logits0"] = np.asarray(logits[0].astype(jnp.float32))
  del logits

  grad_fn, compile_s = _aot_compile(jax.value_and_grad(loss_fn), params, ids, mask, pixels, thw,
                                    weights)
  call = lambda: jax.block_until_ready(grad_fn(params, ids, mask, pixels, thw, weights))
  first_s, (loss, grads) = _timed(call)
  results["train_step"] = {"compile_s": compile_s, "first_call_s": first_s,
                           **_median_time(call, preset.repeats)}
  outputs["loss"] = float(loss)
  outputs["grad_norm"] = float(jnp.sqrt(sum(
      jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))))
  del grads

  # No stop tokens: exactly new_tokens tokens, like the reference with eos disabled.
  call = lambda: jax.block_until_ready(generate(
      model, params, ids, mask, pixels, thw, max_new_tokens=preset.new_tokens, temperature=0.0,
      pad_token_id=0, stop_token_ids=()))
  first_s, tokens = _timed(call)
  timing = _median_time(call, preset.repeats)
  results["decode"] = {"compile_s": first_s - timing["median_s"], "first_call_s": first_s,
                       **timing}
  outputs["tokens"] = np.asarray(tokens)
  results["device"] = jax.devices()[0].device_kind
  return results, outputs


# ------------------------------------------------------------------ report
def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _peak_flops() -> tuple[float | None, str]:
  """Peak dense bf16 flop/s: the flag, else known from the device kind, else unknown."""
  if _PEAK_TFLOPS.value is not None:
    return _PEAK_TFLOPS.value * 1e12, "--peak_tflops"
  kind = jax.devices()[0].device_kind
  if "H100" in kind and "PCIe" in kind:
    return 756e12, f"H100 PCIe spec ({kind})"
  if "H100" in kind or "H200" in kind:
    return 989e12, f"H100/H200 SXM spec ({kind})"
  return None, f"unknown for {kind!r}; pass --peak_tflops"


def _train_flops(preset: Preset, params: dict, seq: int) -> dict:
  t = preset.config.text
  n_params_text = _count(params["decoder"]) + t.vocab_size * t.hidden_size
  tokens = preset.batch * seq
  dense = 6 * n_params_text * tokens
  attention = 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * seq**2 \
      * preset.batch / 2
  return {"n_params_text": n_params_text, "n_params_vision": _count(params["visual"]),
          "n_params_total": _count(params), "dense_flops": dense, "attention_flops": attention,
          "flops_per_step": dense + attention}


def _sanity(preset: Preset, ours: dict, ref: dict) -> dict:
  """Compares the outputs of both implementations on the same inputs."""
  b, k = preset.batch, preset.new_tokens
  expected_logits = [b, ref["logits_shape"][1], preset.config.text.vocab_size]
  same = ours["tokens"] == ref["tokens"]
  out = {
      "logits_shape": {"ours": ours["logits_shape"], "reference": ref["logits_shape"],
                       "expected": expected_logits},
      "decode_shape": {"ours": list(ours["tokens"].shape), "reference": list(ref["tokens"].shape),
                       "expected": [b, k]},
      "logits_sample0_max_abs_diff": float(np.max(np.abs(ours["logits0"] - ref["logits0"]))),
      "logits_sample0_max_abs": float(np.max(np.abs(ref["logits0"]))),
      "loss": {"ours": ours["loss"], "reference": ref["loss"],
               "abs_diff": abs(ours["loss"] - ref["loss"])},
      "grad_norm": {"ours": ours["grad_norm"], "reference": ref["grad_norm"],
                    "rel_diff": abs(ours["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]},
      "greedy_tokens_identical": bool(same.all()),
      "greedy_tokens_match_fraction": float(same.mean()),
      "tokens_ours": ours["tokens"].tolist(),
      "tokens_reference": ref["tokens"].tolist(),
  }
  if ours["logits_shape"] != expected_logits:
    raise RuntimeError(f"unexpected logits shapes: {out['logits_shape']}")
  if list(ours["tokens"].shape) != [b, k] or list(ref["tokens"].shape) != [b, k]:
    raise RuntimeError(f"unexpected decode shapes: {out['decode_shape']}")
  if not out["greedy_tokens_identical"]:
    # Per row: the first step where the tokens part, and how close the reference's call was.
    first = [{"row": r, "step": int(np.argmin(same[r])),
              "reference_top2_logit_gap": float(ref["top2_gap"][r, np.argmin(same[r])])}
             for r in range(b) if not same[r].all()]
    out["first_mismatches"] = first
  return out


def _environment(preset: Preset) -> dict:
  cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.processor()) \
      if os.path.exists("/proc/cpuinfo") else platform.processor()
  return {
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "numpy": np.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__},
      "host": {"platform": platform.platform(), "cpu": cpu_model, "cpu_count": os.cpu_count(),
               "cpus_available": len(os.sched_getaffinity(0))},
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "jax_cpu_threads": "XLA default (all available cores) unless XLA_FLAGS says otherwise",
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "cuda": torch.version.cuda if preset.gpu else None,
  }


def _config_record(preset: Preset) -> dict:
  cfg = preset.config
  return {"preset": preset.name, "batch": preset.batch, "text_tokens": preset.text_tokens,
          "image_grid_thw": list(preset.image_grid), "new_tokens": preset.new_tokens,
          "repeats": preset.repeats, "dtype": np.dtype(cfg.dtype).name,
          "param_dtype": np.dtype(cfg.param_dtype).name, "remat": cfg.remat,
          "model": cfg.to_hf_dict()}


def _rows(report: dict) -> list[tuple[str, str, str, str]]:
  """(measurement, ours, reference, speedup) strings for the tables.

  Times show the median and, in brackets, the fastest call: on a shared host a
  median far above the minimum means other processes got in the way.
  """
  m = report["measurements"]
  ms = lambda e: f"{e['median_s'] * 1e3:.2f} ({e['min_s'] * 1e3:.2f})"
  speedup = lambda e: f"{e['speedup']:.2f} ({e['speedup_of_min']:.2f})"
  rows = []
  for name, label in [("forward", "forward, ms/call"),
                      ("train_step", "train step fwd+bwd, ms/call"),
                      ("decode", f"decode {report['config']['new_tokens']} tokens incl. "
                                 "prefill, ms/call")]:
    entry = m[name]
    rows.append((label, ms(entry["ours"]), ms(entry["reference"]), speedup(entry)))
    if "tokens_per_s" in entry["ours"]:
      rows.append((f"{name.replace('_', ' ')} tokens/s (median)",
                   f"{entry['ours']['tokens_per_s']:,.0f}",
                   f"{entry['reference']['tokens_per_s']:,.0f}", f"{entry['speedup']:.2f}"))
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
  rows.append(("train MFU (median)", pct(report["mfu"]["ours"]), pct(report["mfu"]["reference"]),
               ""))
  for name in ("forward", "train_step", "decode"):
    rows.append((f"{name}: compile (ours) / first call (ref), s",
                 f"{m[name]['ours']['compile_s']:.2f}",
                 f"{m[name]['reference']['first_call_s']:.2f}", ""))
  return rows


def _markdown(report: dict) -> str:
  c, s = report["config"], report["sanity"]
  lines = [
      f"# Backbone benchmark: {c['preset']} on {report['device']['ours']}",
      "",
      f"{c['batch']} x {report['seq_len']} tokens (one {c['image_grid_thw']} image + "
      f"{c['text_tokens']} text tokens per sample), {c['dtype']}, remat={c['remat']}, "
      f"median of {c['repeats']}; reference: transformers "
      f"{report['environment']['versions']['transformers']} "
      f"({report['reference_settings']['attn_implementation']}) on {report['device']['reference']}"
      f", torch threads {report['reference_settings']['threads']['torch_num_threads']}. "
      "Speedup = reference time / our time (> 1: ours is faster). Load average (1 min) at "
      f"start/end: {report['load_average_1_5_15min']['start'][0]:.2f}/"
      f"{report['load_average_1_5_15min']['end'][0]:.2f} on "
      f"{report['environment']['host']['cpus_available']} CPUs.",
      "",
      "| measurement | ours: median (min) | reference: median (min) | speedup: median (min) |",
      "|---|---:|---:|---:|",
  ]
  lines += [f"| {a} | {b} | {r} | {x} |" for a, b, r, x in _rows(report)]
  lines += [
      "",
      f"Sanity: greedy tokens identical: **{s['greedy_tokens_identical']}** "
      f"(match {100 * s['greedy_tokens_match_fraction']:.1f}%); loss ours "
      f"{s['loss']['ours']:.6f} vs reference {s['loss']['reference']:.6f}; grad-norm rel. diff "
      f"{s['grad_norm']['rel_diff']:.2e}; logits max |diff| (sample 0) "
      f"{s['logits_sample0_max_abs_diff']:.2e} (max |logit| {s['logits_sample0_max_abs']:.2e}).",
      "",
      f"MFU formula: {report['mfu']['formula']} Peak: {report['mfu']['peak_source']}.",
      "",
  ]
  return "\n".join(lines)


def _print_table(report: dict) -> None:
  rows = [("measurement", "ours: median (min)", "reference: median (min)",
           "speedup: median (min)")] + _rows(report)
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  for i, row in enumerate(rows):
    print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                    for j, (cell, w) in enumerate(zip(row, widths))))
    if i == 0:
      print("  ".join("-" * w for w in widths))


def _device_tag() -> str:
  return re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")


def _write(report: dict, out_dir: str) -> tuple[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"bench_backbone_{_device_tag()}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
  with open(stem + ".md", "w") as f:
    f.write(_markdown(report))
  return stem + ".json", stem + ".md"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  preset = _with_flag_overrides(_PRESETS[_PRESET.value]())
  if preset.gpu and (jax.default_backend() != "gpu" or not torch.cuda.is_available()):
    sys.exit(f"ERROR: --preset {preset.name} needs a CUDA GPU visible to both JAX and PyTorch; "
             f"here JAX's backend is {jax.default_backend()!r} and torch.cuda.is_available() "
             f"is {torch.cuda.is_available()}. Use --preset cpu-small on this machine.")
  torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
  wall_start = time.perf_counter()
  # Other processes on a shared host skew the timings; the load average shows it.
  load_start = os.getloadavg()
  cfg = preset.config
  inputs = make_inputs(preset)
  seq = inputs.input_ids.shape[1]
  print(f"preset {preset.name}: batch {preset.batch} x {seq} tokens, {preset.new_tokens} new "
        f"tokens, {np.dtype(cfg.dtype).name}, remat={cfg.remat}, repeats {preset.repeats}")

  # Initialised on the host so that the device is free for the reference, which runs first.
  start = time.perf_counter()
  with jax.default_device(jax.devices("cpu")[0]):
    params = jax.device_get(rescale_kernels(qwen2_5_vl.init_params(cfg, jax.random.key(0))))
  init_s = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as folder:
    qwen2_5_vl.save_pretrained(qwen2_5_vl.Qwen2_5_VL(cfg), params, folder)
    print("running the reference ...")
    ref, ref_out = bench_reference(preset, folder, inputs)
  if preset.gpu:
    gc.collect()  # transformers modules hold reference cycles
    torch.cuda.empty_cache()  # hands the reference's memory to JAX
  print("running ours ...")
  ours, our_out = bench_ours(preset, params, inputs)

  tokens = {"forward": preset.batch * seq, "train_step": preset.batch * seq,
            "decode": preset.batch * preset.new_tokens}
  measurements = {}
  for name in ("forward", "train_step", "decode"):
    entry = {"ours": ours[name], "reference": ref[name],
             "speedup": ref[name]["median_s"] / ours[name]["median_s"],
             "speedup_of_min": ref[name]["min_s"] / ours[name]["min_s"]}
    if name != "forward":
      for side in ("ours", "reference"):
        entry[side]["tokens_per_s"] = tokens[name] / entry[side]["median_s"]
    measurements[name] = entry

  flops = _train_flops(preset, params, seq)
  peak, peak_source = _peak_flops()
  mfu = {side: (flops["flops_per_step"] / measurements["train_step"][side]["median_s"] / peak
                if peak else None) for side in ("ours", "reference")}
  sanity = _sanity(preset, our_out, ref_out)
  report = {
      "benchmark": "bench_backbone",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": _config_record(preset),
      "seq_len": seq,
      "device": {"ours": ours["device"], "reference": ref["device"]},
      "environment": _environment(preset),
      "reference_settings": {k: ref[k] for k in ("threads", "attn_implementation",
                                                 "gradient_checkpointing")},
      "measurements": measurements,
      "mfu": {"formula": _MFU_FORMULA, "peak_flops": peak, "peak_source": peak_source,
              **flops, **mfu},
      "sanity": sanity,
      "notes": [
          "Times are medians of `repeats` calls after one warm-up call, synchronised "
          "(block_until_ready / cuda.synchronize).",
          "speedup = reference median time / our median time (> 1: ours is faster); "
          "speedup_of_min compares the fastest calls, less sensitive to other load.",
          "Our compile_s: AOT lower+compile for forward and train_step; for decode the first "
          "call minus the median (generate jits internally).",
          "Decode times include the prefill; tokens_per_s = batch * new_tokens / time.",
          "Train step: loss + gradients of all parameters, no optimizer update.",
          "logits_sample0_max_abs_diff compares the logits of the first sample only.",
          "Weights: init_params, then every matrix rescaled to std 1/sqrt(fan_in) so that "
          "greedy decoding depends on the context (see rescale_kernels).",
      ],
      "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
      "init_params_s": init_s,
      "wall_s": time.perf_counter() - wall_start,
  }
  json_path, md_path = _write(report, _OUT_DIR.value)

  print()
  _print_table(report)
  print(f"\nsanity: greedy tokens identical={sanity['greedy_tokens_identical']} "
        f"(match {100 * sanity['greedy_tokens_match_fraction']:.1f}%), loss ours "
        f"{sanity['loss']['ours']:.6f} ref {sanity['loss']['reference']:.6f}, grad-norm rel diff "
        f"{sanity['grad_norm']['rel_diff']:.2e}, logits max |diff| "
        f"{sanity['logits_sample0_max_abs_diff']:.2e}")
  print(f"wrote {json_path} and {md_path}")
  if not sanity["greedy_tokens_identical"]:
    message = (f"greedy tokens differ between ours and the reference: "
               f"{sanity['first_mismatches']}")
    # In fp32 both should agree exactly; in bf16 rounding can flip near-ties.
    if cfg.dtype == jnp.float32:
      sys.exit(f"ERROR: {message}")
    print(f"WARNING: {message}")


if __name__ == "__main__":
  app.run(main)
