"""latent_mca.tasks: the synthetic role-play and personalised tasks, their messages and splits.

Schemas are compared with what the real-data readers yield on tiny copies of
the benchmarks; ground-truth replies are checked with the judge's parser and,
independently, by regular expressions over the reply against the scene's raw
objects (regions recomputed from coordinates).
"""

import json
import re

import numpy as np
import PIL.Image
import pytest

from latent_mca import tasks, world
from latent_mca.data import real
from latent_mca.judge import programmatic
from latent_mca.tasks import personalised, roleplay, splits

N = 300


@pytest.fixture(scope="module")
def roleplay_sets():
  return {d: tasks.roleplay_examples(seed=11, n=N, distribution=d) for d in ("in", "out")}


@pytest.fixture(scope="module")
def personalised_sets():
  return {d: tasks.personalised_examples(seed=11, n=N, distribution=d) for d in ("in", "out")}


def _write_json(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def real_examples(tmp_path_factory):
  """One example from each real-data reader, read from tiny copies in the published layouts."""
  root = tmp_path_factory.mktemp("real")
  mmrole = root / "MMRole_dataset"
  (mmrole / "images").mkdir(parents=True)
  PIL.Image.new("RGB", (8, 8)).save(mmrole / "images" / "a.png")
  _write_json(mmrole / "profiles" / "in-distribution" / "detailed_profiles" / "Captain_Maro.json",
              {k: f"{k} text" for k in roleplay.PROFILE_FIELDS})
  dialogues = mmrole / "dialogues" / "in-distribution"
  _write_json(dialogues / "comment" / "Captain_Maro_COCO.json", [
      {"id": "Captain_Maro_comment_COCO_0", "image": "a.png",
       "conversations": [{"from": "human", "value": "What is this?"},
                         {"role": "Captain Maro", "value": "Ahoy!"}]}])
  (dialogues / "human-role").mkdir()
  (dialogues / "inter-role").mkdir()
  bench = root / "PCogAlignBench" / "version_v4"
  (bench / "images").mkdir(parents=True)
  PIL.Image.new("RGB", (8, 8)).save(bench / "images" / "b.png")
  _write_json(bench / "HCMAS-golden-test.json", [
      {"individual_RoleSet": {"Home": "Child"}, "query": "Help?",
       "image": {"file_path": "images/b.png"},
       "eval_info": {"sub_set": "HCMAS", "individual": "P1", "location": "Home", "ImageDesc": "d",
                     "EvalHelp": "h"}, "golden_response": "Sure."}])
  return (next(iter(real.read_mmrole(mmrole, "in_distribution"))),
          next(iter(real.read_pcogalign(root / "PCogAlignBench", "hcmas_golden_test"))))


def _structure(value):
  """The nested key structure of an example, with leaves replaced by their type."""
  if isinstance(value, dict):
    return {k: _structure(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_structure(value[0])] if value else []
  return type(value).__name__


# --- Schemas ------------------------------------------------------------------------


def test_roleplay_schema_equals_the_real_readers(roleplay_sets, real_examples):
  expected = _structure(real_examples[0])
  for examples in roleplay_sets.values():
    for example in examples[:50]:
      assert _structure(example) == expected
      assert example["dialogue"][-1]["role"] == "assistant"
      assert example["dialogue_type"] in real.MMROLE_DIALOGUE_TYPES
  distributions = {e["distribution"] for es in roleplay_sets.values() for e in es}
  assert distributions == {"in", "out"}
  assert {e["dialogue_type"] for e in roleplay_sets["in"]} == {"comment", "human-role"}


def test_personalised_schema_equals_the_real_readers(personalised_sets, real_examples):
  expected = _structure(real_examples[1])
  for examples in personalised_sets.values():
    for example in examples[:50]:
      assert _structure(example) == expected
      assert example["reference_reply"]
  assert {e["subset"] for e in personalised_sets["in"]} == {"HCMAS"}
  assert {e["subset"] for e in personalised_sets["out"]} == {"HCSHR"}


def test_character_profiles_are_the_worlds(roleplay_sets):
  for example in roleplay_sets["in"][:30] + roleplay_sets["out"][:30]:
    profile = world.character(example["character"]["name"]).profile()
    for field in roleplay.PROFILE_FIELDS:
      assert example["character"][field] == profile[field]


# --- Determinism and distributions -----------------------------------------------------


def test_examples_are_deterministic_and_independent_of_n():
  assert tasks.roleplay_examples(3, 20, "out") == tasks.roleplay_examples(3, 20, "out")
  assert tasks.roleplay_examples(3, 20)[7:] == tasks.roleplay_examples(3, 13, start=7)
  assert tasks.roleplay_example(3, 5) == tasks.roleplay_examples(3, 40)[5]
  assert tasks.personalised_examples(3, 20, "out") == tasks.personalised_examples(3, 20, "out")
  assert tasks.personalised_example(3, 5, "in") == tasks.personalised_examples(3, 40)[5]
  assert tasks.roleplay_examples(3, 20) != tasks.roleplay_examples(4, 20)
  assert tasks.personalised_examples(3, 20) != tasks.personalised_examples(4, 20)


def test_characters_and_role_sets_split_by_distribution(roleplay_sets, personalised_sets):
  names = {d: {e["character"]["name"] for e in es} for d, es in roleplay_sets.items()}
  assert names["in"] == set(world.PAIRED_CHARACTERS)
  assert names["out"] == set(world.TEXT_ONLY_CHARACTERS)
  roles = {d: {(r["location"], r["role"]) for e in es for r in e["role_set"]}
           for d, es in personalised_sets.items()}
  locations = {d: {loc for loc, _ in pairs} for d, pairs in roles.items()}
  assert not roles["in"] & roles["out"] and not locations["in"] & locations["out"]
  assert {e["individual"] for e in personalised_sets["out"]} == set(personalised.individuals("out"))
  for example in personalised_sets["in"] + personalised_sets["out"]:
    person = personalised.primary_role(example)
    assert person.location == example["situation"]["location"]
    assert f"As a {person.name}" in example["situation"]["eval_help"]
    item_locations = [loc.name for loc in personalised.LOCATIONS.values()
                      if any(item in example["query"] for item in loc.items)]
    assert item_locations == [person.location]  # the query tells where the person is


def test_role_markers_identify_the_role():
  fields = {"openers": "role_markers", "actions": "action_markers", "feelings": "feeling_markers"}
  for r in tasks.ROLES:
    others = {m for o in tasks.ROLES if o is not r for f in fields.values() for m in getattr(o, f)}
    for texts, markers in fields.items():
      for text in getattr(r, texts):
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert words & set(getattr(r, markers)), (r.name, text)
        assert not words & others, (r.name, text, words & others)


def test_unknown_distribution_is_rejected():
  with pytest.raises(ValueError, match="distribution"):
    tasks.roleplay_examples(0, 1, "ood")
  with pytest.raises(ValueError, match="distribution"):
    tasks.personalised_examples(0, 1, "both")


def test_replies_differ_by_role_in_the_same_situation():
  scene = world.sample_scene(np.random.default_rng(0))
  query = {"type": "count_total"}
  child = personalised.personalised_reply(scene, query, personalised.role("Child", "Home"),
                                          np.random.default_rng(1))
  engineer = personalised.personalised_reply(scene, query, personalised.role("Engineer", "Office"),
                                             np.random.default_rng(1))
  n = len(scene.objects)
  assert f"{world.text.number_word(n)} shape" in child and "at home" in child
  assert f" {n} shape" in engineer and "at the office" in engineer
  assert not set(re.findall(r"\w+", child.lower())) & {"specification", "readout", "spreadsheet"}


# --- Ground truth agrees with the scene ---------------------------------------------------

_NUM = {w: i for i, w in enumerate(world.text.NUMBER_WORDS)}
_REGION = "|".join(sorted(world.REGIONS, key=len, reverse=True))
_NAMES = [["top left", "top middle", "top right"], ["middle left", "center", "middle right"],
          ["bottom left", "bottom middle", "bottom right"]]


def _region(obj):
  return _NAMES[int(obj.y * 3)][int(obj.x * 3)]


def _singular(noun):
  return next((s for s in world.SHAPES if noun in (s, world.text.plural(s))), None)


def _resolve(phrase, scene):
  """Objects that "the small red star in the top left corner" / "the red object" name."""
  phrase = phrase.strip()
  assert phrase.startswith("the "), phrase
  region = re.search(rf"\b({_REGION})\b", phrase)
  words = re.split(r" (?:in|at|on) the ", phrase[4:])[0].split()
  return [o for o in scene.objects
          if all(w in (o.size, o.color, o.shape, "object") for w in words)
          and (region is None or _region(o) == region.group(1))]


def _the(phrase, scene):
  """The one object a definite phrase names, or None."""
  found = _resolve(phrase, scene)
  return found[0] if len(found) == 1 else None


def _count(scene, words):
  """Objects matching adjectives and a noun ("red circles", "small objects", "shapes")."""
  *adjectives, noun = words.split()
  shape = _singular(noun)
  return sum(all(a in (o.size, o.color) for a in adjectives) and shape in (None, o.shape)
             for o in scene.objects)


def _independent_checks(scene, reply):
  """(statements recognised, statements false) for the answer templates, from raw objects."""
  known, false = 0, []
  for sentence in re.split(r"(?<=[.!?])\s+", reply.lower()):
    s = sentence.rstrip(".!? ")
    checks = []
    m = re.fullmatch(
        r"(?:yes, |no, )?there (?:is|are) (no|\w+|\d+) ([a-z ]+?) in (?:total|the image)", s)
    if m and (m.group(1) in _NUM or m.group(1).isdigit() or m.group(1) == "no"):
      n = 0 if m.group(1) == "no" else int(m.group(1)) if m.group(1).isdigit() else _NUM[m.group(1)]
      checks.append(_count(scene, m.group(2)) == n)
    elif m := re.fullmatch(r"yes, there is an? ([a-z ]+) in the image", s):
      checks.append(_count(scene, m.group(1)) > 0)
    m = re.fullmatch(r"i see (.+) on a (\w+) background", s)
    if m:
      checks.append(scene.background == m.group(2))
      for group in re.split(r", | and ", m.group(1)):
        number, words = group.split(" ", 1)
        n = 1 if number in ("a", "an") else _NUM[number]
        color, shape = words.split()
        checks.append(sum(o.color == color and o.shape == _singular(shape)
                          for o in scene.objects) == n)
    for pattern in (rf"(?:there is |)an? (\w+) (\w+) (\w+) (?:is |sits |)(?:in|at|on) the "
                    rf"({_REGION})(?: corner)?",
                    rf"(?:in|at|on) the ({_REGION})(?: corner)? there is an? (\w+) (\w+) (\w+)"):
      m = re.fullmatch(pattern, s)
      if m:
        groups = m.groups()
        region, (size, color, shape) = (groups[3], groups[:3]) if groups[0] in world.SIZES else (
            groups[0], groups[1:])
        checks.append(any(_region(o) == region
                          and (o.size, o.color, o.shape) == (size, color, shape)
                          for o in scene.objects))
    if m := re.fullmatch(rf"there is nothing (?:in|at|on) the ({_REGION})(?: corner)?", s):
      checks.append(all(_region(o) != m.group(1) for o in scene.objects))
    if m := re.fullmatch(r"the background is (\w+)", s):
      checks.append(scene.background == m.group(1))
    if m := re.fullmatch(
        rf"(the [a-z ]+?) is (?:(an? )?(\w+)|(?:in|at|on) the ({_REGION})(?: corner)?)", s):
      o, value = _the(m.group(1), scene), m.group(3)
      if m.group(4) or value in world.COLORS or value in world.SIZES or value in world.SHAPES:
        checks.append(o is not None and (
            m.group(4) == _region(o) if m.group(4) else value in (o.color, o.size, o.shape)
            and (m.group(2) is not None) == (value in world.SHAPES)))
    if m := re.fullmatch(r"(the [a-z ]+?) is bigger than (the [a-z ]+)", s):
      a, b = _the(m.group(1), scene), _the(m.group(2), scene)
      checks.append(None not in (a, b) and world.SIZES.index(a.size) > world.SIZES.index(b.size))
    if m := re.fullmatch(r"(the [a-z ]+?) and (the [a-z ]+?) are the same size", s):
      a, b = _the(m.group(1), scene), _the(m.group(2), scene)
      checks.append(None not in (a, b) and a.size == b.size)
    if m := re.fullmatch(r"(the [a-z ]+?) is the (largest|smallest) object", s):
      a = _the(m.group(1), scene)
      ranks = [world.SIZES.index(o.size) for o in scene.objects]
      extreme = max(ranks) if m.group(2) == "largest" else min(ranks)
      checks.append(a is not None and world.SIZES.index(a.size) == extreme
                    and ranks.count(extreme) == 1)
    if m := re.fullmatch(
        r"(yes|no), (the [a-z ]+?) is (?:not )?(to the left of|above) (the [a-z ]+)", s):
      a, b = _the(m.group(2), scene), _the(m.group(4), scene)
      holds = None not in (a, b) and (int(a.x * 3) < int(b.x * 3) if m.group(3) == "to the left of"
                                      else int(a.y * 3) < int(b.y * 3))
      checks.append(None not in (a, b) and holds == (m.group(1) == "yes")
                    and ("not" in s) != holds)
    if m := re.fullmatch(r"no, there is no ([a-z ]+) in the image", s):
      checks.append(_count(scene, m.group(1)) == 0)
    known += bool(checks)
    false += [sentence for ok in checks if not ok]
  return known, false


def _replies(example):
  if "dialogue" in example:
    return [t["text"] for t in example["dialogue"] if t["role"] == "assistant"]
  return [example["reference_reply"]]


def test_ground_truth_replies_state_true_facts(roleplay_sets, personalised_sets):
  everything = [e for sets in (roleplay_sets, personalised_sets)
                for es in sets.values() for e in es]
  for example in everything:
    scene, facts = tasks.example_scene(example), tasks.example_facts(example)
    for reply in _replies(example):
      claims = programmatic.parse_claims(reply)
      assert claims, reply
      assert all(programmatic.claim_holds(c, facts) for c in claims), (reply, claims)
      known, false = _independent_checks(scene, reply)
      assert known >= 1, reply
      assert not false, (reply, false)


def test_independent_check_catches_a_false_statement(roleplay_sets):
  # The checker itself must be able to fail: flip one count / colour per reply.
  caught = 0
  for example in roleplay_sets["in"][:80]:
    scene, reply = tasks.example_scene(example), tasks.roleplay_reference(example)
    words = {"one": "seven", "two": "eight", "three": "nine", "no": "six", "red": "cyan",
             "blue": "cyan", "green": "cyan", "yellow": "cyan"}
    wrong = re.sub(r"\b(one|two|three|red|blue|green|yellow)\b(?= (?:\w+ )?(?:objects?|shapes?|"
                   + "|".join(world.SHAPES) + r"))", lambda m: words[m.group(1)], reply, count=1)
    if wrong != reply and "cyan" not in reply:
      caught += bool(_independent_checks(scene, wrong)[1])
  assert caught >= 15


# --- Images and messages -----------------------------------------------------------------


def test_example_images_render_the_scene_or_load_the_file(roleplay_sets, real_examples):
  example = roleplay_sets["in"][0]
  assert example["image_path"].startswith(tasks.SCENE_URI_PREFIX)
  scene = tasks.example_scene(example)
  image = tasks.example_image(example, image_size=56)
  assert image.size == (56, 56)
  assert np.array_equal(np.asarray(image), np.asarray(world.render(scene, 56)))
  real_roleplay, real_personalised = real_examples
  assert tasks.example_scene(real_roleplay) is None
  assert tasks.example_image(real_roleplay).size == (8, 8)
  assert tasks.example_image(real_personalised).size == (8, 8)
  with pytest.raises(ValueError, match="real data"):
    tasks.example_facts(real_roleplay)


def test_roleplay_messages(roleplay_sets, real_examples):
  multi = next(e for e in roleplay_sets["in"] if e["dialogue_type"] == "human-role")
  messages = tasks.roleplay_messages(multi)
  system = messages[0]
  assert system["role"] == "system"
  for field in roleplay.PROFILE_FIELDS:
    assert multi["character"][field] in system["content"]
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
  assert messages[1]["content"][0] == {"type": "image"}
  assert messages[1]["content"][1] == {"type": "text", "text": multi["dialogue"][0]["text"]}
  assert messages[3]["content"] == [{"type": "text", "text": tasks.roleplay_question(multi)}]
  full = tasks.roleplay_messages(multi, image="IMG", include_reply=True)
  assert full[-1] == {"role": "assistant", "content": tasks.roleplay_reference(multi)}
  assert full[1]["content"][0] == {"type": "image", "image": "IMG"}
  # The same builder serves real MMRole data.
  real_messages = tasks.roleplay_messages(real_examples[0], include_reply=True)
  assert [m["role"] for m in real_messages] == ["system", "user", "assistant"]
  assert real_messages[-1]["content"] == "Ahoy!"


def test_personalised_messages(personalised_sets, real_examples):
  example = personalised_sets["in"][0]
  messages = tasks.personalised_messages(example, include_reply=True)
  roles = "; ".join(f"{r['role']} at {r['location']}" for r in example["role_set"])
  assert messages[0] == {"role": "system",
                         "content": f'You are a helpful assistant for a user who is "{roles}".'}
  assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": example["query"]}]
  assert messages[2] == {"role": "assistant", "content": example["reference_reply"]}
  assert len(tasks.personalised_messages(example)) == 2
  real_messages = tasks.personalised_messages(real_examples[1], include_reply=True)
  assert real_messages[0]["content"] == (
      'You are a helpful assistant for a user who is "Child at Home".')
  no_reply = dict(real_examples[1], reference_reply="")
  with pytest.raises(ValueError, match="no reference reply"):
    tasks.personalised_messages(no_reply, include_reply=True)


# --- Splits ------------------------------------------------------------------------------


def test_split_proportions_on_2000_ids():
  ids = [{"id": f"roleplay/in/0/{i}", "distribution": "in"} for i in range(2000)]
  counts = {name: len(v) / 2000 for name, v in tasks.split_examples(ids).items()}
  assert abs(counts["sft"] - 0.5) < 0.035
  assert abs(counts["rl"] - 0.4) < 0.035
  assert abs(counts["test_in"] - 0.1) < 0.025
  assert counts["test_out"] == 0
  ood = [{"id": f"p/{i}", "subset": "HCSHR"} for i in range(50)]
  assert {tasks.split_of(e) for e in ood} == {"test_out"}


def test_task_splits_are_disjoint_stable_and_separate_distributions():
  small = tasks.task_splits(seed=5, n_in=120, n_out=30)
  large = tasks.task_splits(seed=5, n_in=240, n_out=60)
  for task in splits.TASKS:
    ids = {name: {e["id"] for e in small[task][name]} for name in splits.SPLITS}
    assert sum(map(len, ids.values())) == 150
    assert len(set().union(*ids.values())) == 150  # disjoint
    assert len(ids["test_out"]) == 30
    for name in splits.SPLITS:  # growing n only adds examples
      assert ids[name] <= {e["id"] for e in large[task][name]}
  for name in ("sft", "rl", "test_in"):
    assert {e["character"]["name"] for e in large["roleplay"][name]} <= set(world.PAIRED_CHARACTERS)
    assert {e["subset"] for e in large["personalised"][name]} == {"HCMAS"}
  assert ({e["character"]["name"] for e in large["roleplay"]["test_out"]}
          <= set(world.TEXT_ONLY_CHARACTERS))
  assert {e["subset"] for e in large["personalised"]["test_out"]} == {"HCSHR"}
