"""Tiny copies of the reference benchmarks in their published layouts, as pytest fixtures.

Import the fixtures into a test module (`from tests.real_data_fixtures import mmrole_root,
pcog_root`) and they build their folders in the test's tmp_path.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest

PROFILE_FIELDS = ("introduction", "personality", "experience", "relationship", "catchphrase")


def write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False, indent=2)


def write_image(path, seed, mode="RGB", fmt="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, size=(6 + seed, 9, channels), dtype=np.uint8)
  PIL.Image.fromarray(pixels, mode).save(path, format=fmt)


def profile(name):
  return {field: f"{name} {field}" for field in PROFILE_FIELDS}


def human(text):
  return {"from": "human", "value": text}


def says(speaker, text):
  return {"role": speaker, "value": text}


@pytest.fixture
def mmrole_root(tmp_path):
  """Three characters (two in-distribution, one out) in the MMRole_dataset layout."""
  root = tmp_path / "MMRole_dataset"
  images = {"COCO/train2017/000000000001.jpg": ("RGB", "JPEG"),
            "COCO/train2017/000000000002.jpg": ("RGB", "PNG"),
            "Harry_Potter/01.jpg": ("RGBA", "PNG"),
            "The_Big_Bang_Theory/01.jpg": ("RGB", "PNG")}
  for seed, (name, (mode, fmt)) in enumerate(images.items()):
    write_image(root / "images" / name, seed, mode, fmt)
  for dist, names in (("in-distribution", ["Harry_Potter", "Albus_Dumbledore"]),
                      ("out-of-distribution", ["Sheldon_Cooper"])):
    for name in names:
      write_json(root / "profiles" / dist / "detailed_profiles" / f"{name}.json", profile(name))
    write_json(root / "profiles" / dist / "profiles.json",
                {n.replace("_", " "): "summary" for n in names})
  ind = root / "dialogues" / "in-distribution"
  write_json(ind / "comment" / "Harry_Potter_COCO.json", [
      {"id": "Harry_Potter_comment_COCO_0", "image": "COCO/train2017/000000000001.jpg",
       "conversations": [human("What do you feel?"), says("Harry Potter", "Adventure!")]},
      # The published files hold questions whose answer was filtered out.
      {"id": "Harry_Potter_comment_COCO_1", "image": "COCO/train2017/000000000002.jpg",
       "conversations": [human("And now?")]},
  ])
  write_json(ind / "comment" / "Harry_Potter_script.json", [
      {"id": "Harry_Potter_comment_script_0", "image": "Harry_Potter/01.jpg",
       "role_info": "Harry Potter and his mother.", "place_info": "Harry Potter's home",
       "scene_info": "They are attacked.",
       "conversations": [human("How does this make you feel?"), says("Harry Potter", "Scared.")]},
  ])
  write_json(ind / "human-role" / "Harry_Potter_COCO.json", [
      {"id": "Harry_Potter_human-role-dialogue_COCO_0", "image": "COCO/train2017/000000000002.jpg",
       "conversations": [says("human", "Look, Harry!"), says("Harry Potter", "Blimey."),
                         says("human", "A tie?"), says("Harry Potter", "Just a tie.")]},
  ])
  write_json(ind / "inter-role" / "Albus_Dumbledore_COCO.json", [
      {"id": "Albus_Dumbledore_role-role-dialogue_COCO_0", "image": "COCO/train2017/000000000001.jpg",
       "conversations": [says("Harry Potter", "It's a pizza, Professor."),
                         says("Albus Dumbledore", "Fascinating!")]},
  ])
  ood = root / "dialogues" / "out-of-distribution"
  write_json(ood / "comment.json", [
      {"id": "Sheldon_Cooper_comment_COCO", "image": "COCO/train2017/000000000002.jpg",
       "conversations": [human("Thoughts?"), says("Sheldon Cooper", "Bazinga!")]},
      {"id": "Sheldon_Cooper_comment_script", "image": "The_Big_Bang_Theory/01.jpg",
       "role_info": "Penny", "place_info": "Apartment", "scene_info": "",
       "conversations": [human("Feelings?"), says("Sheldon Cooper", "None.")]},
  ])
  write_json(ood / "human-role.json", [
      {"id": "Sheldon_Cooper_human-role-dialogue_COCO_0", "image": "COCO/train2017/000000000001.jpg",
       "conversations": [says("human", "Hi"), says("Sheldon Cooper", "That's my spot.")]},
  ])
  write_json(ood / "inter-role.json", [])
  return root


def pcog_instance(query, roles, image, **extra):
  return {"individual_RoleSet": roles, "query": query, "image": {"file_path": image},
          "eval_info": {"sub_set": "x", "individual": "Ind-1", "location": "Home",
                        "ImageDesc": f"scene of {query}", "EvalHelp": "- **calm** down"},
          **extra}


@pytest.fixture
def pcog_root(tmp_path):
  """A PCogAlignBench folder with its version_v4 files and images."""
  root = tmp_path / "PCogAlignBench"
  bench = root / "version_v4"
  for seed, name in enumerate(["a.png", "b.png"]):
    write_image(bench / "images" / "Home" / name, seed + 3)
  child = {"Home": "Child", "School": "Student"}
  grandma = {"Home": "Grandma", "Airport": "Passenger"}
  write_json(bench / "HCMAS-train.json", [pcog_instance("Help, fire!", child, "images/Home/a.png"),
                                           pcog_instance("Is it safe?", grandma, "images/Home/b.png")])
  write_json(bench / "HCMAS-test.json", [pcog_instance("Where now?", child, "images/Home/b.png")])
  write_json(bench / "HCSHR-train.json", [{"individual_RoleSet": grandma, "query": "No eval info",
                                            "image": {"file_path": "images/Home/a.png"}}])
  write_json(bench / "HCSHR-test.json", [pcog_instance("Late?", grandma, "images/Home/a.png")])
  write_json(bench / "HCMAS-golden-test.json", [
      pcog_instance("Where now?", child, "images/Home/b.png",
                     golden_response="Stay calm, go outside.")])
  return root
