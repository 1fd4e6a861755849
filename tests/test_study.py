"""The whole study on the smoke world: ablations, the report and several seeds."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest

from latent_mca.config_schema import ConfigError
from latent_mca.jobs import pipeline
from latent_mca.stages import ablations as ablations_lib
from latent_mca.stages import evaluate as evaluate_lib
from latent_mca.stages import report as report_lib

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "bnpo")
COLUMNS = evaluate_lib.columns()


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_the_smoke_config_runs_the_whole_study(smoke):
  config, workdir, metrics, _ = smoke
  assert config.stages == pipeline.STUDY_STAGES
  rows = _json(os.path.join(workdir, "eval_results.json"))["rows"]
  runs = [f"rl_{s}_{a}" for a in ALGORITHMS for s in ("token", "latent")]
  assert list(rows) == ["sft", "latent_sft"] + runs  # the reference's row order
  for run in runs:
    assert metrics[f"{run}/step"] == config.rl.num_steps
  for name in ("report.md", "report.json", "ablations.md", "eval_results.md",
               "report/reward_curves.png", "report/codebook_usage.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  times = _json(os.path.join(workdir, "stage_seconds.json"))
  assert set(times) == set(config.stages.split(",")) - {"report"}


def test_latent_rows_count_the_codes_of_their_test_replies(smoke):
  _, workdir, _, _ = smoke
  rows = _json(os.path.join(workdir, "eval_results.json"))["rows"]
  for policy, row in rows.items():
    if row["space"] == "token":
      assert row["code_counts"] is None, policy
      continue
    counts = np.asarray(row["code_counts"])
    assert counts.shape == (16,) and counts.min() >= 0 and counts.sum() > 0, policy


def test_each_ablation_shares_exactly_the_stages_it_does_not_change(smoke):
  config, workdir, _, _ = smoke
  shared = {"no_cycle": ["pretrain", "inverse_warmup", "cycle_warmup"],
            "no_projector": ["pretrain", "inverse_warmup"],
            "no_text_only": ["pretrain", "inverse_warmup", "cycle_warmup"]}
  for name, stages in shared.items():
    assert ablations_lib.shared_stages(config, name) == stages
    sub = os.path.join(workdir, "ablations", name)
    for entry in ["data", "tokenizer"] + stages:
      link = os.path.join(sub, entry)
      assert os.path.islink(link) and not os.path.isabs(os.readlink(link)), (name, entry)
      assert os.path.samefile(link, os.path.join(workdir, entry))
    for stage in ("inverse_joint", "policy_bc", "latent_sft", "rl_latent_grpo"):
      assert os.path.isdir(os.path.join(sub, stage)) and not os.path.islink(
          os.path.join(sub, stage)), (name, stage)
    for stage in ("inverse_joint", "policy_bc", "latent_sft"):  # trained, not measured
      assert not os.path.exists(os.path.join(sub, stage, "eval_initial.json"))
      with open(os.path.join(sub, stage, "metrics.jsonl")) as f:
        assert '"eval/' not in f.read()
    assert not os.path.lexists(os.path.join(sub, "sft"))  # latent RL needs no token model
  # The switch reached the retrained stages: no_projector has nothing to project with.
  joint = os.path.join(workdir, "ablations", "no_projector", "inverse_joint", "metrics.jsonl")
  with open(joint) as f:
    assert "proj_nll" not in f.read()
  with open(os.path.join(workdir, "ablations", "no_cycle", "inverse_joint",
                         "metrics.jsonl")) as f:
    assert "cycle_nll" not in f.read()


def test_ablation_table_compares_with_the_full_runs_row(smoke):
  config, workdir, metrics, _ = smoke
  table = _json(os.path.join(workdir, "ablations.json"))
  assert table["policy"] == "rl_latent_grpo"
  assert list(table["rows"]) == ["full", "no_cycle", "no_projector", "no_text_only"]
  full = _json(os.path.join(workdir, "eval_results.json"))["rows"]["rl_latent_grpo"]
  assert table["rows"]["full"]["per_prompt"] == full["per_prompt"]
  for name in ("no_cycle", "no_projector", "no_text_only"):
    row = table["rows"][name]
    own = _json(os.path.join(workdir, "ablations", name, "eval_results.json"))
    assert list(own["rows"]) == ["rl_latent_grpo"]
    assert row["per_prompt"] == own["rows"]["rl_latent_grpo"]["per_prompt"]
    # The same prompts, so the difference is paired prompt by prompt.
    diffs = {c: np.subtract(row["per_prompt"][c], full["per_prompt"][c]) for c in COLUMNS}
    assert row["vs_full"]["mean"] == pytest.approx(np.mean([d.mean() for d in diffs.values()]))
    se = [d.std(ddof=1) / math.sqrt(len(d)) for d in diffs.values()]
    assert row["vs_full"]["se"] == pytest.approx(math.sqrt(sum(s**2 for s in se)) / len(se))
    assert metrics[f"ablations/{name}/average"] == pytest.approx(row["average"]["mean"])
  with open(os.path.join(workdir, "ablations.md")) as f:
    lines = [line for line in f.read().splitlines() if line.startswith("| ")]
  assert [line.split("|")[1].strip() for line in lines[1:]] == [
      "full method", "no cycle loss", "no projector", "no text-only data"]


def test_ablations_name_what_they_need(smoke, tmp_path):
  config, workdir, _, _ = smoke
  bad = config.copy_and_resolve_references()
  bad.ablations.names = "no_cycle,no_world_model"
  with pytest.raises(ValueError, match="no_world_model"):
    ablations_lib.run(bad, workdir)
  # A workdir without the full run's evaluation: the stages to run are named.
  for entry in ("data", "tokenizer", "data_summary.json", "pretrain"):
    os.symlink(os.path.join(workdir, entry), tmp_path / entry)
  with pytest.raises(ablations_lib.MissingInputError, match="evaluate stage"):
    ablations_lib.run(config, str(tmp_path))
  # With the full run's row but without its shared stages: they are named.
  shutil.copy(os.path.join(workdir, "eval_results.json"), tmp_path / "eval_results.json")
  with pytest.raises(ablations_lib.MissingInputError, match="inverse_warmup"):
    ablations_lib.run(config, str(tmp_path))


def test_verdicts_by_hand():
  stat = report_lib._combine([0.03, 0.05, 0.04], None)
  assert stat["mean"] == pytest.approx(0.04)
  assert stat["spread"] == pytest.approx(0.01)  # sd of 0.03, 0.04, 0.05
  assert stat["se"] == pytest.approx(0.01 / math.sqrt(3))
  text = report_lib.verdict(stat, "A wins", "B wins")
  assert text.startswith("yes: A wins") and "holds in 3 of 3 seeds" in text
  mixed = report_lib._combine([0.02, -0.01, 0.005], None)
  assert report_lib.verdict(mixed, "A", "B").startswith("no clear difference")
  assert "holds in 2 of 3 seeds" in report_lib.verdict(mixed, "A", "B")
  worse = report_lib._combine([-0.05, -0.06, -0.04], None)
  assert report_lib.verdict(worse, "A", "B").startswith("no: B")
  # One seed: the spread is the given standard error.
  one = report_lib._combine([0.01], [0.02])
  assert (one["spread"], one["se"], one["n"]) == (0.02, 0.02, 1)
  assert report_lib.verdict(one, "A", "B").startswith("no clear difference")
  assert report_lib.verdict(report_lib._combine([0.05], [0.02]), "A", "B").startswith("yes")


def _fake_seed(smoke_dir: str, folder: str, shift: float) -> None:
  """A copy of the smoke run's results (not its checkpoints) with every judge score of the
  latent RL runs moved by `shift`, and every diversity by `shift` too."""
  os.makedirs(folder, exist_ok=True)
  for entry in os.listdir(smoke_dir):
    if entry.startswith("rl_") and os.path.isdir(os.path.join(smoke_dir, entry)):
      os.makedirs(os.path.join(folder, entry), exist_ok=True)
      for f in ("eval_initial.json", "eval_final.json", "metrics.jsonl"):
        shutil.copy(os.path.join(smoke_dir, entry, f), os.path.join(folder, entry, f))
      final = _json(os.path.join(folder, entry, "eval_final.json"))
      final["diversity"] += shift
      with open(os.path.join(folder, entry, "eval_final.json"), "w") as f:
        json.dump(final, f)
  for name in ("eval_results.json", "ablations.json"):
    data = _json(os.path.join(smoke_dir, name))
    for policy, row in data["rows"].items():
      if policy.startswith("rl_latent") or name == "ablations.json" and policy != "full":
        row["per_prompt"] = {c: [v + shift for v in vals] for c, vals in
                             row["per_prompt"].items()}
        stats = evaluate_lib.summarise(row["per_prompt"])
        row["columns"], row["average"] = stats["columns"], stats["average"]
        if row.get("vs_full"):
          row["vs_full"] = ablations_lib.paired_difference(row, data["rows"]["full"])
    with open(os.path.join(folder, name), "w") as f:
      json.dump(data, f)


def test_report_over_three_seeds_is_the_mean_and_sd_of_the_seeds(smoke, tmp_path):
  config, smoke_dir, _, _ = smoke
  config = config.copy_and_resolve_references()
  config.seeds = "0,5,7"
  workdir = str(tmp_path / "study")
  for seed, shift in zip((0, 5, 7), (0.0, 0.1, 0.2)):
    _fake_seed(smoke_dir, pipeline.seed_workdir(workdir, config, seed), shift)
  assert os.path.isdir(os.path.join(workdir, "seed_5"))
  metrics = pipeline.run(_with_stages(config, "report"), workdir)
  report = _json(os.path.join(workdir, "report.json"))
  base = _json(os.path.join(smoke_dir, "eval_results.json"))["rows"]
  for policy, row in report["results"].items():
    shifts = (0.0, 0.1, 0.2) if policy.startswith("rl_latent") else (0.0, 0.0, 0.0)
    values = [base[policy]["average"]["mean"] + s for s in shifts]
    cell = row["cells"]["average"]
    assert cell["mean"] == pytest.approx(np.mean(values))
    assert cell["spread"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)
  for algorithm in ALGORITHMS:
    latent, token = base[f"rl_latent_{algorithm}"], base[f"rl_token_{algorithm}"]
    d = latent["average"]["mean"] - token["average"]["mean"]
    stat = report["latent_vs_token"][algorithm]
    assert stat["values"] == pytest.approx([d, d + 0.1, d + 0.2])
    assert metrics[f"report/latent_minus_token/{algorithm}"] == pytest.approx(d + 0.1)
    # Every run's diversity moved by the seed's shift: latent - token did not.
    div = report["diversity"][algorithm]["latent_minus_token"]
    assert div["values"] == pytest.approx([_diversity_gap(smoke_dir, algorithm)] * 3)
  hurts = report["ablations"]["no_cycle"]["hurts"]
  full = _json(os.path.join(smoke_dir, "ablations.json"))["rows"]
  base_hurt = full["full"]["average"]["mean"] - full["no_cycle"]["average"]["mean"]
  # The ablated rows moved by the shift, the full row of ablations.json did not: hurts
  # shrinks by the shift.
  assert hurts["values"] == pytest.approx([base_hurt, base_hurt - 0.1, base_hurt - 0.2])
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  assert "mean ± standard deviation over 3 seeds (0, 5, 7)" in text
  assert "Does latent RL beat token RL with GRPO?" in text
  for png in ("reward_curves.png", "codebook_usage.png"):
    assert os.path.getsize(os.path.join(workdir, "report", png)) > 0


def _with_stages(config, stages):
  config = config.copy_and_resolve_references()
  config.stages = stages
  return config


def _diversity_gap(workdir, algorithm):
  ends = [_json(os.path.join(workdir, f"rl_{s}_{algorithm}", "eval_final.json"))["diversity"]
          for s in ("latent", "token")]
  return ends[0] - ends[1]


def test_report_table_cells_are_the_evaluate_tables_for_one_seed(smoke):
  _, workdir, _, _ = smoke
  report = _json(os.path.join(workdir, "report.json"))
  rows = _json(os.path.join(workdir, "eval_results.json"))["rows"]
  assert report["seeds"] == [0]
  for policy, row in report["results"].items():
    for column in COLUMNS:
      cell = row["cells"][column]
      assert (cell["mean"], cell["spread"]) == (rows[policy]["columns"][column]["mean"],
                                                rows[policy]["columns"][column]["se"])
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  assert "one seed (0): mean ± standard error over prompts" in text
  for question in ("Does latent RL beat token RL with DAPO?",
                   "Does removing the projector hurt (latent RL)?",
                   "Are latent rollouts more diverse than token rollouts after BNPO?"):
    line = next(line for line in text.splitlines() if question in line)
    assert re.search(r"\? (yes: |no: |no clear difference|unknown)", line), line


def test_seeds_are_checked_and_laid_out(tmp_path):
  config = pipeline.smoke_config()
  for bad in ("0,x", "1,1"):
    config.seeds = bad
    with pytest.raises(ConfigError, match="config.seeds"):
      pipeline.seeds(config)
  config.seeds = ""
  config.seed = 3
  assert pipeline.seeds(config) == [3]
  config.seeds = "4,2"
  assert pipeline.seed_workdir("w", config, 4) == "w"
  assert pipeline.seed_workdir("w", config, 2) == os.path.join("w", "seed_2")


def test_report_without_evaluation_names_the_stage(tmp_path):
  config = pipeline.smoke_config()
  with pytest.raises(report_lib.MissingResultsError, match="evaluate stage"):
    report_lib.report(config, str(tmp_path))


def test_report_without_diversity_says_it_was_not_measured():
  report = dict(seeds=[0], results={}, latent_vs_token={}, ablations={}, diversity={},
                codebook={}, stage_seconds=[{}])
  settings = dict(examples=16, samples_per_prompt=1, temperature=1.0)
  text = report_lib.markdown(report, settings)
  assert "Are latent rollouts more diverse than token rollouts? Not measured" in text


def test_paired_difference_by_hand_and_on_other_prompts():
  a = {"per_prompt": {"x": [0.3, 0.5, 0.4], "y": [0.2, 0.2]}}
  b = {"per_prompt": {"x": [0.1, 0.2, 0.3], "y": [0.1, 0.3]}}
  diff = ablations_lib.paired_difference(a, b)
  dx, dy = np.array([0.2, 0.3, 0.1]), np.array([0.1, -0.1])
  assert diff["mean"] == pytest.approx((dx.mean() + dy.mean()) / 2)
  se = [d.std(ddof=1) / math.sqrt(len(d)) for d in (dx, dy)]
  assert diff["se"] == pytest.approx(math.sqrt(se[0] ** 2 + se[1] ** 2) / 2)
  with pytest.raises(ValueError, match="different prompts"):
    ablations_lib.paired_difference(a, {"per_prompt": {"x": [0.1], "y": [0.1, 0.3]}})
