"""The `evaluate` stage on the smoke world: sft, latent_sft and a tiny finished RL run."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from latent_mca.jobs import pipeline
from latent_mca.stages import evaluate as evaluate_lib
from latent_mca.stages import rl as rl_stage

COLUMNS = ["roleplay in", "roleplay out", "personalised in", "personalised out"]
HEADER = ("| Method | Action space | roleplay in | roleplay out | personalised in | "
          "personalised out | Average |")


def _json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def evaluated(smoke, tmp_path_factory):
  """(config, workdir, metrics) of the stage on a copy of the smoke workdir with a finished
  2-step latent GRPO run and an unfinished RL folder."""
  config, smoke_dir, _, _ = smoke
  workdir = str(tmp_path_factory.mktemp("evaluate") / "work")
  shutil.copytree(smoke_dir, workdir, ignore=shutil.ignore_patterns(
      "rl_*", "evaluate", "eval_results.*", "rl_summary.*", "rl_rewards.png", "ablations*",
      "report*"))
  rl_config = config.copy_and_resolve_references()
  rl_config.rl.update(dict(num_steps=2, action_space="latent", algorithm="grpo",
                           diversity_model=""))
  rl_stage.run(rl_config, workdir)
  # Not a finished run (no eval_final.json), and not a policy at all: both are left out.
  os.makedirs(os.path.join(workdir, "rl_token_dapo"))
  os.makedirs(os.path.join(workdir, "rl_notes"))
  config = config.copy_and_resolve_references()
  config.stages = "evaluate"
  metrics = pipeline.run(config, workdir)
  return config, workdir, metrics


def test_evaluate_stage_tabulates_every_policy_on_every_test_set(evaluated):
  config, workdir, metrics = evaluated
  results = _json(os.path.join(workdir, "eval_results.json"))
  policies = ["sft", "latent_sft", "rl_latent_grpo"]
  assert list(results["rows"]) == policies
  assert results["columns"] == COLUMNS + ["average"]
  for policy in policies:
    row = results["rows"][policy]
    assert sorted(row["columns"]) == sorted(COLUMNS)
    for column in COLUMNS:
      values = np.asarray(row["per_prompt"][column])
      assert len(values) >= 2 and np.all(np.isfinite(values))
      assert np.all(values >= 0) and np.all(values <= 10)  # ratios of 0-10 judge scores
      cell = row["columns"][column]
      assert cell["n"] == len(values)
      assert cell["mean"] == pytest.approx(values.mean())
      assert cell["se"] == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)))
      assert metrics[f"eval/{policy}/{column}"] == pytest.approx(cell["mean"])
    # The average is the mean of the test-set columns.
    average = np.mean([row["columns"][c]["mean"] for c in COLUMNS])
    assert row["average"]["mean"] == pytest.approx(average)
    assert metrics[f"eval/{policy}/average"] == pytest.approx(average)
  # Every policy saw the same prompts: the same number per column.
  for column in COLUMNS:
    assert len({results["rows"][p]["columns"][column]["n"] for p in policies}) == 1
  assert [results["rows"][p]["space"] for p in policies] == ["token", "latent", "latent"]


def test_evaluate_stage_markdown_has_the_reference_layout(evaluated):
  _, workdir, _ = evaluated
  results = _json(os.path.join(workdir, "eval_results.json"))
  with open(os.path.join(workdir, "eval_results.md")) as f:
    lines = [line for line in f.read().splitlines() if line.startswith("|")]
  assert lines[0] == HEADER
  body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert [row[:2] for row in body] == [["SFT", "token"], ["SFT", "latent"], ["GRPO", "latent"]]
  for cells, policy in zip(body, ["sft", "latent_sft", "rl_latent_grpo"]):
    row = results["rows"][policy]
    stats = [row["columns"][c] for c in COLUMNS] + [row["average"]]
    for cell, s in zip(cells[2:], stats):
      mean, se = map(float, re.fullmatch(r"(\S+) ± (\S+)", cell).groups())
      assert mean == pytest.approx(s["mean"], abs=6e-4)
      assert se == pytest.approx(s["se"], abs=6e-4)


def test_evaluate_stage_reuses_or_recomputes_the_same_numbers(evaluated):
  config, workdir, metrics = evaluated
  cache = os.path.join(workdir, evaluate_lib.CACHE_DIR)
  stamps = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
  assert sorted(stamps) == ["latent_sft.json", "rl_latent_grpo.json", "sft.json"]
  assert pipeline.run(config, workdir) == metrics  # reused
  assert stamps == {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
  # Recomputed from scratch (same prompts, same sampling keys): the same numbers.
  before = _json(os.path.join(workdir, "eval_results.json"))["rows"]
  for f in ("sft.json", "rl_latent_grpo.json"):
    os.remove(os.path.join(cache, f))
  assert pipeline.run(config, workdir) == metrics
  after = _json(os.path.join(workdir, "eval_results.json"))["rows"]
  assert after == before
  # Other settings are not served from the cache.
  fewer = config.copy_and_resolve_references()
  fewer.evaluate.update(dict(examples=2, policies="sft"))
  few = pipeline.run(fewer, workdir)
  assert set(few) == {f"eval/sft/{c}" for c in COLUMNS + ["average"]}
  rows = _json(os.path.join(workdir, "eval_results.json"))["rows"]
  assert [len(v) for v in rows["sft"]["per_prompt"].values()] == [2] * 4


def test_find_policies_names_what_is_not_a_policy(evaluated):
  _, workdir, _ = evaluated
  assert evaluate_lib.find_policies(workdir) == ["sft", "latent_sft", "rl_latent_grpo"]
  with pytest.raises(ValueError, match="rl_token_dapo"):
    evaluate_lib.find_policies(workdir, "sft,rl_token_dapo")


def test_rl_rows_decode_with_the_runs_final_params(evaluated):
  config, workdir, _ = evaluated
  runner = evaluate_lib._runner(config, workdir, "latent")
  params, _ = evaluate_lib._variables(runner, workdir, "rl_latent_grpo")
  start, _ = evaluate_lib._variables(runner, workdir, "latent_sft")
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(start["policy"]), jax.tree.leaves(params["policy"]))]
  assert any(changed)  # RL trained the policy: its row is not the latent SFT model again
  for a, b in zip(jax.tree.leaves(start["world_model"]), jax.tree.leaves(params["world_model"])):
    assert np.array_equal(a, b)
