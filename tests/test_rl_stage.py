"""The `rl` stage on the smoke world: metrics, outputs, frozen modules and resume."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from latent_mca.jobs import pipeline
from latent_mca.judge import diversity
from latent_mca.stages import rl as rl_stage
from latent_mca.training import checkpoint, metrics as metrics_lib
from tests.test_backbone_stages import _DiesAt, _host, _Killed, _workdir_with_data

HEALTH = ("reward_mean", "reward_std", "kl", "clip_fraction", "entropy", "logp_mismatch",
          "response_length", "loss", "grad_norm")


def _config(smoke_config, **rl):
  """The smoke config's rl stage, one run (latent GRPO) unless `rl` says otherwise."""
  config = smoke_config.copy_and_resolve_references()
  config.stages = "rl"
  config.rl.update({"algorithm": "grpo", "action_space": "latent", **rl})
  return config


def _json(path):
  with open(path) as f:
    return json.load(f)


def _final(workdir, name):
  return _host(checkpoint.load_final(os.path.join(workdir, name), {"params": None})["params"])


@pytest.mark.parametrize("space", ["latent", "token"])
def test_rl_stage_writes_its_health_metrics_and_keeps_frozen_modules(smoke, space):
  config, workdir, _, _ = smoke
  config = _config(config, action_space=space)
  metrics = pipeline.run(config, workdir)
  name = f"rl_{space}_grpo"
  assert metrics[f"{name}/step"] == config.rl.num_steps
  for key in HEALTH + ("eval/reward", "eval/diversity", "eval_initial/diversity"):
    assert f"{name}/{key}" in metrics, key
  # Diversity is 1 / mean pairwise cosine: at least 1 (at most 1 / MIN_COSINE).
  assert 1.0 <= metrics[f"{name}/eval/diversity"] <= 1 / diversity.MIN_COSINE
  for file in ("metrics.jsonl", "curves.png", "eval_initial.json"):
    assert os.path.isfile(os.path.join(workdir, name, file))
  records = metrics_lib.read_metrics(os.path.join(workdir, name, "metrics.jsonl"))
  # Step 0 is the starting point's evaluation, then one record per step.
  assert [r["step"] for r in records] == list(range(config.rl.num_steps + 1))
  initial = _json(os.path.join(workdir, name, "eval_initial.json"))
  assert len(initial["per_prompt"]) == config.rl.eval_prompts
  assert initial["reward"] == pytest.approx(np.mean(initial["per_prompt"]))
  assert records[0] == {"step": 0, **{f"eval/{k}": v for k, v in initial.items()
                                      if not k.endswith("per_prompt")}}
  # The diversity is the mean of its prompts' groups' diversities.
  assert len(initial["diversity_per_prompt"]) == config.rl.eval_prompts
  assert initial["diversity"] == pytest.approx(np.mean(initial["diversity_per_prompt"]))
  records = records[1:]
  # Sampler and learner agree on the first, on-policy step.
  assert records[0]["logp_mismatch"] < 1e-4
  after = _final(workdir, name)
  start = "latent_sft" if space == "latent" else "sft"
  before = _host(checkpoint.load_final(os.path.join(workdir, start), {"params": None})["params"])
  if space == "latent":
    for module in ("world_model", "codebook", "inverse_dynamics", "backbone"):
      for a, b in zip(jax.tree.leaves(before[module]), jax.tree.leaves(after[module])):
        assert a.tobytes() == b.tobytes(), module
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before["policy"]), jax.tree.leaves(after["policy"])))
  else:
    layers_before = before["decoder"]["layers"]
    layers_after = after["backbone"]["decoder"]["layers"]
    for a, b in zip(jax.tree.leaves(layers_before), jax.tree.leaves(layers_after)):
      assert np.array_equal(a[0], b[0])  # token_top_layers=1 of 2: the bottom layer is frozen
    assert any(not np.array_equal(a[1], b[1]) for a, b in
               zip(jax.tree.leaves(layers_before), jax.tree.leaves(layers_after)))
    visual_after = after["backbone"]["visual"]
    for a, b in zip(jax.tree.leaves(before["visual"]), jax.tree.leaves(visual_after)):
      assert a.tobytes() == b.tobytes()


def test_killed_dapo_run_resumes_to_the_uninterrupted_params(smoke, tmp_path, monkeypatch):
  config, workdir, _, _ = smoke
  config = _config(config, algorithm="dapo")  # dynamic sampling and overlong shaping too
  metrics = pipeline.run(config, workdir)
  assert 0.0 <= metrics["rl_latent_dapo/groups_dropped"] <= 1.0
  resumed = _workdir_with_data(workdir, tmp_path)
  os.symlink(os.path.join(workdir, "latent_sft"), os.path.join(resumed, "latent_sft"))
  make_loader = rl_stage.DataLoader
  monkeypatch.setattr(rl_stage, "DataLoader",
                      lambda *a, **k: _DiesAt(make_loader(*a, **k), at=4))
  with pytest.raises(_Killed):  # after steps 1-3; the last checkpoint is 2
    pipeline.run(config, resumed)
  monkeypatch.setattr(rl_stage, "DataLoader", make_loader)
  pipeline.run(config, resumed)
  straight, again = _final(workdir, "rl_latent_dapo"), _final(resumed, "rl_latent_dapo")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(straight)[0],
                          jax.tree.leaves(again)):
    assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
  assert (metrics_lib.read_metrics(os.path.join(resumed, "rl_latent_dapo", "metrics.jsonl")) ==
          metrics_lib.read_metrics(os.path.join(workdir, "rl_latent_dapo", "metrics.jsonl")))


def test_prompts_longer_than_the_prompt_length_are_left_out(smoke):
  config, workdir, _, _ = smoke
  processor = rl_stage.Processor(rl_stage.data_lib.load_tokenizer(config, workdir))
  every = rl_stage.prompt_items(_config(config, prompt_length=1 << 20), workdir, processor)
  lengths = sorted(len(every[i][2]["input_ids"]) for i in range(len(every)))
  cut = lengths[len(lengths) // 2]
  kept = rl_stage.prompt_items(_config(config, prompt_length=cut), workdir, processor)
  assert len(kept) == sum(n <= cut for n in lengths) < len(every)
  assert all(len(kept[i][2]["input_ids"]) <= cut for i in range(len(kept)))
  with pytest.raises(ValueError, match="no rl prompt fits rl.prompt_length=3"):
    rl_stage.prompt_items(_config(config, prompt_length=3), workdir, processor)


def test_an_llm_judge_without_an_endpoint_is_named_before_any_work(smoke, tmp_path):
  config, workdir, _, _ = smoke
  config = _config(config)
  config.rl.judge.kind = "llm"
  with pytest.raises(ValueError, match="rl.judge.base_url"):
    rl_stage.run(config, str(tmp_path))  # no checkpoint there either: the judge is named first


def test_rl_stage_runs_every_listed_algorithm_and_space_and_tabulates_them(smoke):
  config, workdir, _, _ = smoke
  # Both runs also run in the health-metrics test above; whichever comes first trains.
  metrics = pipeline.run(_config(config, action_space="latent,token"), workdir)
  for name in ("rl_latent_grpo", "rl_token_grpo"):
    assert metrics[f"{name}/step"] == config.rl.num_steps
  summary = _json(os.path.join(workdir, "rl_summary.json"))
  for name in ("rl_latent_grpo", "rl_token_grpo"):
    records = metrics_lib.read_metrics(os.path.join(workdir, name, "metrics.jsonl"))
    evals = [r["eval/reward"] for r in records if "eval/reward" in r]
    assert summary[name]["start"] == evals[0] and summary[name]["end"] == evals[-1]
    assert summary[name]["best"] == max(evals)
    # The change and its standard error over the paired per-prompt rewards, by hand.
    change = (np.array(_json(os.path.join(workdir, name, "eval_final.json"))["per_prompt"]) -
              np.array(_json(os.path.join(workdir, name, "eval_initial.json"))["per_prompt"]))
    assert summary[name]["change"] == pytest.approx(evals[-1] - evals[0], abs=1e-6)
    assert summary[name]["change_se"] == pytest.approx(
        np.sqrt(np.sum((change - change.mean())**2) / (len(change) - 1) / len(change)))
  with open(os.path.join(workdir, "rl_summary.md")) as f:
    table = f.read()
  assert "| rl_latent_grpo |" in table and "| rl_token_grpo |" in table
  assert os.path.getsize(os.path.join(workdir, "rl_rewards.png")) > 0


@pytest.mark.parametrize("space", ["latent", "token"])
def test_dapos_oversampled_pool_samples_with_the_other_algorithms_program(smoke, space):
  """DAPO's pool of dapo_oversample x prompts_per_step prompts goes through the rollout
  program of prompts_per_step prompts, chunk by chunk: it compiles nothing more."""
  config, workdir, _, _ = smoke
  runner = rl_stage.RLRunner(_config(config, algorithm="dapo", action_space=space), workdir)
  assert runner.pool == config.rl.prompts_per_step * config.rl.dapo_oversample > 1
  source = rl_stage.prompt_items(config, workdir, runner.processor)
  items = [source[i] for i in range(runner.pool)]
  key = jax.random.key(0)
  runner.sample(runner.params, items[:config.rl.prompts_per_step], key)
  compiled = runner.rollout.jitted._cache_size()
  out, texts, raw = runner.sample(runner.params, items, key)
  assert runner.rollout.jitted._cache_size() == compiled
  rows = runner.pool * config.rl.group_size
  assert out.tokens.shape[0] == len(texts) == len(raw) == rows


def test_an_unknown_algorithm_in_the_list_stops_the_stage_before_any_run(smoke, tmp_path):
  config, _, _, _ = smoke
  with pytest.raises(ValueError, match="unknown RL algorithm 'ppo'"):
    rl_stage.run_all(_config(config, algorithm="grpo,ppo"), str(tmp_path))
  assert not os.listdir(tmp_path)
