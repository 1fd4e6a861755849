"""The pipeline's prepare_data stage: datasets and tokenizer, built once and reused."""

from __future__ import annotations

import os

import pytest

import numpy as np

from latent_mca import tasks, world
from latent_mca.config_schema import ConfigError
from latent_mca.data.tokenizers import QWEN2_5_VL_TOKEN_IDS
from latent_mca.jobs import pipeline
from latent_mca.stages import data as data_lib


def _config(**data):
  config = pipeline.default_config()
  config.data.update(dict(paired_train=40, paired_test=8, text_train=40, text_test=8,
                          dialogue_in=40, dialogue_out=8, **data))
  config.tokenizer.vocab_size = 300
  return config


def _mtimes(folder):
  return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
          for root, _, files in os.walk(folder) for f in files}


def test_prepare_data_builds_then_reuses(tmp_path):
  workdir = str(tmp_path)
  metrics = pipeline.run(_config(), workdir)
  assert metrics["examples/paired/train"] == 40 and metrics["examples/text_only/test"] == 8
  for task in ("roleplay", "personalised"):
    assert sum(metrics[f"examples/{task}/{s}"] for s in ("sft", "rl", "test_in")) == 40
    assert metrics[f"examples/{task}/test_out"] == 8 and metrics[f"examples/{task}/sft"] > 10
  assert metrics["tokenizer_size"] == 300 + len(QWEN2_5_VL_TOKEN_IDS)
  before = _mtimes(workdir)
  assert pipeline.run(_config(), workdir) == metrics
  after = _mtimes(workdir)
  changed = sorted(f for f in before if after[f] != before[f])
  # Only the run's records: the summary and the stage's wall time (its reload).
  assert changed == [os.path.join(workdir, f) for f in ("data_summary.json",
                                                          "stage_seconds.json")], changed


def test_prepared_examples_are_the_world_samples(tmp_path):
  workdir = str(tmp_path)
  pipeline.run(_config(), workdir)
  builders = data_lib.datasets(_config(), os.path.join(workdir, "data"))
  paired = builders["paired"].as_data_source()["test"]
  first = builders["paired"]._indices("test")[0]  # splits draw disjoint index ranges
  assert first not in builders["paired"]._indices("train")
  sample = world.paired_sample(0, first, world.PairedConfig(image_size=56))
  assert paired[0]["answer"].decode() == sample["answer"]
  assert paired[0]["image"].shape == (56, 56, 3)
  roleplay = builders["roleplay"].as_data_source()["test_out"][0]
  example = [e for e in tasks.roleplay_examples(0, 8, "out")
             if e["id"] == roleplay["id"].decode()][0]
  assert roleplay["character"]["name"].decode() == example["character"]["name"]
  np.testing.assert_array_equal(roleplay["image"], np.asarray(tasks.example_image(example, 56)))


def test_other_settings_build_elsewhere_and_unknown_stages_fail(tmp_path):
  workdir = str(tmp_path)
  pipeline.run(_config(), workdir)
  pipeline.run(_config(image_size=84), workdir)
  assert len(os.listdir(os.path.join(workdir, "data", "synthetic_paired"))) == 2
  config = _config()
  config.stages = "prepare_data,warmup_typo"
  with pytest.raises(ConfigError, match="warmup_typo"):
    pipeline.run(config, workdir)


def test_export_examples_writes_every_task(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "experiments.export_examples", "--out",
                         str(tmp_path), "--image_size", "56"], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  names = set(os.listdir(tmp_path))
  for stem in ("scene_0", "paired_qa", "paired_caption", "paired_character", "roleplay_in",
               "roleplay_out", "personalised_in", "personalised_out"):
    assert {stem + ".json", stem + ".png"} <= names, stem
  assert "text_only.json" in names
