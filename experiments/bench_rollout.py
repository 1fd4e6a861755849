r"""Latent vs token rollouts and RL steps on one model and one batch, side by side.

  python -m experiments.bench_rollout [--prompts 4] [--group_size 8] [--new_tokens 48]
                                      [--repeats 5] [--out_dir results]

One random model at the demo config's sizes (the tiny Qwen2.5-VL of
`configs/demo.py`, with the SPEC's latent modules: 128 codes, an 8-layer policy)
and one batch of prompts, each with one 56x56 image. Every row decodes exactly
`new_tokens` tokens (no stop tokens), so both spaces do the same amount of work
per token, plus what the latent space adds: the policy's decoder layers and the
world model at each step. Measured, as the median of `--repeats` calls after a
warm-up (compile) call:

  rollout   `rl.rollout.jitted_rollout`: prefill + decode, generated tokens / s;
  rl step   `rl.step.rl_step` on that rollout (GRPO, trainable: the policy in
            latent space; the top 2 layers, embeddings, norm and head in token space).

Writes `results/bench_rollout_<device>.json` and `.md`. The reference reports latent
rollouts at about 1.13x the time of token rollouts.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import time

from absl import app, flags
import jax
import numpy as np

from latent_mca.jobs import pipeline
from latent_mca.latent.config import LatentConfig
from latent_mca.latent.steps import LatentSystem
from latent_mca.models import qwen2_5_vl
from latent_mca.rl import algorithms as algos
from latent_mca.rl import prompts as prompts_lib
from latent_mca.rl import rollout as ro
from latent_mca.rl import step as step_lib
from latent_mca.training import state as state_lib

flags.DEFINE_integer("prompts", 4, "distinct prompts per batch")
flags.DEFINE_integer("group_size", 8, "samples per prompt")
flags.DEFINE_integer("new_tokens", 48, "tokens decoded per row")
flags.DEFINE_integer("prompt_tokens", 96, "text tokens per prompt (plus the image's)")
flags.DEFINE_integer("repeats", 5, "timed calls (median)")
flags.DEFINE_string("out_dir", "results", "where the results go")
F = flags.FLAGS
VOCAB, PAD = 2048, 0


def demo_model() -> qwen2_5_vl.Qwen2_5_VLConfig:
  """The demo config's backbone sizes, with special tokens at the top of a 2048 vocabulary."""
  b = pipeline.default_config().backbone
  text = qwen2_5_vl.TextConfig(vocab_size=VOCAB, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in b.text.items()})
  vision = qwen2_5_vl.VisionConfig(out_hidden_size=text.hidden_size, **{
      k: tuple(v) if isinstance(v, list) else v for k, v in b.vision.items()})
  return qwen2_5_vl.Qwen2_5_VLConfig(
      text=text, vision=vision, tie_word_embeddings=True, image_token_id=VOCAB - 4,
      video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2, vision_end_token_id=VOCAB - 1,
      bos_token_id=None, eos_token_id=(1,), pad_token_id=PAD)


def examples(cfg, num: int, text_tokens: int, seed: int = 0) -> list[dict]:
  """Prompts: [vision_start, 4 image tokens, vision_end, text]; a 4x4-patch (56 px) image."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    ids = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 4,
                          [cfg.vision_end_token_id],
                          rng.integers(2, VOCAB - 8, text_tokens)]).astype(np.int32)
    out.append({"input_ids": ids, "loss_mask": np.zeros_like(ids),
                "pixel_values": rng.normal(size=(16, 1176)).astype(np.float32),
                "image_grid_thw": np.array([[1, 4, 4]], np.int32)})
  return out


def _median_time(fn, repeats: int) -> tuple[float, float]:
  """(first call seconds, median of the next `repeats`)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def main(argv):
  del argv
  cfg = demo_model()
  system = LatentSystem.build(cfg, LatentConfig())
  backbone = qwen2_5_vl.init_params(cfg, jax.random.key(0))
  params, extra = system.init(backbone, jax.random.key(1))
  ex = examples(cfg, F.prompts, F.prompt_tokens)
  prompt_len = F.prompt_tokens + 6
  prompts = prompts_lib.collate_prompts(ex, PAD, prompt_len, 16)
  images = prompts_lib.repeated_images(ex, F.group_size, 16)
  sampling = ro.SamplingConfig(group_size=F.group_size, max_new_tokens=F.new_tokens,
                               top_k=32, stop_token_ids=(), pad_token_id=PAD)
  rows = F.prompts * F.group_size
  results = {}
  for space, trainable, top_layers in (
      ("token", (r"backbone/(decoder|embed_tokens|lm_head)/.*",), 2),
      ("latent", (r"policy/.*",), 0)):
    fn = ro.jitted_rollout(system, space=space, sampling=sampling)
    rollout_first, rollout_s = _median_time(
        lambda: fn(params, extra, prompts, jax.random.key(2)), F.repeats)
    out = fn(params, extra, prompts, jax.random.key(2))
    algorithm = algos.get_algorithm("grpo")
    rewards = np.random.default_rng(0).random(rows).astype(np.float32)
    batch = dict(step_lib.learner_batch(out, images),
                 advantages=algos.compute_advantages(algorithm, rewards, F.group_size)[0],
                 loss_params=algos.loss_params(algorithm))
    config = step_lib.RLStepConfig(system, space=space, top_layers=top_layers)
    batch["ref_logp"] = step_lib.reference_logprobs(config, params, batch)
    optimizer = state_lib.optimizer_config()
    optimizer.update(dict(learning_rate=1e-6, schedule="constant", trainable=trainable))
    state = state_lib.TrainState.create(params, state_lib.make_optimizer(optimizer, 10),
                                        jax.random.key(0), extra)
    step = jax.jit(functools.partial(step_lib.rl_step, config=config))
    step_first, step_s = _median_time(lambda: step(state, batch, jax.random.key(3))[1],
                                      F.repeats)
    results[space] = dict(rollout_s=rollout_s, rollout_tokens_per_s=rows * F.new_tokens
                          / rollout_s, rollout_compile_s=rollout_first - rollout_s,
                          rl_step_s=step_s, rl_step_compile_s=step_first - step_s)
    print(space, results[space], flush=True)
  ratio = results["latent"]["rollout_s"] / results["token"]["rollout_s"]
  record = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                platform=platform.platform(), jax=jax.__version__,
                setup=dict(prompts=F.prompts, group_size=F.group_size, new_tokens=F.new_tokens,
                           prompt_tokens=prompt_len, hidden=cfg.text.hidden_size,
                           layers=cfg.text.num_hidden_layers, policy_layers=8, codes=128),
                results=results, latent_over_token_rollout_time=ratio,
                latent_over_token_step_time=results["latent"]["rl_step_s"]
                / results["token"]["rl_step_s"])
  os.makedirs(F.out_dir, exist_ok=True)
  name = "gpu" if jax.default_backend() == "gpu" else "cpu"
  with open(os.path.join(F.out_dir, f"bench_rollout_{name}.json"), "w") as f:
    json.dump(record, f, indent=2)
  lines = [f"# Rollouts: latent vs token ({record['date']}, {record['device']})", "",
           f"{rows} rows ({F.prompts} prompts x {F.group_size}), {F.new_tokens} new tokens "
           f"each, prompts of {prompt_len} tokens; medians of {F.repeats}.", "",
           "| space | rollout s | tokens/s | rl step s |", "|---|---:|---:|---:|"]
  for space in ("token", "latent"):
    r = results[space]
    lines.append(f"| {space} | {r['rollout_s']:.3f} | {r['rollout_tokens_per_s']:.0f} | "
                 f"{r['rl_step_s']:.3f} |")
  lines += ["", f"latent / token rollout time: {ratio:.2f}x (reference: about 1.13x)"]
  with open(os.path.join(F.out_dir, f"bench_rollout_{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
