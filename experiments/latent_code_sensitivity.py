r"""How much the latent policy's choices can move the judge reward, on a trained workdir.

  python -m experiments.latent_code_sensitivity --config configs/demo.py \
      --workdir workdirs/demo [--prompts 32] [--out_dir results]

Latent RL can only raise the reward through the policy's codes: the world model
decodes greedily from (state, code), so a code matters at a step only when it changes
the decoded token. From `latent_sft`'s final variables (the latent RL start), on
fixed rl-split prompts, each sampled G times as in the `rl` stage:

  codes: per response step, the policy's probability mass on codes that decode the
         same token as the sampled code, and how many distinct tokens its top-k codes
         decode to (1: the step's code choice cannot change the text);
  reward: the judge reward at several policy temperatures (temperature 100 is close
          to uniform over the top-k codes), and best-of-G against the group mean,
          in both action spaces (token space samples the sft backbone's tokens).

Writes `results/latent_code_sensitivity.{json,md}`.
"""

from __future__ import annotations

import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from latent_mca.rl import prompts as prompts_lib
from latent_mca.rl import step as step_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import rl

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "pipeline config")
flags.DEFINE_string("workdir", "workdirs/demo", "a workdir holding sft and latent_sft")
flags.DEFINE_integer("prompts", 32, "fixed rl-split prompts (a multiple of prompts_per_step)")
flags.DEFINE_string("temperatures", "0.1,1,100", "policy temperatures to evaluate")
flags.DEFINE_string("out_dir", "results", "where the results go")
FLAGS = flags.FLAGS


def _config(space: str, temperature: float = 1.0):
  config = _CONFIG.value.copy_and_resolve_references()
  # One algorithm (it plays no part in sampling): the demo config lists all four.
  config.rl.action_space, config.rl.algorithm, config.rl.temperature = space, "grpo", temperature
  return config


def _sample(runner, items, seed: int):
  """(rollouts, rewards [P, G]) of the items, in chunks of the runner's pool."""
  g = runner.config.rl.group_size
  outs, rewards = [], []
  for i in range(0, len(items), runner.pool):
    out, _, raw = runner.sample(runner.params, items[i:i + runner.pool],
                                jax.random.fold_in(jax.random.key(seed), i))
    outs.append((out, items[i:i + runner.pool]))
    rewards.append(raw.reshape(-1, g))
  return outs, np.concatenate(rewards)


def code_statistics(runner, out, items) -> dict[str, np.ndarray]:
  """Per response step (masked): mass on same-token codes, distinct tokens of the top-k."""
  system, params, extra = runner.system, runner.params, runner.extra
  g, top_k = runner.config.rl.group_size, runner.config.rl.latent_top_k
  batch = step_lib.learner_batch(out, prompts_lib.repeated_images(
      [p for _, _, p in items], g, runner.patches))

  @jax.jit
  def stats(batch):
    m = batch["actions"].shape[1]
    t = batch["input_ids"].shape[1] - m
    states = system.backbone_states(params["backbone"], batch)
    h = states.h[:, t - 1:t + m - 1]
    policy = jax.nn.softmax(system.policy_logits(params, states)[:, t - 1:t + m - 1], -1)
    top = jnp.argsort(-policy, axis=-1)[..., :top_k]  # [N, M, K]

    def decode(code_nm):
      return jnp.argmax(system.code_logits(params, extra, h, code_nm), axis=-1)

    tokens = jax.lax.map(decode, jnp.moveaxis(top, -1, 0))  # [K, N, M]
    emitted = batch["input_ids"][:, t:]
    same = jnp.moveaxis(tokens == emitted[None], 0, -1)  # [N, M, K]
    mass = jnp.sum(jnp.take_along_axis(policy, top, -1) * same, -1)
    distinct = jnp.sum(jnp.moveaxis(tokens, 0, -1)[..., :, None] ==
                       jnp.moveaxis(tokens, 0, -1)[..., None, :], -1)  # [N, M, K] repeats
    return mass, jnp.sum(1.0 / distinct, -1)  # distinct tokens = sum of 1 / multiplicity

  mass, distinct = jax.device_get(stats(batch))
  mask = np.asarray(batch["mask"]).astype(bool)
  return {"mass": mass[mask], "distinct": distinct[mask]}


def main(argv):
  del argv
  items = None
  result = {"workdir": FLAGS.workdir, "prompts": FLAGS.prompts}
  for space in ("latent", "token"):
    temperatures = [float(t) for t in FLAGS.temperatures.split(",")] if space == "latent" \
        else [1.0]
    for temperature in temperatures:
      runner = rl.RLRunner(_config(space, temperature), FLAGS.workdir)
      if items is None:
        source = rl.prompt_items(runner.config, FLAGS.workdir, runner.processor)
        items = [source[i] for i in rl.spread(len(source), FLAGS.prompts)]
      outs, rewards = _sample(runner, items, seed=0)
      key = f"{space}/T={temperature:g}"
      result[key] = {"reward": float(rewards.mean()),
                     "best_of_group": float(rewards.max(axis=1).mean()),
                     "within_group_std": float(rewards.std(axis=1).mean())}
      if space == "latent" and temperature == 1.0:
        parts = [code_statistics(runner, out, chunk) for out, chunk in outs]
        mass = np.concatenate([p["mass"] for p in parts])
        distinct = np.concatenate([p["distinct"] for p in parts])
        result["codes"] = {
            "steps": int(mass.size),
            "mean_mass_on_codes_decoding_the_same_token": float(mass.mean()),
            "share_of_steps_with_95pct_mass_on_the_same_token": float(np.mean(mass > 0.95)),
            "mean_distinct_tokens_of_the_top_k_codes": float(distinct.mean()),
            "share_of_steps_whose_top_k_codes_all_decode_one_token": float(
                np.mean(distinct < 1.5))}
      print(key, result[key], flush=True)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  path = os.path.join(FLAGS.out_dir, "latent_code_sensitivity")
  backbone_lib.write_json(path + ".json", result)
  lines = [f"# What the latent policy can change ({FLAGS.workdir}, {FLAGS.prompts} rl-split "
           "prompts x G samples)", "",
           "| sampling | mean reward | best of G | within-group std |", "|---|---:|---:|---:|"]
  for key, value in result.items():
    if "/T=" in key:
      lines.append(f"| {key} | {value['reward']:.3f} | {value['best_of_group']:.3f} | "
                   f"{value['within_group_std']:.3f} |")
  lines += ["", "Latent steps at T=1 (response tokens):", ""]
  lines += [f"- {k.replace('_', ' ')}: {v:.3f}" if isinstance(v, float) else
            f"- {k}: {v}" for k, v in result["codes"].items()]
  with open(path + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
