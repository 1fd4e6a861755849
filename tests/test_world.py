"""latent_mca.world: the synthetic scenes, their images, paired samples and the text-only corpus.

Answers and facts are checked against recomputations written here from the
raw object attributes and coordinates, not against the library's own helpers.
"""

import itertools
import json
import re

import numpy as np
import pytest

from latent_mca import world
from latent_mca.world import scenes as scenes_lib

N_SAMPLES = 3000
ORDER = ("small", "medium", "large")


@pytest.fixture(scope="module")
def paired():
  return world.paired_samples(seed=0, n=N_SAMPLES)


@pytest.fixture(scope="module")
def text_only():
  return world.text_only_samples(seed=0, n=N_SAMPLES)


def scenes(seed, n, **config):
  rng = np.random.default_rng(seed)
  cfg = world.SceneConfig(**config)
  return [world.sample_scene(rng, cfg) for _ in range(n)]


def cell_of(obj):
  """(row, col) recomputed from the centre coordinates."""
  return int(obj.y * 3), int(obj.x * 3)


def region_from_xy(obj):
  """Region name recomputed from the centre coordinates."""
  row, col = cell_of(obj)
  names = [["top left", "top middle", "top right"], ["middle left", "center", "middle right"],
           ["bottom left", "bottom middle", "bottom right"]]
  return names[row][col]


def resolve(phrase, scene):
  """Objects a phrase like "the small red star in the top left corner" or "the red object" names."""
  assert phrase.startswith("the "), phrase
  region = next((r for r in world.REGIONS if re.search(rf"\b{r}\b", phrase)), None)
  words = re.split(r" (?:in|at|on) the ", phrase[len("the "):])[0].split()
  assert words[-1] in world.SHAPES + ("object",), phrase
  return [o for o in scene.objects
          if all(w in (o.size, o.color, o.shape, "object") for w in words)
          and (region is None or region_from_xy(o) == region)]


def test_same_seed_same_data_and_different_seed_differs():
  a, b, c = scenes(7, 30), scenes(7, 30), scenes(8, 30)
  assert a == b
  assert a != c
  assert all(world.render(x, 56).tobytes() == world.render(y, 56).tobytes() for x, y in zip(a, b))
  assert [world.render(x, 56).tobytes() for x in a] != [world.render(x, 56).tobytes() for x in c]
  texts = lambda seed: [s["text"] for s in world.paired_samples(seed, 50)]
  assert texts(3) == texts(3) and texts(3) != texts(4)
  corpus = lambda seed: [s["text"] for s in world.text_only_samples(seed, 50)]
  assert corpus(3) == corpus(3) and corpus(3) != corpus(4)
  # A sample depends on (seed, index) only, not on what was generated before it.
  assert world.paired_sample(3, 17)["text"] == world.paired_samples(3, 5, start=15)[2]["text"]
  assert world.text_only_sample(3, 17)["text"] == world.text_only_samples(3, 20)[17]["text"]


@pytest.mark.parametrize("size", [56, 224])
def test_rendered_pixels_show_the_objects(size):
  for scene in scenes(1, 60, max_objects=9):
    image = world.render(scene, size)
    assert image.size == (size, size) and image.mode == "RGB"
    pixels = np.asarray(image)
    for o in scene.objects:
      assert tuple(pixels[int(o.y * size), int(o.x * size)]) == world.COLORS[o.color], (o, size)
    # Only the background and the objects' own colours are drawn.
    packed = lambda rgb: rgb.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    allowed = [world.BACKGROUNDS[scene.background]] + [world.COLORS[o.color] for o in scene.objects]
    assert set(np.unique(packed(pixels)).tolist()) == set(packed(np.array(allowed)).tolist())


def test_objects_lie_inside_and_do_not_overlap():
  size = 112
  for scene in scenes(2, 80, min_objects=5, max_objects=9):
    masks = []
    for o in scene.objects:
      x0, y0, x1, y1 = o.bbox
      assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
      alone = np.asarray(world.render(world.Scene((o,), scene.background), size))
      mask = (alone != world.BACKGROUNDS[scene.background]).any(-1)
      ys, xs = np.nonzero(mask)
      # Drawn pixels stay within the bounding box (one pixel of rounding).
      assert xs.min() >= x0 * size - 1 and xs.max() <= x1 * size + 1
      assert ys.min() >= y0 * size - 1 and ys.max() <= y1 * size + 1
      masks.append(mask)
    for m1, m2 in itertools.combinations(masks, 2):
      assert not (m1 & m2).any()
    for o1, o2 in itertools.combinations(scene.objects, 2):
      a, b = o1.bbox, o2.bbox
      assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_facts_match_recomputation():
  for scene in scenes(3, 200, max_objects=9):
    facts = scene.facts()
    json.dumps(facts)  # JSON-compatible
    objs = scene.objects
    assert facts["num_objects"] == len(objs)
    for shape in world.SHAPES:
      assert facts["counts"]["shape"][shape] == sum(o.shape == shape for o in objs)
    for color in world.COLORS:
      assert facts["counts"]["color"][color] == sum(o.color == color for o in objs)
    for f, o in zip(facts["objects"], objs):
      assert f["region"] == region_from_xy(o)
      assert facts["by_region"][f["region"]] == f["index"]
      assert resolve(f["reference_text"], scene) == [o]
    assert sum(v is not None for v in facts["by_region"].values()) == len(objs)
    biggest = max(ORDER.index(o.size) for o in objs)
    assert facts["largest"] == [i for i, o in enumerate(objs) if ORDER.index(o.size) == biggest]
    for i, j in itertools.permutations(range(len(objs)), 2):
      (ri, ci), (rj, cj) = cell_of(objs[i]), cell_of(objs[j])
      assert ([i, j] in facts["relations"]["left_of"]) == (ci < cj)
      assert ([i, j] in facts["relations"]["below"]) == (ri > rj)


def expected_answer(scene, q):
  """The answer to a query, recomputed from the raw objects."""
  objs, t = scene.objects, q["type"]

  def one(ref):
    found = [o for o in objs if all(
        (region_from_xy(o) if k == "region" else getattr(o, k)) == v for k, v in ref.items())]
    assert len(found) == 1, (ref, found)
    return found[0]

  if t == "count_shape":
    return str(sum(o.shape == q["shape"] for o in objs))
  if t == "count_color":
    return str(sum(o.color == q["color"] for o in objs))
  if t == "count_color_shape":
    return str(sum(o.color == q["color"] and o.shape == q["shape"] for o in objs))
  if t == "count_size":
    return str(sum(o.size == q["size"] for o in objs))
  if t == "count_total":
    return str(len(objs))
  if t in ("color_of", "shape_of", "size_of"):
    return getattr(one(q["target"]), t[:-len("_of")])
  if t == "where_is":
    return region_from_xy(one(q["target"]))
  if t == "what_at":
    there = [o for o in objs if region_from_xy(o) == q["region"]]
    if not there:
      return "nothing"
    o = there[0]
    return ("an " if o.size[0] in "aeiou" else "a ") + f"{o.size} {o.color} {o.shape}"
  if t == "exists":
    return "yes" if any(o.shape == q["shape"] and q["color"] in (None, o.color)
                        for o in objs) else "no"
  if t == "bigger":
    a, b = one(q["a"]), one(q["b"])
    if a.size == b.size:
      return world.SAME_SIZE
    return a if ORDER.index(a.size) > ORDER.index(b.size) else b
  if t in ("largest", "smallest"):
    key = [ORDER.index(o.size) for o in objs]
    best = max(key) if t == "largest" else min(key)
    assert key.count(best) == 1
    return objs[key.index(best)]
  if t == "left_of":
    return "yes" if cell_of(one(q["a"]))[1] < cell_of(one(q["b"]))[1] else "no"
  if t == "above":
    return "yes" if cell_of(one(q["a"]))[0] < cell_of(one(q["b"]))[0] else "no"
  if t == "background":
    return scene.background
  raise AssertionError(t)


def test_every_answer_agrees_with_recomputation(paired):
  qa = [s for s in paired if s["kind"] == "qa"]
  assert {s["query"]["type"] for s in qa} == set(world.QUESTION_TYPES)
  for s in qa:
    q, scene = s["query"], s["scene"]
    assert s["text"] == s["prompt"] + "\n" + s["answer"]
    # The question names what the query asks about.
    for key in ("color", "size"):
      if q.get(key):
        assert q[key] in s["prompt"], s
    for ref in (q.get("target"), q.get("a"), q.get("b")):
      for value in (ref or {}).values():
        assert value in s["prompt"], s
    expected = expected_answer(scene, q)
    if isinstance(expected, str):
      assert s["answer"] == expected, s
    else:  # an object: the answer must name exactly it
      assert resolve(s["answer"], scene) == [expected], s


def test_answers_are_varied(paired):
  qa = [s for s in paired if s["kind"] == "qa"]
  yes_no = [s["answer"] for s in qa if s["query"]["type"] in ("exists", "left_of", "above")]
  assert 0.3 < yes_no.count("yes") / len(yes_no) < 0.7
  counts = {s["answer"] for s in qa if s["query"]["type"].startswith("count")}
  assert {"0", "1", "2", "3"} <= counts
  assert len({s["text"] for s in paired}) > 0.75 * N_SAMPLES


def test_captions_state_the_scene(paired):
  captions = [s for s in paired if s["kind"] == "caption"]
  assert {s["style"] for s in captions} == set(world.PAIRED_STYLES)
  for s in captions:
    scene, answer = s["scene"], s["answer"]
    if s["style"] == "detailed":
      assert answer.split()[3] == ["one", "two", "three", "four", "five", "six", "seven",
                                   "eight", "nine"][len(scene.objects) - 1]
      for o in scene.objects:
        phrase, where = f"{o.size} {o.color} {o.shape}", world.REGION_PHRASES[region_from_xy(o)]
        assert re.search(rf"{phrase} (is |sits )?{where}|{where} there is a {phrase}", answer,
                         re.IGNORECASE), s
    if s["style"] != "spatial":
      assert all(o.shape in answer for o in scene.objects), s
    if s["style"] in ("plain", "terse", "detailed"):
      assert all(o.color in answer for o in scene.objects), s
    absent = set(world.COLORS) - {o.color for o in scene.objects}
    assert not any(re.search(rf"\b{c}\b", answer) for c in absent), s


def test_json_round_trip():
  for scene in scenes(4, 50, max_objects=9):
    text = world.scene_to_json(scene)
    back = world.scene_from_json(text)
    assert back == scene and back.facts() == scene.facts()
    assert world.render(back, 56).tobytes() == world.render(scene, 56).tobytes()
  data = json.loads(world.scene_to_json(scenes(4, 1, min_objects=2)[0]))
  bad_color = json.loads(json.dumps(data))
  bad_color["objects"][0]["color"] = "teal"
  same_cell = json.loads(json.dumps(data))
  same_cell["objects"][1] = dict(same_cell["objects"][0])
  outside = json.loads(json.dumps(data))
  outside["objects"][0]["x"] = outside["objects"][0]["col"] / 3 + 0.001
  for bad in (bad_color, same_cell, outside):
    with pytest.raises(ValueError):
      world.scene_from_json(json.dumps(bad))
  with pytest.raises(ValueError):
    world.scene_from_json("{not json")


def test_text_only_corpus_covers_more_than_paired(paired, text_only):
  paired_found = {"characters": set(), "styles": set(), "topics": set()}
  for s in paired:
    assert world.in_paired_coverage(s["text"]), s["text"]
    for k, v in world.coverage_markers(s["text"]).items():
      paired_found[k] |= set(v)
    assert s["style"] in (None,) + world.PAIRED_STYLES
    assert s["character"] in (None,) + world.PAIRED_CHARACTERS
    for name in world.TEXT_ONLY_CHARACTERS:
      assert name not in s["text"]
  assert paired_found["styles"] == set() and paired_found["topics"] == set()
  assert paired_found["characters"] == set(world.PAIRED_CHARACTERS)

  seen = {"characters": set(), "styles": set(), "topics": set()}
  for s in text_only:
    found = world.coverage_markers(s["text"])
    for k, v in found.items():
      seen[k] |= set(v)
    # The flag agrees with the markers, and the markers with what made the text.
    assert (s["coverage"] == "text_only") == (not world.in_paired_coverage(s["text"])), s
    if s["style"] in world.TEXT_ONLY_STYLES:
      assert found["styles"] == (s["style"],), s
    if s["character"] is not None:
      assert s["character"] in found["characters"], s
    if s["topic"] is not None:
      assert found["topics"] == (s["topic"],), s
  assert set(world.TEXT_ONLY_CHARACTERS) <= seen["characters"]
  assert seen["styles"] == set(world.TEXT_ONLY_STYLES)
  assert seen["topics"] == set(world.TOPIC_NAMES)
  coverage = [s["coverage"] for s in text_only]
  assert 0.5 < coverage.count("text_only") / len(coverage) < 0.95
  assert len({s["text"] for s in text_only}) > 0.9 * N_SAMPLES


def test_coverage_flags_single_texts():
  assert world.in_paired_coverage("Ahoy there! A red star is in the center!")
  assert not world.in_paired_coverage("Forsooth! A red star is in the center!")
  assert not world.in_paired_coverage("Breaking news: a red star in the center.")
  assert not world.in_paired_coverage("The kettle whistles at teatime.")
  # Whole words only: "radius" is not Zig's "rad".
  assert world.coverage_markers("the radius is large")["characters"] == ()


def test_bad_configs_are_rejected():
  with pytest.raises(ValueError, match="max_objects"):
    world.SceneConfig(min_objects=3, max_objects=2)
  with pytest.raises(ValueError, match="teal"):
    world.SceneConfig(colors=("red", "teal"))
  with pytest.raises(ValueError, match="kind_weights"):
    world.PairedConfig(kind_weights=(("story", 1.0),))
  with pytest.raises(ValueError, match="size"):
    world.render(scenes(0, 1)[0], 8)
  with pytest.raises(ValueError, match="share a grid cell"):
    o = scenes(0, 1)[0].objects[0]
    world.Scene((o, o), "white")
  assert scenes_lib.find_objects(scenes(0, 1)[0]) == tuple(range(len(scenes(0, 1)[0].objects)))
