"""The `ablations` stage: the method without one of its parts (SPEC section 5's ablations).

  --config.stages=ablations [--config.ablations.names=no_cycle,no_projector,no_text_only
                             --config.ablations.algorithm=grpo]

Each ablation turns one switch of `LatentConfig` off and retrains the latent action model
from the first stage the switch changes, then runs latent RL with one algorithm and
evaluates the result on the held-out test sets exactly as the full model's row:

  no_cycle      use_cycle=False: inverse_joint without the cycle term;
  no_projector  use_projector=False: no cycle_warmup, text-only states fed raw;
  no_text_only  use_text_only=False: inverse_joint and policy_bc on paired data only.

Everything before that first changed stage is the same computation as the full run (same
data, seed and switches that play no part in it), so it is shared rather than repeated:
workdir/ablations/<name>/ holds relative links to the full run's data, tokenizer, backbone
and shared latent stages, and its own later stages, `rl_latent_<algorithm>/` and
`evaluate/` (the same prompts and sampling keys as the full run's `evaluate` stage). The
full run's `rl_latent_<algorithm>` and its `evaluate` row must exist; the error names the
stage to run otherwise. The table, full run first, goes to workdir/ablations.md / .json,
with each ablation's difference from the full row on the average (± the s.e. of the
paired per-prompt difference).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import logging

from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import evaluate as evaluate_lib
from latent_mca.stages import latent as latent_lib
from latent_mca.stages import rl as rl_lib

# name -> (the LatentConfig switch it turns off, the first latent stage that changes)
ABLATIONS = {
    "no_cycle": ("use_cycle", "inverse_joint"),
    "no_projector": ("use_projector", "inverse_joint"),  # cycle_warmup is skipped
    "no_text_only": ("use_text_only", "inverse_joint"),
}
LABELS = {"full": "full method", "no_cycle": "no cycle loss", "no_projector": "no projector",
          "no_text_only": "no text-only data"}
_SHARED_DATA = ("data", "tokenizer", "data_summary.json")
FOLDER = "ablations"


class MissingInputError(FileNotFoundError):
  """The full run lacks something the ablations need (names the stage to run)."""


def ablations_defaults() -> ml_collections.ConfigDict:
  """`config.ablations`."""
  return ml_collections.ConfigDict(dict(
      names="no_cycle,no_projector,no_text_only",  # comma-separated, of ABLATIONS
      algorithm="grpo",  # the RL algorithm each ablation (and the full row) is compared with
  ))


def names(config) -> list[str]:
  """The configured ablations; an unknown name is an error naming the known ones."""
  out = [n.strip() for n in config.ablations.names.split(",") if n.strip()]
  bad = [n for n in out if n not in ABLATIONS]
  if bad:
    raise ValueError(f"config.ablations.names: unknown {bad}; known: {sorted(ABLATIONS)}")
  return out


def ablated_config(config, name: str) -> ml_collections.ConfigDict:
  """The run's config with the ablation's switch off: latent RL with ablations.algorithm,
  evaluated on that one policy."""
  one = config.copy_and_resolve_references()
  one.latent[ABLATIONS[name][0]] = False
  one.rl.algorithm, one.rl.action_space = config.ablations.algorithm, "latent"
  one.evaluate.policies = rl_lib.stage_name(one)
  return one


def shared_stages(config, name: str) -> list[str]:
  """The full run's stage folders an ablation reuses: its backbone and the latent stages
  (enabled under the ablation) before the first one the switch changes."""
  first = ABLATIONS[name][1]
  latent = latent_lib.latent_config(ablated_config(config, name))
  before = latent_lib.ORDER[:latent_lib.ORDER.index(first)]
  return [config.latent.backbone_stage] + [s for s in before if latent_lib.enabled(s, latent)]


def _link(workdir: str, sub: str, entry: str) -> None:
  """sub/entry -> the full run's entry, as a relative link (the workdir stays movable)."""
  target, link = os.path.join(workdir, entry), os.path.join(sub, entry)
  if os.path.lexists(link):
    return
  os.symlink(os.path.relpath(target, sub), link)


def _require(workdir: str, entries, what: str) -> None:
  missing = [e for e in entries if not os.path.exists(os.path.join(workdir, e))]
  if missing:
    raise MissingInputError(
        f"ablations: {workdir} has no {', '.join(missing)}; run {what} first")


def run_one(config, workdir: str, name: str) -> dict:
  """Trains, RLs and evaluates one ablation under workdir/ablations/<name>/; returns the
  evaluate stage's metrics of its RL policy."""
  one = ablated_config(config, name)
  sub = os.path.join(workdir, FOLDER, name)
  os.makedirs(sub, exist_ok=True)
  shared = shared_stages(config, name)
  _require(workdir, _SHARED_DATA, "prepare_data")
  _require(workdir, shared, "the stages " + ",".join(shared))
  for entry in _SHARED_DATA + tuple(shared):
    _link(workdir, sub, entry)
  first = latent_lib.ORDER.index(ABLATIONS[name][1])
  for stage in latent_lib.ORDER[first:]:
    # No held-out measurements: the table compares the RL'd policies, and measuring does
    # not change what trains.
    latent_lib.run_stage(one, sub, stage, measure=False)
  rl_lib.run(one, sub)
  return evaluate_lib.evaluate(one, sub)


def _row(workdir: str, policy: str) -> dict:
  results = os.path.join(workdir, "eval_results.json")
  rows = backbone_lib.read_json(results)["rows"] if os.path.isfile(results) else {}
  if policy not in rows:
    raise MissingInputError(f"ablations: {results} has no {policy} row; run the rl "
                            f"stage with {policy.split('_', 2)[2]} in latent space and "
                            "then the evaluate stage first")
  return rows[policy]


def paired_difference(a: dict, b: dict) -> dict:
  """Average of a's rows minus b's (each an evaluate row: per_prompt lists by column, the
  same prompts in the same order), and the s.e. of that difference: per column the s.e. of
  the mean per-prompt difference, combined as the Average's (independent columns)."""
  if {c: len(v) for c, v in a["per_prompt"].items()} != {
      c: len(v) for c, v in b["per_prompt"].items()}:
    raise ValueError("the two rows were evaluated on different prompts (other evaluate "
                     "settings?); rerun the evaluate stage for both with the same config")
  diffs = {c: np.asarray(a["per_prompt"][c]) - np.asarray(b["per_prompt"][c])
           for c in a["per_prompt"]}
  summary = evaluate_lib.summarise({c: d.tolist() for c, d in diffs.items()})
  return summary["average"]


def run(config, workdir: str) -> dict:
  """The `ablations` stage: every configured ablation, then workdir/ablations.{md,json}."""
  chosen = names(config)
  policy = f"rl_latent_{config.ablations.algorithm}"
  full = _row(workdir, policy)  # checked before any training
  rows = {"full": full}
  metrics = {}
  for name in chosen:
    logging.info("ablation %s", name)
    metrics.update({f"ablations/{name}/{k.split('/', 2)[2]}": v
                    for k, v in run_one(config, workdir, name).items()})
    rows[name] = _row(os.path.join(workdir, FOLDER, name), policy)
  write_table(workdir, rows, policy)
  return metrics


def write_table(workdir: str, rows: dict, policy: str) -> None:
  """ablations.json (each row's columns, average, per-prompt scores and difference from the
  full row) and ablations.md."""
  cols = evaluate_lib.columns()
  cell = lambda s: f"{s['mean']:.3f} ± {s['se']:.3f}"  # noqa: E731
  out, lines = {}, ["| Variant | " + " | ".join(cols) + " | Average | vs full |",
                    "|---|" + "---:|" * (len(cols) + 2)]
  for name, row in rows.items():
    diff = None if name == "full" else paired_difference(row, rows["full"])
    out[name] = dict(columns=row["columns"], average=row["average"],
                     per_prompt=row["per_prompt"], vs_full=diff)
    lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cell(row["columns"][c])
                                                             for c in cols)
                 + f" | {cell(row['average'])} | "
                 + ("-" if diff is None else f"{diff['mean']:+.3f} ± {diff['se']:.3f}") + " |")
  backbone_lib.write_json(os.path.join(workdir, "ablations.json"), dict(policy=policy, rows=out))
  with open(os.path.join(workdir, "ablations.md"), "w") as f:
    f.write(f"Ablations of the latent action model, each after latent RL with "
            f"{policy.split('_', 2)[2]} ({policy}); judge reward on the held-out test sets as "
            "in eval_results.md. vs full: the Average's difference from the full method, ± "
            "the s.e. of the paired per-prompt difference.\n\n" + "\n".join(lines) + "\n")
