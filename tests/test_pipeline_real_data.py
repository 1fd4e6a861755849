"""The pipeline on the real benchmarks: config.data.mmrole_dir / pcogalign_dir point prepare_data
at tiny MMRole and PCogAlignBench copies, and the stages' readers see those examples."""

from __future__ import annotations

import os

import numpy as np
import pytest

from experiments import run
from latent_mca import tasks
from latent_mca.config_schema import ConfigError
from latent_mca.data import real
from latent_mca.data.image_processing import fitted_size, smart_resize
from latent_mca.data.processor import Processor
from latent_mca.jobs import pipeline
from latent_mca.stages import data as data_lib
from latent_mca.stages import rl
from tests.real_data_fixtures import (mmrole_root, pcog_root,  # noqa: F401 (pytest fixtures)
                                      human, pcog_instance, says, write_json)
from tests.test_reference_configs import _CHECKPOINT, _CONFIGS, _load

# Enough in-distribution dialogues and training instances that every hashed split gets some.
EXTRA_DIALOGUES = 24
TRAIN_INSTANCES = 12


@pytest.fixture
def benchmarks(mmrole_root, pcog_root):  # noqa: F811 (the imported fixtures)
  """(MMRole root, PCogAlignBench root), filled up so that every split has examples: more
  in-distribution dialogues, reference replies in HCMAS-train and the HCSHR golden test."""
  write_json(mmrole_root / "dialogues" / "in-distribution" / "comment" / "Albus_Dumbledore_COCO.json",
             [{"id": f"Albus_Dumbledore_comment_COCO_{i}",
               "image": f"COCO/train2017/00000000000{1 + i % 2}.jpg",
               "conversations": [human(f"What is thing {i}?"),
                                 says("Albus Dumbledore", f"Thing {i} is a lemon drop.")]}
              for i in range(EXTRA_DIALOGUES)])
  bench = pcog_root / "version_v4"
  child = {"Home": "Child", "School": "Student"}
  write_json(bench / "HCMAS-train.json", [
      pcog_instance(f"Question {i}?", child, "images/Home/a.png", golden_response=f"Reply {i}.")
      for i in range(TRAIN_INSTANCES)] + [pcog_instance("No reply?", child, "images/Home/b.png")])
  write_json(bench / "HCSHR-golden-test.json", [
      pcog_instance("Late?", {"Home": "Grandma", "Airport": "Passenger"}, "images/Home/a.png",
                    golden_response="Take a taxi, calmly.")])
  return mmrole_root, pcog_root


def _config(mmrole="", pcogalign=""):
  config = pipeline.smoke_config()
  config.stages = "prepare_data"
  config.data.update(dict(mmrole_dir=str(mmrole), pcogalign_dir=str(pcogalign)))
  return config


def _split(examples, split):
  return sorted(e["id"] for e in examples if split == e["split"])


def _expected(mmrole, pcogalign):
  """{task: {split: sorted ids}} from the readers and the documented split rules."""
  roleplay = ([dict(e, split=tasks.split_of(e)) for e in real.read_mmrole(mmrole, "in_distribution")]
              + [dict(e, split="test_out") for e in real.read_mmrole(mmrole, "out_of_distribution")])
  personalised = (
      [dict(e, split=tasks.training_split_of(e))
       for e in real.read_pcogalign(pcogalign, "hcmas_train") if e["reference_reply"]]
      + [dict(e, split="test_in") for e in real.read_pcogalign(pcogalign, "hcmas_golden_test")]
      + [dict(e, split="test_out") for e in real.read_pcogalign(pcogalign, "hcshr_golden_test")])
  return {"roleplay": {s: _split(roleplay, s) for s in tasks.SPLITS},
          "personalised": {s: _split(personalised, s) for s in tasks.SPLITS}}, {
              e["id"]: e for e in roleplay + personalised}


def test_prepare_data_reads_the_benchmarks(benchmarks, tmp_path):
  mmrole, pcogalign = benchmarks
  config, workdir = _config(mmrole, pcogalign), str(tmp_path / "work")
  metrics = pipeline.run(config, workdir)
  expected, by_id = _expected(mmrole, pcogalign)
  for task, splits in expected.items():
    assert all(splits.values()), splits  # the fake folders fill every split
    for split, ids in splits.items():
      assert metrics[f"examples/{task}/{split}"] == len(ids), (task, split)
  assert expected["personalised"]["test_in"] == ["hcmas_golden_test/0"]
  assert "hcmas_train/12" not in by_id  # no reference reply: dropped
  assert metrics["examples/paired/train"] == 40  # pretraining data stays synthetic

  names = [f"{task}/{split}" for task in expected for split in tasks.SPLITS]
  sources = data_lib.load_sources(config, workdir, names)
  for name in names:
    task, split = name.split("/")
    stored = [data_lib.decode_example(sources[name][i]) for i in range(len(sources[name]))]
    assert sorted(e["id"] for e in stored) == expected[task][split], name
    for example in stored:
      source = by_id[example["id"]]
      if task == "roleplay":
        assert example["dialogue"] == source["dialogue"]
        assert example["character"] == source["character"]
      else:
        assert (example["query"], example["reference_reply"], example["role_set"]) == (
            source["query"], source["reference_reply"], source["role_set"])
      root = mmrole if task == "roleplay" else pcogalign
      assert os.path.join(root, example["image_path"]) == source["image_path"]
      # The fixtures' images are tiny: stored at the smoke budget's 56 x 56.
      assert example["image"].shape == (56, 56, 3)

  # What sft / latent_sft read: the sft splits mixed, test_in to evaluate on.
  data = data_lib.sft_data(config, workdir)
  assert len(data.train) == sum(len(expected[t]["sft"]) for t in expected)
  assert {name: len(source) for name, source in data.eval.items()} == {
      t: len(expected[t]["test_in"]) for t in expected}
  batches = {task: data_lib.eval_batches(data, task) for task in expected}  # images fit
  batch = batches["personalised"][0]
  text = data.processor.tokenizer.decode(batch["input_ids"][0][batch["loss_mask"][0] == 1])
  assert "Stay calm, go outside." in text  # the golden reply is what SFT learns
  # What rl samples prompts from: the rl splits of both tasks.
  items = rl.prompt_items(config, workdir, Processor(data_lib.load_tokenizer(config, workdir)))
  assert sorted(example["id"] for _, example, _ in (items[i] for i in range(len(items)))) == sorted(
      expected["roleplay"]["rl"] + expected["personalised"]["rl"])

  before = {f: os.stat(os.path.join(workdir, "data", f)).st_mtime_ns
            for f in os.listdir(os.path.join(workdir, "data"))}
  assert pipeline.run(config, workdir) == metrics  # a second run reuses what was built
  assert before == {f: os.stat(os.path.join(workdir, "data", f)).st_mtime_ns
                    for f in os.listdir(os.path.join(workdir, "data"))}


def test_one_benchmark_keeps_the_other_task_synthetic(benchmarks, tmp_path):
  mmrole, _ = benchmarks
  real_builders = data_lib.datasets(_config(mmrole=mmrole), str(tmp_path))
  synthetic_builders = data_lib.datasets(_config(), str(tmp_path))
  assert real_builders["roleplay"].name == "mmrole_task"
  assert synthetic_builders["roleplay"].name == "synthetic_roleplay"
  for name in ("paired", "text_only", "personalised"):
    assert real_builders[name].builder_config.name == synthetic_builders[name].builder_config.name


def test_missing_folders_and_files_fail_early_naming_the_field(benchmarks, tmp_path):
  mmrole, pcogalign = benchmarks
  workdir = str(tmp_path / "work")
  with pytest.raises(ConfigError, match=r"config\.data\.mmrole_dir: .*nowhere: missing folder"):
    pipeline.run(_config(mmrole=tmp_path / "nowhere"), workdir)
  os.remove(mmrole / "dialogues" / "out-of-distribution" / "human-role.json")
  with pytest.raises(ConfigError, match=r"config\.data\.mmrole_dir: .*out-of-distribution/"
                                        r"human-role\.json: file not found"):
    pipeline.run(_config(mmrole=mmrole), workdir)
  os.remove(pcogalign / "version_v4" / "HCSHR-golden-test.json")
  with pytest.raises(ConfigError, match=r"config\.data\.pcogalign_dir: .*HCSHR-golden-test\.json: "
                                        "file not found"):
    pipeline.run(_config(pcogalign=pcogalign), workdir)
  assert not os.path.exists(workdir)  # nothing was built


def test_training_file_without_replies_names_the_field_and_file(pcog_root, tmp_path):  # noqa: F811
  # The published HCMAS-train.json has no reference replies: sft has nothing to learn.
  write_json(pcog_root / "version_v4" / "HCSHR-golden-test.json", [
      pcog_instance("Late?", {"Home": "Grandma"}, "images/Home/a.png", golden_response="Go.")])
  with pytest.raises(real.DataError, match=r"config\.data\.pcogalign_dir: .*no usable example for "
                                           r"split '(sft|rl)' \(HCMAS-train\.json"):
    pipeline.run(_config(pcogalign=pcog_root), str(tmp_path / "work"))


def test_rl_refuses_the_programmatic_judge_on_real_data(benchmarks, tmp_path):
  config = _config(mmrole=benchmarks[0])
  with pytest.raises(ConfigError, match=r"config\.rl\.judge\.kind: .*config\.data\.mmrole_dir"):
    rl.run_all(config, str(tmp_path))


def test_images_fit_the_stages_budget():
  assert fitted_size(480, 640, 224) == (168, 252)  # 4:3 within 224 x 224's 64 tokens
  assert smart_resize(168, 252) == (168, 252)  # which the processor keeps
  assert fitted_size(6, 9, 56) == (56, 56)  # it would enlarge 28 x 28 again: the square
  assert fitted_size(1000, 10, 224) == (560, 28)  # elongated, still within the area
  assert fitted_size(28, 5000, 224) == (224, 224)  # too elongated to fit at all


@pytest.mark.parametrize("path", _CONFIGS)
def test_reference_configs_take_the_flags(path):
  _, config = run.resolve_config(_load(f"{path}:{_CHECKPOINT}", "--config.data.mmrole_dir=/m",
                                       "--config.data.pcogalign_dir=/p"))
  assert (config.data.mmrole_dir, config.data.pcogalign_dir) == ("/m", "/p")
  _, default = run.resolve_config(_load(f"{path}:{_CHECKPOINT}"))
  assert (default.data.mmrole_dir, default.data.pcogalign_dir) == ("", "")
