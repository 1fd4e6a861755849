"""Readers and tfds builders for the reference benchmarks, on tiny copies in their published layouts."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from latent_mca.data import real
from latent_mca.data import tfds_builders
from latent_mca.data.image_processing import load_image
from tests.real_data_fixtures import (mmrole_root, pcog_root,  # noqa: F401 (pytest fixtures)
                                      profile, write_json)


def _by_id(examples):
  return {e["id"]: e for e in examples}


def test_read_mmrole_in_distribution(mmrole_root, caplog):
  with caplog.at_level(logging.INFO, logger=real.__name__):
    examples = _by_id(real.read_mmrole(mmrole_root, "in_distribution"))
  assert sorted(examples) == [
      "Albus_Dumbledore_role-role-dialogue_COCO_0", "Harry_Potter_comment_COCO_0",
      "Harry_Potter_comment_script_0", "Harry_Potter_human-role-dialogue_COCO_0"]
  # The unanswered question is dropped, and said so.
  assert any("Harry_Potter_COCO.json: dropped 1 dialogue" in r.getMessage() for r in caplog.records)

  comment = examples["Harry_Potter_comment_COCO_0"]
  assert comment["character"] == {"name": "Harry Potter", **profile("Harry_Potter")}
  assert comment["image_path"] == str(mmrole_root / "images" / "COCO/train2017/000000000001.jpg")
  assert comment["dialogue"] == [
      {"role": "user", "speaker": "human", "text": "What do you feel?"},
      {"role": "assistant", "speaker": "Harry Potter", "text": "Adventure!"}]
  assert (comment["distribution"], comment["dialogue_type"]) == ("in", "comment")
  assert comment["scene"] == {"role_info": "", "place_info": "", "scene_info": ""}

  script = examples["Harry_Potter_comment_script_0"]
  assert script["scene"] == {"role_info": "Harry Potter and his mother.",
                             "place_info": "Harry Potter's home", "scene_info": "They are attacked."}

  human_role = examples["Harry_Potter_human-role-dialogue_COCO_0"]
  assert [t["role"] for t in human_role["dialogue"]] == ["user", "assistant"] * 2
  assert human_role["dialogue"][3]["text"] == "Just a tie."

  # Another character's turns are the user's; the file's character is the assistant.
  inter = examples["Albus_Dumbledore_role-role-dialogue_COCO_0"]
  assert inter["character"]["name"] == "Albus Dumbledore"
  assert inter["character"]["catchphrase"] == "Albus_Dumbledore catchphrase"
  assert inter["dialogue_type"] == "inter-role"
  assert [(t["role"], t["speaker"]) for t in inter["dialogue"]] == [
      ("user", "Harry Potter"), ("assistant", "Albus Dumbledore")]


def test_read_mmrole_out_of_distribution(mmrole_root):
  examples = _by_id(real.read_mmrole(mmrole_root, "out_of_distribution"))
  assert sorted(examples) == ["Sheldon_Cooper_comment_COCO", "Sheldon_Cooper_comment_script",
                              "Sheldon_Cooper_human-role-dialogue_COCO_0"]
  script = examples["Sheldon_Cooper_comment_script"]
  assert script["character"] == {"name": "Sheldon Cooper", **profile("Sheldon_Cooper")}
  assert script["distribution"] == "out"
  assert script["scene"]["place_info"] == "Apartment"
  assert script["image_path"].endswith(os.path.join("images", "The_Big_Bang_Theory", "01.jpg"))
  assert examples["Sheldon_Cooper_human-role-dialogue_COCO_0"]["dialogue"][1] == {
      "role": "assistant", "speaker": "Sheldon Cooper", "text": "That's my spot."}


def test_read_pcogalign(pcog_root):
  # The root may be the PCogAlignBench folder or its version_v4 subfolder.
  assert list(real.read_pcogalign(pcog_root, "hcmas_test")) == list(
      real.read_pcogalign(pcog_root / "version_v4", "hcmas_test"))
  train = list(real.read_pcogalign(pcog_root, "hcmas_train"))
  assert [e["id"] for e in train] == ["hcmas_train/0", "hcmas_train/1"]
  first = train[0]
  assert first == {
      "id": "hcmas_train/0", "subset": "HCMAS", "individual": "Ind-1",
      "role_set": [{"location": "Home", "role": "Child"}, {"location": "School", "role": "Student"}],
      "situation": {"location": "Home", "image_description": "scene of Help, fire!",
                    "eval_help": "- **calm** down"},
      "image_path": str(pcog_root / "version_v4" / "images" / "Home" / "a.png"),
      "query": "Help, fire!", "reference_reply": ""}
  (bare,) = real.read_pcogalign(pcog_root, "hcshr_train")
  assert (bare["subset"], bare["individual"], bare["situation"]["location"]) == ("HCSHR", "", "")
  (golden,) = real.read_pcogalign(pcog_root, "hcmas_golden_test")
  assert golden["reference_reply"] == "Stay calm, go outside."
  assert golden["query"] == "Where now?"


def test_missing_folders_are_named(tmp_path, mmrole_root):
  with pytest.raises(real.DataError, match="nowhere.*missing folder"):
    real.read_mmrole(tmp_path / "nowhere", "in_distribution")
  with pytest.raises(real.DataError, match="nowhere.*missing folder"):
    real.read_pcogalign(tmp_path / "nowhere", "hcmas_test")
  os.rename(mmrole_root / "profiles" / "out-of-distribution", tmp_path / "moved")
  with pytest.raises(real.DataError, match="out-of-distribution.*detailed_profiles.*missing folder"):
    real.read_mmrole(mmrole_root, "out_of_distribution")
  os.rename(mmrole_root / "dialogues" / "in-distribution" / "inter-role", tmp_path / "moved2")
  with pytest.raises(real.DataError, match="inter-role: missing folder"):
    list(real.read_mmrole(mmrole_root, "in_distribution"))
  with pytest.raises(ValueError, match="unknown MMRole split"):
    real.read_mmrole(mmrole_root, "train")


def test_malformed_json_names_the_file(mmrole_root, pcog_root):
  bad = mmrole_root / "dialogues" / "in-distribution" / "human-role" / "Harry_Potter_COCO.json"
  bad.write_text('[{"id": "x", ', encoding="utf-8")
  with pytest.raises(real.DataError, match=f"{bad}: malformed JSON"):
    list(real.read_mmrole(mmrole_root, "in_distribution"))
  bad_pcog = pcog_root / "version_v4" / "HCSHR-test.json"
  bad_pcog.write_text("{oops", encoding="utf-8")
  with pytest.raises(real.DataError, match=f"{bad_pcog}: malformed JSON"):
    real.read_pcogalign(pcog_root, "hcshr_test")
  with pytest.raises(real.DataError, match="HCSHR-golden-test.json: file not found"):
    real.read_pcogalign(pcog_root, "hcshr_golden_test")


def test_wrong_shapes_name_the_file(mmrole_root, pcog_root):
  profile = mmrole_root / "profiles" / "in-distribution" / "detailed_profiles" / "Albus_Dumbledore.json"
  write_json(profile, {"introduction": "only this"})
  with pytest.raises(real.DataError, match=f"{profile}: field 'personality' must be a string"):
    list(real.read_mmrole(mmrole_root, "in_distribution"))
  path = pcog_root / "version_v4" / "HCMAS-test.json"
  write_json(path, [{"individual_RoleSet": ["Child"], "query": "q", "image": {"file_path": "a"}}])
  with pytest.raises(real.DataError, match=f"{path}: instance 0: 'individual_RoleSet' must be"):
    list(real.read_pcogalign(pcog_root, "hcmas_test"))


def test_missing_image_names_the_file(mmrole_root, pcog_root):
  missing = mmrole_root / "images" / "Harry_Potter" / "01.jpg"
  os.remove(missing)
  with pytest.raises(real.DataError) as info:
    list(real.read_mmrole(mmrole_root, "in_distribution"))
  message = str(info.value)
  assert "Harry_Potter_script.json" in message and "Harry_Potter_comment_script_0" in message
  assert f"image {missing} does not exist" in message
  os.remove(pcog_root / "version_v4" / "images" / "Home" / "b.png")
  with pytest.raises(real.DataError,
                     match=r"HCMAS-test.json: instance 0: image .*b\.png does not exist"):
    list(real.read_pcogalign(pcog_root, "hcmas_test"))


def test_skip_bad_logs_and_skips(mmrole_root, pcog_root, caplog):
  bad = mmrole_root / "dialogues" / "in-distribution" / "human-role" / "Harry_Potter_COCO.json"
  bad.write_text("not json", encoding="utf-8")
  os.remove(mmrole_root / "images" / "Harry_Potter" / "01.jpg")
  with caplog.at_level(logging.WARNING, logger=real.__name__):
    ids = [e["id"] for e in real.read_mmrole(mmrole_root, "in_distribution", skip_bad=True)]
  assert sorted(ids) == ["Albus_Dumbledore_role-role-dialogue_COCO_0", "Harry_Potter_comment_COCO_0"]
  skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(skipped) == 2
  assert any(str(bad) in m and "malformed JSON" in m for m in skipped)
  assert any("Harry_Potter_comment_script_0" in m and "does not exist" in m for m in skipped)

  os.remove(pcog_root / "version_v4" / "images" / "Home" / "a.png")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=real.__name__):
    ids = [e["id"] for e in real.read_pcogalign(pcog_root, "hcmas_train", skip_bad=True)]
  assert ids == ["hcmas_train/1"]
  assert ["a.png does not exist" in r.getMessage() for r in caplog.records] == [True]
  # A split with nothing left is still an error.
  with pytest.raises(real.DataError, match="no usable instances"):
    list(real.read_pcogalign(pcog_root, "hcshr_test", skip_bad=True))


def _decoded(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def test_mmrole_builder_prepares_once(mmrole_root, tmp_path, monkeypatch):
  calls = []
  read = real.read_mmrole
  monkeypatch.setattr(real, "read_mmrole", lambda *a, **k: calls.append(a[1]) or read(*a, **k))
  data_dir = tmp_path / "tfds"
  config = tfds.download.DownloadConfig(manual_dir=str(mmrole_root))
  builder = tfds_builders.MMRole(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=config)
  assert sorted(calls) == ["in_distribution", "out_of_distribution"]

  sources = builder.as_data_source()
  assert {split: len(source) for split, source in sources.items()} == {
      "in_distribution": 4, "out_of_distribution": 3}
  stored = _by_id(sources["in_distribution"][i] for i in range(4))
  stored = {_decoded(k): v for k, v in stored.items()}
  expected = _by_id(read(mmrole_root, "in_distribution"))
  for example_id, example in expected.items():
    got = stored[example_id]
    # JPEG kept as is, PNG kept as is, RGBA converted as the model pipeline converts it.
    np.testing.assert_array_equal(got["image"], np.asarray(load_image(example["image_path"])))
    assert _decoded(got["image_path"]) == os.path.relpath(example["image_path"], mmrole_root)
    assert {k: _decoded(v) for k, v in got["character"].items()} == example["character"]
    assert [_decoded(t) for t in got["dialogue"]["text"]] == [t["text"] for t in example["dialogue"]]
    assert [_decoded(t) for t in got["dialogue"]["role"]] == [t["role"] for t in example["dialogue"]]
    assert _decoded(got["scene"]["place_info"]) == example["scene"]["place_info"]

  record_files = sorted(p for p in data_dir.rglob("*array_record*"))
  assert len(record_files) == 2
  stamps = [p.stat().st_mtime_ns for p in record_files]
  again = tfds_builders.MMRole(data_dir=str(data_dir))
  again.download_and_prepare(download_config=config)
  assert len(calls) == 2  # nothing was read again
  assert [p.stat().st_mtime_ns for p in record_files] == stamps
  assert len(again.as_data_source()["out_of_distribution"]) == 3
  assert "tensorflow" not in sys.modules


def test_pcogalign_builder(pcog_root, tmp_path):
  builder = tfds_builders.PCogAlignBench(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(pcog_root)))
  sources = builder.as_data_source()
  # The optional golden split is built because its file is there; the other one is not.
  assert {split: len(source) for split, source in sources.items()} == {
      "hcmas_train": 2, "hcmas_test": 1, "hcshr_train": 1, "hcshr_test": 1, "hcmas_golden_test": 1}
  golden = sources["hcmas_golden_test"][0]
  assert _decoded(golden["reference_reply"]) == "Stay calm, go outside."
  assert [_decoded(r) for r in golden["role_set"]["role"]] == ["Child", "Student"]
  assert _decoded(golden["situation"]["image_description"]) == "scene of Where now?"
  image = pcog_root / "version_v4" / "images" / "Home" / "b.png"
  np.testing.assert_array_equal(golden["image"], np.asarray(PIL.Image.open(image)))
  assert _decoded(golden["image_path"]) == os.path.join("version_v4", "images", "Home", "b.png")


def test_builder_reports_a_corrupt_image(pcog_root, tmp_path):
  broken = pcog_root / "version_v4" / "images" / "Home" / "a.png"
  broken.write_bytes(broken.read_bytes()[:40])
  builder = tfds_builders.PCogAlignBench(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(real.DataError, match=f"{broken}: cannot decode image"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(pcog_root)))


class ToyCounts(tfds_builders.ExamplesBuilder):
  """Counting examples, in order, with a small image each."""

  SPLITS = ("train", "test")
  KEEP_ORDER = True

  def features(self):
    return {"n": tfds.features.Scalar(np.int64), "word": tfds.features.Text(),
            "image": tfds.features.Image(encoding_format="png")}

  def examples(self, split):
    for n in range({"train": 5, "test": 2}[split]):
      # A PIL image: tfds would need TensorFlow to encode a bare array.
      image = PIL.Image.fromarray(np.full((2, 3, 3), n, np.uint8))
      yield {"n": n, "word": f"{split}-{n}", "image": image}


def test_examples_builder(tmp_path):
  builder = ToyCounts(data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.file_format.value == "array_record"
  train = builder.as_data_source()["train"]
  assert [int(train[i]["n"]) for i in range(len(train))] == [0, 1, 2, 3, 4]
  assert _decoded(train[3]["word"]) == "train-3"
  np.testing.assert_array_equal(train[3]["image"], np.full((2, 3, 3), 3, np.uint8))
  assert len(builder.as_data_source()["test"]) == 2
  assert "tensorflow" not in sys.modules
