"""Readers for the two reference dialogue benchmarks, from local folders in their published layouts.

Nothing is downloaded: each reader takes the folder the benchmark was saved
to and yields plain-dict examples in one schema of ours. Every key name of the
source formats is in the tables right below (`MMROLE_KEYS`, `PCOGALIGN_KEYS`),
so a format change is a one-line fix.

MMRole (MMRole-Data, github.com/YanqiDai/MMRole; README "Data Download"),
`root` = the `MMRole_dataset` folder:

    profiles/in-distribution/detailed_profiles/<Stem>.json
    profiles/out-of-distribution/detailed_profiles/<Stem>.json
        {"introduction", "personality", "experience", "relationship",
         "catchphrase"}: strings. <Stem> is the character's name with spaces
        as underscores ("Harry_Potter", "Charles_\"Charlie\"_Wembly", "李白").
    dialogues/in-distribution/<type>/<Stem>_COCO.json, <Stem>_script.json
    dialogues/out-of-distribution/<type>.json   (all characters in one file)
        <type> is "comment" (one question about the image), "human-role"
        (multi-turn with a curious human) or "inter-role" (multi-turn with
        another character). Each file is a list of
        {"id", "image", "conversations": [turn, ...],
         and for film-still images "role_info", "place_info", "scene_info"};
        a turn is {"from": "human", "value"} or {"role": <speaker>, "value"},
        the speaker being "human" or a character's name.
    images/<image>   e.g. images/COCO/train2017/000000184315.jpg, images/Harry_Potter/01.jpg

  The raw dialogues carry no train/test split (the formatted `data/train`,
  `data/test` files of the HF release were not available to read); the
  splits here are the two character distributions. The character of a
  dialogue is the one its file is named after (in-distribution) or whose
  <Stem> prefixes its id (out-of-distribution); that character's turns are
  the assistant's, everyone else's (the human or the other character) the
  user's. Dialogues in which the character never replies occur in the
  published files (a question whose answer was filtered out); they carry no
  reference reply, so they are dropped and counted in an INFO log line.

PCogAlignBench (github.com/liyongqi2002/PCogAlign, data on HF
YongqiLi/PCogAlignBench), `root` = the `PCogAlignBench` folder or its
`version_v4` subfolder:

    version_v4/HCMAS-train.json, HCMAS-test.json, HCSHR-train.json, HCSHR-test.json
        a list of {"individual_RoleSet": {location: role}, "query",
        "image": {"file_path"}, "eval_info": {"sub_set", "individual",
        "location", "ImageDesc", "EvalHelp"}}; image paths are relative to
        version_v4/.
    version_v4/HCMAS-golden-test.json, HCSHR-golden-test.json   (optional)
        the same plus "golden_response", the reference reply. These are the
        in-distribution (HCMAS) and out-of-distribution (HCSHR) test sets of
        the latent-action paper; they are not in the published benchmark as
        far as its code shows (the benchmark's own evaluation rates replies
        without a reference), so `reference_reply` is "" everywhere else.

  What the published code reads is certain (`individual_RoleSet`, `query`,
  `image.file_path`, `eval_info.*`); whether train files carry `eval_info`
  could not be determined, so it is optional. Instances have no id field;
  ids are "<split>/<index in file>".

Our schema, role-play (`read_mmrole`):

    {"id": str,
     "character": {"name", "introduction", "personality", "experience",
                   "relationship", "catchphrase"}: str,
     "image_path": str (absolute),
     "dialogue": [{"role": "user" | "assistant", "speaker": str, "text": str}],
     "distribution": "in" | "out",
     "dialogue_type": "comment" | "human-role" | "inter-role",
     "scene": {"role_info", "place_info", "scene_info"}: str ("" if absent)}

Personalised dialogue (`read_pcogalign`):

    {"id": str,
     "subset": "HCMAS" | "HCSHR",
     "individual": str ("" if absent),
     "role_set": [{"location": str, "role": str}]  (in file order; the
         reference prompts write it "Child at Home; Student at School"),
     "situation": {"location", "image_description", "eval_help"}: str ("" if absent),
     "image_path": str (absolute),
     "query": str,
     "reference_reply": str ("" if the file has none)}

Problems (missing folders or files, malformed JSON, wrong types, missing
images) raise `DataError` naming the file and the problem. With
`skip_bad=True` the bad file or dialogue is skipped instead and logged as a
warning with the reason; a split left with no example is still an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

# --- MMRole format -----------------------------------------------------------
MMROLE_KEYS = {
    "dialogues_dir": "dialogues",
    "profiles_dir": "profiles",
    "detailed_profiles_dir": "detailed_profiles",
    "images_dir": "images",
    "id": "id",
    "image": "image",
    "conversations": "conversations",
    "turn_text": "value",
    "turn_speaker": ("from", "role"),  # comment files use "from", the others "role"
    "human": "human",
    "profile_fields": ("introduction", "personality", "experience", "relationship", "catchphrase"),
    "scene_fields": ("role_info", "place_info", "scene_info"),
}
# Our split name -> (folder name in the release, value of "distribution").
MMROLE_SPLITS = {
    "in_distribution": ("in-distribution", "in"),
    "out_of_distribution": ("out-of-distribution", "out"),
}
MMROLE_DIALOGUE_TYPES = ("comment", "human-role", "inter-role")
# In-distribution files are <Stem><suffix>.
MMROLE_FILE_SUFFIXES = ("_COCO.json", "_script.json")

# --- PCogAlignBench format ---------------------------------------------------
PCOGALIGN_KEYS = {
    "version_dir": "version_v4",
    "role_set": "individual_RoleSet",
    "query": "query",
    "image": "image",
    "image_file": "file_path",
    "eval_info": "eval_info",
    "individual": "individual",
    "location": "location",
    "image_description": "ImageDesc",
    "eval_help": "EvalHelp",
    "reference_reply": "golden_response",
}
# Our split name -> (file name, subset).
PCOGALIGN_SPLITS = {
    "hcmas_train": ("HCMAS-train.json", "HCMAS"),
    "hcmas_test": ("HCMAS-test.json", "HCMAS"),
    "hcshr_train": ("HCSHR-train.json", "HCSHR"),
    "hcshr_test": ("HCSHR-test.json", "HCSHR"),
    "hcmas_golden_test": ("HCMAS-golden-test.json", "HCMAS"),
    "hcshr_golden_test": ("HCSHR-golden-test.json", "HCSHR"),
}
# Splits whose files belong to the published benchmark; the golden ones may be absent.
PCOGALIGN_PUBLISHED_SPLITS = ("hcmas_train", "hcmas_test", "hcshr_train", "hcshr_test")


class DataError(ValueError):
  """A benchmark folder, file or example that cannot be read; the message names the file."""


def _problem(message: str, skip_bad: bool) -> None:
  """Raises `message` as a DataError, or logs it as skipped when `skip_bad`."""
  if not skip_bad:
    raise DataError(message)
  logger.warning("skipped %s", message)


def _load_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path}: file not found") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read: {e}") from e
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON: {e}") from e


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise DataError(f"{path}: missing folder ({what})")


def check_layout(layout: list[tuple[str, bool, str]]) -> None:
  """Raises DataError naming the first missing folder or file of a layout (`mmrole_layout`,
  `pcogalign_layout`), in the readers' words."""
  for path, is_dir, what in layout:
    if is_dir:
      _require_dir(path, what)
    elif not os.path.isfile(path):
      raise DataError(f"{path}: file not found ({what})")


def _image(images_root: str, relative: Any, where: str) -> str:
  """Absolute path of an image the dataset refers to; it must exist."""
  if not isinstance(relative, str) or not relative:
    raise DataError(f"{where}: image path must be a non-empty string, got {relative!r}")
  path = os.path.join(images_root, relative)
  if not os.path.isfile(path):
    raise DataError(f"{where}: image {path} does not exist")
  return path


# --- MMRole ------------------------------------------------------------------


def read_mmrole(root: str | os.PathLike, split: str, *, skip_bad: bool = False) -> Iterator[dict]:
  """Yields the role-play dialogues of one MMRole split in our schema (module docstring).

  Args:
    root: the MMRole_dataset folder (holding dialogues/, profiles/, images/).
    split: "in_distribution" or "out_of_distribution" (`MMROLE_SPLITS`).
    skip_bad: skip (and log) bad files and dialogues instead of raising.

  Raises:
    DataError: naming the file and the problem. The folders are checked at
      call time, the files while iterating.
  """
  if split not in MMROLE_SPLITS:
    raise ValueError(f"unknown MMRole split {split!r}; expected one of {sorted(MMROLE_SPLITS)}")
  root = os.fspath(root)
  folder, distribution = MMROLE_SPLITS[split]
  dialogues_dir, profiles_dir, images_dir = _mmrole_dirs(root, split)
  _require_dir(root, "the MMRole dataset root")
  _require_dir(dialogues_dir, f"MMRole {folder} dialogues")
  _require_dir(profiles_dir, f"MMRole {folder} character profiles")
  _require_dir(images_dir, "MMRole images")
  return _iter_mmrole(root, split, distribution, dialogues_dir, profiles_dir, images_dir, skip_bad)


def _mmrole_dirs(root: str, split: str) -> tuple[str, str, str]:
  """(dialogues folder, detailed profiles folder, images folder) of one MMRole split."""
  folder = MMROLE_SPLITS[split][0]
  return (os.path.join(root, MMROLE_KEYS["dialogues_dir"], folder),
          os.path.join(root, MMROLE_KEYS["profiles_dir"], folder,
                       MMROLE_KEYS["detailed_profiles_dir"]),
          os.path.join(root, MMROLE_KEYS["images_dir"]))


def mmrole_layout(root: str | os.PathLike) -> list[tuple[str, bool, str]]:
  """What `read_mmrole` reads of the published layout for both splits, as (path, is_dir, what).

  The in-distribution dialogue files are whatever each type's folder holds, so the
  folders are listed; the out-of-distribution ones are one file per type.
  """
  root = os.fspath(root)
  layout = [(root, True, "the MMRole dataset root")]
  for split, (folder, distribution) in MMROLE_SPLITS.items():
    dialogues_dir, profiles_dir, images_dir = _mmrole_dirs(root, split)
    layout.append((profiles_dir, True, f"MMRole {folder} character profiles"))
    for dialogue_type in MMROLE_DIALOGUE_TYPES:
      if distribution == "out":
        layout.append((os.path.join(dialogues_dir, dialogue_type + ".json"), False,
                       f"MMRole {folder} {dialogue_type} dialogues"))
      else:
        layout.append((os.path.join(dialogues_dir, dialogue_type), True,
                       f"MMRole {folder} {dialogue_type} dialogues"))
  layout.append((images_dir, True, "MMRole images"))
  return layout


def _mmrole_files(dialogues_dir: str, distribution: str,
                  skip_bad: bool) -> Iterator[tuple[str, str, str | None]]:
  """(dialogue type, JSON path, character stem or None when the file holds all characters)."""
  for dialogue_type in MMROLE_DIALOGUE_TYPES:
    if distribution == "out":
      path = os.path.join(dialogues_dir, dialogue_type + ".json")
      if os.path.isfile(path):
        yield dialogue_type, path, None
      else:
        _problem(f"{path}: file not found", skip_bad)
      continue
    type_dir = os.path.join(dialogues_dir, dialogue_type)
    if not os.path.isdir(type_dir):
      _problem(f"{type_dir}: missing folder (MMRole {dialogue_type} dialogues)", skip_bad)
      continue
    for name in sorted(os.listdir(type_dir)):
      if name.startswith("."):  # .DS_Store and the like
        continue
      path = os.path.join(type_dir, name)
      suffix = next((s for s in MMROLE_FILE_SUFFIXES if name.endswith(s)), None)
      if suffix is None or len(name) == len(suffix):
        _problem(f"{path}: not a <Character>{'/'.join(MMROLE_FILE_SUFFIXES)} dialogue file", skip_bad)
        continue
      yield dialogue_type, path, name[:-len(suffix)]


def _load_profile(profiles_dir: str, stem: str) -> dict[str, str]:
  path = os.path.join(profiles_dir, stem + ".json")
  profile = _load_json(path)
  if not isinstance(profile, dict):
    raise DataError(f"{path}: expected a JSON object, got {type(profile).__name__}")
  fields = {}
  for key in MMROLE_KEYS["profile_fields"]:
    if not isinstance(profile.get(key), str):
      raise DataError(f"{path}: field {key!r} must be a string, got {profile.get(key)!r:.60}")
    fields[key] = profile[key]
  return fields


def _stem_from_id(dialogue_id: str, stems: list[str]) -> str | None:
  """The longest character stem that `dialogue_id` starts with (then "_"), if any."""
  matches = [s for s in stems if dialogue_id.startswith(s + "_")]
  return max(matches, key=len) if matches else None


def _mmrole_dialogue(entry: Any, where: str) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
  """Validates one dialogue entry: (id, [(speaker, text)], scene fields)."""
  if not isinstance(entry, dict):
    raise DataError(f"{where}: dialogue must be a JSON object, got {type(entry).__name__}")
  dialogue_id = entry.get(MMROLE_KEYS["id"])
  if not isinstance(dialogue_id, str) or not dialogue_id:
    raise DataError(f"{where}: dialogue has no string {MMROLE_KEYS['id']!r}")
  where = f"{where}: dialogue {dialogue_id!r}"
  turns = entry.get(MMROLE_KEYS["conversations"])
  if not isinstance(turns, list) or not turns:
    raise DataError(f"{where}: {MMROLE_KEYS['conversations']!r} must be a non-empty list")
  parsed = []
  for i, turn in enumerate(turns):
    speaker_keys = [k for k in MMROLE_KEYS["turn_speaker"] if isinstance(turn, dict) and k in turn]
    text = turn.get(MMROLE_KEYS["turn_text"]) if isinstance(turn, dict) else None
    if (len(speaker_keys) != 1 or not isinstance(turn[speaker_keys[0]], str)
        or not isinstance(text, str)):
      raise DataError(f"{where}: turn {i} must be {{one of {MMROLE_KEYS['turn_speaker']}: speaker, "
                      f"{MMROLE_KEYS['turn_text']!r}: text}}, got {turn!r:.80}")
    parsed.append((turn[speaker_keys[0]], text))
  scene = {}
  for key in MMROLE_KEYS["scene_fields"]:
    value = entry.get(key, "")
    if not isinstance(value, str):
      raise DataError(f"{where}: {key!r} must be a string, got {value!r:.60}")
    scene[key] = value
  return dialogue_id, parsed, scene


def _character_speaker(stem: str, turns: list[tuple[str, str]], where: str) -> str | None:
  """Which speaker is the character the dialogue belongs to; None if only the human speaks."""
  others = {s for s, _ in turns if s != MMROLE_KEYS["human"]}
  name = stem.replace("_", " ")
  if name in others:
    return name
  if len(others) <= 1:  # the name is spelt differently in the dialogue than in the file name
    return next(iter(others), None)
  raise DataError(f"{where}: cannot tell which speaker is the character {name!r}; "
                  f"speakers are {sorted(others)}")


def _iter_mmrole(root, split, distribution, dialogues_dir, profiles_dir, images_dir, skip_bad):
  stems = sorted(n[:-len(".json")] for n in os.listdir(profiles_dir) if n.endswith(".json"))
  profiles: dict[str, dict[str, str]] = {}
  seen: dict[str, str] = {}
  count = 0
  for dialogue_type, path, file_stem in _mmrole_files(dialogues_dir, distribution, skip_bad):
    try:
      entries = _load_json(path)
      if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of dialogues, got {type(entries).__name__}")
    except DataError as e:
      _problem(str(e), skip_bad)
      continue
    unanswered = 0
    for index, entry in enumerate(entries):
      try:
        dialogue_id, turns, scene = _mmrole_dialogue(entry, f"{path}: entry {index}")
        where = f"{path}: dialogue {dialogue_id!r}"
        stem = file_stem or _stem_from_id(dialogue_id, stems)
        if stem is None:
          raise DataError(f"{where}: id names no character with a profile in {profiles_dir}")
        if stem not in profiles:
          profiles[stem] = _load_profile(profiles_dir, stem)
        speaker = _character_speaker(stem, turns, where)
        if speaker is None:
          unanswered += 1
          continue
        image_path = _image(images_dir, entry.get(MMROLE_KEYS["image"]), where)
        if dialogue_id in seen:
          raise DataError(f"{where}: duplicate id, also in {seen[dialogue_id]}")
      except DataError as e:
        _problem(str(e), skip_bad)
        continue
      seen[dialogue_id] = path
      count += 1
      yield {
          "id": dialogue_id,
          "character": {"name": speaker, **profiles[stem]},
          "image_path": image_path,
          "dialogue": [{"role": "assistant" if s == speaker else "user", "speaker": s, "text": t}
                       for s, t in turns],
          "distribution": distribution,
          "dialogue_type": dialogue_type,
          "scene": scene,
      }
    if unanswered:
      logger.info("%s: dropped %d dialogue(s) in which the character never replies", path, unanswered)
  if not count:
    raise DataError(f"{root}: no usable MMRole dialogues in split {split!r}")


# --- PCogAlignBench ----------------------------------------------------------


def pcogalign_dir(root: str | os.PathLike) -> str:
  """The folder holding the PCogAlignBench JSON files: `root` or its version subfolder."""
  root = os.fspath(root)
  versioned = os.path.join(root, PCOGALIGN_KEYS["version_dir"])
  return versioned if os.path.isdir(versioned) else root


def pcogalign_layout(root: str | os.PathLike, splits: Iterable[str]) -> list[tuple[str, bool, str]]:
  """What `read_pcogalign` reads for these splits, as (path, is_dir, what) (see `check_layout`)."""
  folder = pcogalign_dir(root)
  return [(folder, True, "the PCogAlignBench root")] + [
      (os.path.join(folder, PCOGALIGN_SPLITS[split][0]), False, f"PCogAlignBench {split}")
      for split in splits]


def read_pcogalign(root: str | os.PathLike, split: str, *, skip_bad: bool = False) -> Iterator[dict]:
  """Yields the personalised-dialogue instances of one PCogAlignBench split in our schema.

  Args:
    root: the PCogAlignBench folder, or its version_v4 subfolder.
    split: a key of `PCOGALIGN_SPLITS`, e.g. "hcmas_test".
    skip_bad: skip (and log) bad instances instead of raising.

  Raises:
    DataError: naming the file and the problem. The folder and file are
      checked at call time, the instances while iterating.
  """
  if split not in PCOGALIGN_SPLITS:
    raise ValueError(f"unknown PCogAlignBench split {split!r}; "
                     f"expected one of {sorted(PCOGALIGN_SPLITS)}")
  folder = pcogalign_dir(root)
  _require_dir(folder, "the PCogAlignBench root")
  file_name, subset = PCOGALIGN_SPLITS[split]
  path = os.path.join(folder, file_name)
  instances = _load_json(path)  # a split with an unreadable file has nothing to skip to
  if not isinstance(instances, list):
    raise DataError(f"{path}: expected a JSON list of instances, got {type(instances).__name__}")
  return _iter_pcogalign(folder, path, split, subset, instances, skip_bad)


def _string_field(container: dict, key: str, where: str, required: bool = True) -> str:
  value = container.get(key)
  if value is None and not required:
    return ""
  if not isinstance(value, str):
    raise DataError(f"{where}: {key!r} must be a string, got {value!r:.60}")
  return value


def _pcogalign_example(folder: str, instance: Any, where: str) -> dict:
  k = PCOGALIGN_KEYS
  if not isinstance(instance, dict):
    raise DataError(f"{where}: instance must be a JSON object, got {type(instance).__name__}")
  role_set = instance.get(k["role_set"])
  if (not isinstance(role_set, dict) or not role_set
      or not all(isinstance(a, str) and isinstance(b, str) for a, b in role_set.items())):
    raise DataError(f"{where}: {k['role_set']!r} must be a non-empty {{location: role}} "
                    f"object of strings, got {role_set!r:.80}")
  image = instance.get(k["image"])
  if not isinstance(image, dict):
    raise DataError(f"{where}: {k['image']!r} must be an object with {k['image_file']!r}")
  eval_info = instance.get(k["eval_info"], {})
  if not isinstance(eval_info, dict):
    raise DataError(f"{where}: {k['eval_info']!r} must be an object, got {eval_info!r:.60}")
  return {
      "individual": _string_field(eval_info, k["individual"], where, required=False),
      "role_set": [{"location": location, "role": role} for location, role in role_set.items()],
      "situation": {
          "location": _string_field(eval_info, k["location"], where, required=False),
          "image_description": _string_field(eval_info, k["image_description"], where, required=False),
          "eval_help": _string_field(eval_info, k["eval_help"], where, required=False),
      },
      "image_path": _image(folder, image.get(k["image_file"]), where),
      "query": _string_field(instance, k["query"], where),
      "reference_reply": _string_field(instance, k["reference_reply"], where, required=False),
  }


def _iter_pcogalign(folder, path, split, subset, instances, skip_bad):
  count = 0
  for index, instance in enumerate(instances):
    try:
      example = _pcogalign_example(folder, instance, f"{path}: instance {index}")
    except DataError as e:
      _problem(str(e), skip_bad)
      continue
    count += 1
    yield {"id": f"{split}/{index}", "subset": subset, **example}
  if not count:
    raise DataError(f"{path}: no usable instances")
