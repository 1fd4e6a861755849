"""The `evaluate` stage: every policy of a workdir on the dialogue tasks' held-out test sets.

  --config.stages=evaluate [--config.evaluate.examples=32 --config.evaluate.policies=all]

The score is the judge reward the RL stage trains on (`judge.rewards.make_reward_fn(
config.rl.judge)`: the response's judge scores over the reference reply's), of
`evaluate.samples_per_prompt` replies sampled as the RL stage's eval samples them
(rl.temperature, rl.latent_top_k / token_top_k / token_top_p, rl.max_new_tokens;
`rl.RLRunner.sample`), averaged per prompt. Each test set (task x test_in / test_out) is
a column: its mean over prompts ± the standard error of that mean; the Average column is
the mean of the test-set columns (its s.e. that of a mean of independent columns).

Policies ("all" = every one found, finished):
  sft          the token SFT model (token decoding);
  latent_sft   the latent SFT model (latent decoding: policy -> code -> world model);
  rl_<space>_<algorithm>  every finished RL run (its folder has eval_final.json), decoded
               in its action space from its final checkpoint.

Every policy sees the same prompts with the same sampling keys (paired comparison).
Prompts longer than rl.prompt_length tokens are left out, as in RL. Per-policy results
are cached in workdir/evaluate/<policy>.json with the settings and the policy's
checkpoint steps: a rerun reuses them while both are unchanged. Latent policies also record
how often each code was sampled over their test replies ("code_counts": the codebook usage
the report plots). The table (rows = SFT and
each algorithm x token / latent, as SPEC section 5's reference table; columns = the test
sets and their average) goes to workdir/eval_results.md and .json.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from latent_mca.rl import rollout as rollout_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import rl as rl_lib
from latent_mca.training import checkpoint

SPLITS = ("test_in", "test_out")
SFT_POLICIES = {"sft": rollout_lib.TOKEN, "latent_sft": rollout_lib.LATENT}
CACHE_DIR = "evaluate"


def evaluate_defaults() -> ml_collections.ConfigDict:
  """`config.evaluate`."""
  return ml_collections.ConfigDict(dict(
      examples=32,  # prompts per test set, spread evenly over it (0 = all)
      samples_per_prompt=1,  # replies sampled per prompt (rl's eval sampling settings)
      batch_prompts=0,  # prompts per rollout (0 = rl.prompts_per_step); a multiple of data x fsdp
      policies="all",  # "all" (every finished one found) or comma-separated policy names
  ))


def columns() -> list[str]:
  """The test-set columns, "<task> <in|out>", task by task."""
  return [f"{task} {split.split('_')[1]}" for task in rl_lib.TASKS for split in SPLITS]


def _is_rl_run(entry: str, workdir: str) -> bool:
  parts = entry.split("_", 2)
  return (len(parts) == 3 and parts[0] == "rl" and parts[1] in SFT_POLICIES.values()
          and os.path.isfile(os.path.join(workdir, entry, "eval_final.json")))


def _checkpoint_steps(workdir: str, policy: str) -> list[int]:
  folder = checkpoint.checkpoint_dir(os.path.join(workdir, policy))
  if not os.path.isdir(folder):
    return []
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit())


def find_policies(workdir: str, which: str = "all") -> list[str]:
  """The policies to evaluate: `which` listed, or ("all") every one with checkpoints
  (sft, latent_sft) or a finished RL run (rl_<space>_<algorithm> with eval_final.json)."""
  if which.strip() != "all":
    names = [n.strip() for n in which.split(",") if n.strip()]
    bad = [n for n in names if n not in SFT_POLICIES and not _is_rl_run(n, workdir)]
    if not names or bad:
      raise ValueError(f"evaluate.policies={which!r}: {bad or 'nothing'} is not a policy of "
                       f"{workdir} (sft, latent_sft or a finished rl_<space>_<algorithm> run)")
    return names
  found = [p for p in SFT_POLICIES if _checkpoint_steps(workdir, p)]
  found += sorted(e for e in os.listdir(workdir) if _is_rl_run(e, workdir))
  if not found:
    raise ValueError(f"{workdir} holds no policy to evaluate: run sft, latent_sft or rl first")
  return found


def space_of(policy: str) -> str:
  return SFT_POLICIES.get(policy) or policy.split("_")[1]


def row_label(policy: str) -> tuple[str, str]:
  """(method, action space) of a policy, as the reference table names them."""
  if policy in SFT_POLICIES:
    return "SFT", SFT_POLICIES[policy]
  _, space, algorithm = policy.split("_", 2)
  return rl_lib.ALGORITHM_NAMES.get(algorithm, algorithm), space


def _row_order(policy: str):
  method, space = row_label(policy)
  order = list(rl_lib.ALGORITHM_NAMES.values())
  rank = -1 if method == "SFT" else order.index(method) if method in order else len(order)
  return rank, policy.split("_", 2)[-1] if policy.startswith("rl_") else "", space != "token"


def _test_items(config, workdir: str, processor) -> dict[str, list]:
  """column -> the (task, example, prompt) items evaluated on it."""
  n = config.evaluate.examples
  out = {}
  for split in SPLITS:
    source = rl_lib.prompt_items(config, workdir, processor, split)
    by_task = {task: [] for task in rl_lib.TASKS}
    for i in range(len(source)):
      item = source[i]
      by_task[item[0]].append(item)
    for task, items in by_task.items():
      if not items:
        raise ValueError(f"{task}/{split}: no prompt fits rl.prompt_length="
                         f"{config.rl.prompt_length}")
      keep = range(len(items)) if n <= 0 else rl_lib.spread(len(items), n)
      out[f"{task} {split.split('_')[1]}"] = [items[i] for i in keep]
  return out


def _settings(config) -> dict:
  e, r = config.evaluate, config.rl
  return json.loads(json.dumps(dict(
      examples=e.examples, samples_per_prompt=e.samples_per_prompt,
      batch_prompts=e.batch_prompts or r.prompts_per_step, seed=config.seed,
      temperature=r.temperature, latent_top_k=r.latent_top_k, token_top_k=r.token_top_k,
      token_top_p=r.token_top_p, max_new_tokens=r.max_new_tokens,
      prompt_length=r.prompt_length, judge=r.judge.to_dict())))


def _runner(config, workdir: str, space: str) -> rl_lib.RLRunner:
  """An RLRunner of `space` whose rollout samples evaluate.samples_per_prompt per prompt."""
  one = config.copy_and_resolve_references()
  one.rl.action_space, one.rl.algorithm = space, "grpo"  # the algorithm plays no part here
  one.rl.group_size = config.evaluate.samples_per_prompt
  one.rl.prompts_per_step = config.evaluate.batch_prompts or config.rl.prompts_per_step
  one.rl.diversity_model = ""
  return rl_lib.RLRunner(one, workdir)


def _variables(runner: rl_lib.RLRunner, workdir: str, policy: str):
  """(params, extra) of the policy: the runner's start point (sft / latent_sft) or an RL
  run's final checkpoint."""
  if policy in SFT_POLICIES:
    return runner.params, runner.extra
  abstract = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  loaded = checkpoint.load_final(os.path.join(workdir, policy),
                                 {"params": abstract(runner.params),
                                  "extra": abstract(runner.extra)})
  # Restored with the runner's own shardings, so the rollout program sees one placement.
  return loaded["params"], loaded["extra"]


def _score(runner: rl_lib.RLRunner, params, extra, items: dict[str, list],
           seed: int) -> tuple[dict, list | None]:
  """(column -> each prompt's mean judge reward, code counts). All columns' prompts go
  through the rollout in chunks of the runner's pool (the last one padded with repeats,
  dropped). The code counts (latent space; else None) are how often each code was sampled
  over the replies' tokens: the policy's codebook usage on the test sets."""
  flat = [(column, item) for column, column_items in items.items() for item in column_items]
  chunk, g = runner.pool, runner.config.rl.group_size
  latent = runner.space == rollout_lib.LATENT
  counts = np.zeros(runner.system.config.num_codes, np.int64)
  per_prompt = []
  runner.extra = extra  # `sample` reads the runner's extra
  for start in range(0, len(flat), chunk):
    batch = [item for _, item in flat[start:start + chunk]]
    real = len(batch)
    batch += [batch[0]] * (chunk - real)
    out, _, raw = runner.sample(params, batch, jax.random.fold_in(jax.random.key(seed), start))
    per_prompt.extend(raw.reshape(-1, g)[:real].mean(axis=1).tolist())
    if latent:
      actions, mask = (np.asarray(x)[:real * g] for x in jax.device_get((out.actions, out.mask)))
      counts += np.bincount(actions[mask == 1], minlength=len(counts))
  scores = {column: [] for column in items}
  for (column, _), value in zip(flat, per_prompt):
    scores[column].append(float(value))
  return scores, counts.tolist() if latent else None


def _stats(values) -> dict:
  values = np.asarray(values, np.float64)
  se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
  return dict(mean=float(values.mean()), se=se, n=int(len(values)))


def summarise(per_prompt: dict[str, list]) -> dict:
  """Each column's mean ± s.e. over prompts, and their Average (mean of the column means;
  s.e. sqrt(sum se^2) / k, the columns being independent prompt sets)."""
  cols = {column: _stats(values) for column, values in per_prompt.items()}
  means = [c["mean"] for c in cols.values()]
  average = dict(mean=float(np.mean(means)),
                 se=float(np.sqrt(sum(c["se"] ** 2 for c in cols.values())) / len(cols)))
  return dict(columns=cols, average=average)


def _markdown(rows: dict, cols: list[str], settings: dict) -> str:
  header = ["Method", "Action space"] + cols + ["Average"]
  lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(cols) + 1)]
  cell = lambda s: f"{s['mean']:.3f} ± {s['se']:.3f}"  # noqa: E731
  for policy, row in rows.items():
    method, space = row["method"], row["space"]
    if policy.startswith("rl_") and method not in rl_lib.ALGORITHM_NAMES.values():
      method = policy  # an unknown algorithm: the folder's name
    lines.append("| " + " | ".join([method, space] + [cell(row["columns"][c]) for c in cols]
                                   + [cell(row["average"])]) + " |")
  n = sorted({s["n"] for row in rows.values() for s in row["columns"].values()})
  return (f"Judge reward (response's judge scores / the reference reply's) on the dialogue "
          f"tasks' held-out test sets: mean ± s.e. over {'/'.join(map(str, n))} prompts per "
          f"test set, {settings['samples_per_prompt']} sample(s) per prompt at temperature "
          f"{settings['temperature']}; Average = mean of the test-set columns.\n\n"
          + "\n".join(lines) + "\n")


def evaluate(config, workdir: str) -> dict:
  """The `evaluate` stage; returns eval/<policy>/<column> and eval/<policy>/average means."""
  policies = sorted(find_policies(workdir, config.evaluate.policies), key=_row_order)
  settings = _settings(config)
  cache = os.path.join(workdir, CACHE_DIR)
  os.makedirs(cache, exist_ok=True)
  runners, items, rows = {}, None, {}
  for policy in policies:
    path = os.path.join(cache, f"{policy}.json")
    key = dict(settings=settings, checkpoint_steps=_checkpoint_steps(workdir, policy))
    cached = backbone_lib.read_json(path) if os.path.isfile(path) else None
    if cached is not None and cached["key"] == key and "code_counts" in cached:
      per_prompt, code_counts = cached["per_prompt"], cached["code_counts"]
      logging.info("evaluate: reusing %s", path)
    else:
      space = space_of(policy)
      if space not in runners:
        runners[space] = _runner(config, workdir, space)
      runner = runners[space]
      if items is None:
        items = _test_items(config, workdir, runner.processor)
      per_prompt, code_counts = _score(runner, *_variables(runner, workdir, policy), items,
                                       config.seed)
      backbone_lib.write_json(path, dict(key=key, per_prompt=per_prompt,
                                         code_counts=code_counts))
    method, space = row_label(policy)
    rows[policy] = dict(method=method, space=space, **summarise(per_prompt),
                        per_prompt=per_prompt, code_counts=code_counts)
  cols = columns()
  backbone_lib.write_json(os.path.join(workdir, "eval_results.json"),
                          dict(settings=settings, columns=cols + ["average"], rows=rows))
  with open(os.path.join(workdir, "eval_results.md"), "w") as f:
    f.write(_markdown(rows, cols, settings))
  metrics = {}
  for policy, row in rows.items():
    metrics.update({f"eval/{policy}/{c}": s["mean"] for c, s in row["columns"].items()})
    metrics[f"eval/{policy}/average"] = row["average"]["mean"]
  logging.info("evaluate: %s", {k: round(v, 4) for k, v in metrics.items()})
  return metrics
