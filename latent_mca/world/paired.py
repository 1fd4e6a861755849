"""Paired image-text samples: captions, questions with answers, and character captions.

Sample `index` of stream `seed` is drawn from its own generator, seeded with
(seed, PAIRED_STREAM, index), so any sample can be made alone, in any order.
A sample is a dict:

- "scene": the `Scene`; the image is `render(scene, image_size)` (see `sample_image`).
- "image_size": int, pixels per side.
- "prompt", "answer": the user turn and the target reply; "text" is
  prompt + "\\n" + answer.
- "kind": "caption" | "qa" | "character".
- "style": the caption style (one of `PAIRED_STYLES`) for captions, else None.
- "character": the speaking character's name for kind "character", else None.
- "query": for kind "qa", the structured question (see `answer_query`), else None.

Every answer and caption is computed from the scene, never sampled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import PIL.Image

from latent_mca.world import characters as characters_lib
from latent_mca.world import scenes as scenes_lib
from latent_mca.world import text as text_lib

# Seeds the per-sample generator together with (seed, index), so paired and
# text-only streams with the same seed are independent.
PAIRED_STREAM = 1

# Caption styles that appear next to images.
PAIRED_STYLES = ("terse", "plain", "detailed", "counting", "spatial")

_CAPTION_PROMPTS = {
    "terse": ("Caption the image in a few words.", "Short caption:", "Name what you see, briefly."),
    "plain": ("Describe the image.", "What does the image show?", "What is in this picture?"),
    "detailed": ("Describe the image in detail.", "Give a detailed description of the picture.",
                 "Describe every object in the image and where it is."),
    "counting": ("Count the shapes in the image.", "How many shapes of each kind are there?"),
    "spatial": ("Describe where the shapes are.", "Explain the layout of the image."),
}


def caption(scene: scenes_lib.Scene, style: str, rng: np.random.Generator) -> str:
  """A true caption of `scene` in one of `PAIRED_STYLES`, from terse to detailed."""
  bg = scene.background
  if style == "terse":
    summary = text_lib.objects_summary(scene)
    return text_lib.pick(rng, (f"{text_lib.capitalize(summary)}.",
                               f"{text_lib.capitalize(summary)} on {bg}."))
  if style == "plain":
    opener = text_lib.pick(rng, ("An image of", "A picture of", "A drawing of"))
    return f"{opener} {text_lib.objects_summary(scene)} on a {bg} background."
  if style == "detailed":
    head = (f"The image shows {text_lib.total_phrase(scene, 'object')} "
            f"on a {bg} background.")
    return " ".join([head] + text_lib.object_sentences(scene, rng))
  if style == "counting":
    n = len(scene.objects)
    verb = "is" if n == 1 else "are"
    out = (f"There {verb} {text_lib.total_phrase(scene)} in total: "
           f"{text_lib.join_words(text_lib.shape_count_phrases(scene))}.")
    if rng.random() < 0.5:
      out += f" By color: {text_lib.join_words(text_lib.color_count_phrases(scene))}."
    return out
  if style == "spatial":
    sentences = text_lib.object_sentences(scene, rng)
    return " ".join(sentences + text_lib.relation_sentences(scene, rng, limit=2))
  raise ValueError(f"unknown caption style {style!r}; expected one of {PAIRED_STYLES}")


def caption_prompt(style: str, rng: np.random.Generator) -> str:
  """A user request for a caption in `style`."""
  return text_lib.pick(rng, _CAPTION_PROMPTS[style])


# ---------------------------------------------------------------------------
# Questions. A query is a dict with "type" and its parameters; object
# references are attribute dicts (see `scenes.unique_reference`).
# ---------------------------------------------------------------------------

QUESTION_TYPES = (
    "count_shape", "count_color", "count_color_shape", "count_size", "count_total",
    "color_of", "shape_of", "size_of", "where_is", "what_at", "exists", "bigger",
    "largest", "smallest", "left_of", "above", "background")

SAME_SIZE = "they are the same size"
NOTHING = "nothing"


def answer_query(scene: scenes_lib.Scene, query: Mapping) -> str:
  """The canonical answer to `query` about `scene`, computed from `scene.facts()`.

  Answers: counts as digits ("2"); colour / shape / size / region / background
  names; "yes" / "no"; for "what_at" "a small red star" or "nothing"; for
  "bigger", "largest", "smallest" the reference phrase of the object
  ("the red star") or `SAME_SIZE`.
  """
  facts = scene.facts()
  kind = query["type"]
  counts = facts["counts"]

  def target(ref):
    found = scenes_lib.find_objects(scene, **ref)
    if len(found) != 1:
      raise ValueError(f"reference {ref} matches {len(found)} objects, not one")
    return facts["objects"][found[0]]

  if kind == "count_shape":
    return str(counts["shape"][query["shape"]])
  if kind == "count_color":
    return str(counts["color"][query["color"]])
  if kind == "count_color_shape":
    return str(counts["color_shape"].get(f"{query['color']} {query['shape']}", 0))
  if kind == "count_size":
    return str(counts["size"][query["size"]])
  if kind == "count_total":
    return str(facts["num_objects"])
  if kind == "color_of":
    return target(query["target"])["color"]
  if kind == "shape_of":
    return target(query["target"])["shape"]
  if kind == "size_of":
    return target(query["target"])["size"]
  if kind == "where_is":
    return target(query["target"])["region"]
  if kind == "what_at":
    index = facts["by_region"][query["region"]]
    return NOTHING if index is None else text_lib.with_article(facts["objects"][index]["phrase"])
  if kind == "exists":
    wanted = {k: query[k] for k in ("shape", "color") if query.get(k) is not None}
    return "yes" if scenes_lib.find_objects(scene, **wanted) else "no"
  if kind == "bigger":
    a, b = target(query["a"]), target(query["b"])
    ra, rb = scenes_lib.SIZES.index(a["size"]), scenes_lib.SIZES.index(b["size"])
    if ra == rb:
      return SAME_SIZE
    return scenes_lib.reference_phrase(query["a"] if ra > rb else query["b"])
  if kind in ("largest", "smallest"):
    indices = facts[kind]
    if len(indices) != 1:
      raise ValueError(f"no single {kind} object: {indices}")
    return facts["objects"][indices[0]]["reference_text"]
  if kind in ("left_of", "above"):
    a, b = target(query["a"]), target(query["b"])
    return "yes" if [a["index"], b["index"]] in facts["relations"][kind] else "no"
  if kind == "background":
    return facts["background"]
  raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def _present_or_any(rng, present, vocab, p_present=0.75):
  """Mostly something in the scene, sometimes anything (so 0 and "no" answers occur)."""
  return text_lib.pick(rng, sorted(present) if rng.random() < p_present else vocab)


def _random_index(rng, scene):
  return int(rng.integers(len(scene.objects)))


def _two_references(rng, scene, exclude):
  """Two distinct objects with unique references avoiding `exclude`, or None."""
  if len(scene.objects) < 2:
    return None
  i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
  a = scenes_lib.unique_reference(scene, i, exclude=exclude)
  b = scenes_lib.unique_reference(scene, j, exclude=exclude)
  return None if a is None or b is None else (a, b)


def _make_query(kind: str, scene: scenes_lib.Scene, rng: np.random.Generator) -> dict | None:
  """Parameters for a question of `kind`, or None when the scene cannot support it."""
  objs = scene.objects
  if kind == "count_shape":
    return dict(type=kind, shape=_present_or_any(rng, {o.shape for o in objs}, scenes_lib.SHAPES))
  if kind == "count_color":
    return dict(type=kind, color=_present_or_any(rng, {o.color for o in objs},
                                                 tuple(scenes_lib.COLORS)))
  if kind == "count_color_shape":
    o = objs[_random_index(rng, scene)]
    if rng.random() < 0.75:
      return dict(type=kind, color=o.color, shape=o.shape)
    return dict(type=kind, color=text_lib.pick(rng, tuple(scenes_lib.COLORS)), shape=o.shape)
  if kind == "count_size":
    return dict(type=kind, size=_present_or_any(rng, {o.size for o in objs}, scenes_lib.SIZES))
  if kind in ("count_total", "background"):
    return dict(type=kind)
  if kind in ("color_of", "shape_of", "size_of", "where_is"):
    excluded = {"color_of": "color", "shape_of": "shape", "size_of": "size",
                "where_is": "region"}[kind]
    ref = scenes_lib.unique_reference(scene, _random_index(rng, scene), exclude=(excluded,))
    return None if ref is None else dict(type=kind, target=ref)
  if kind == "what_at":
    occupied = [o.region for o in objs]
    return dict(type=kind, region=_present_or_any(rng, occupied, scenes_lib.REGIONS, 0.7))
  if kind == "exists":
    o = objs[_random_index(rng, scene)]
    shape = o.shape if rng.random() < 0.5 else text_lib.pick(rng, scenes_lib.SHAPES)
    color = None
    if rng.random() < 0.7:
      color = o.color if rng.random() < 0.5 else text_lib.pick(rng, tuple(scenes_lib.COLORS))
    return dict(type=kind, shape=shape, color=color)
  if kind in ("bigger", "left_of", "above"):
    # The asked attribute must not be in the references, or they would give it away.
    refs = _two_references(rng, scene, exclude=("size",) if kind == "bigger" else ("region",))
    return None if refs is None else dict(type=kind, a=refs[0], b=refs[1])
  if kind in ("largest", "smallest"):
    facts = scene.facts()
    return dict(type=kind) if len(objs) > 1 and len(facts[kind]) == 1 else None
  raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


_QUESTION_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "count_shape": ("How many {shapes} are there?", "How many {shapes} are in the image?",
                    "Count the {shapes}."),
    "count_color": ("How many {color} objects are there?", "How many shapes are {color}?"),
    "count_color_shape": ("How many {color} {shapes} are there?",
                          "Count the {color} {shapes} in the picture."),
    "count_size": ("How many {size} objects are there?", "How many shapes are {size}?"),
    "count_total": ("How many objects are in the image?", "How many shapes are there in total?"),
    "color_of": ("What color is {target}?", "Which color does {target} have?"),
    "shape_of": ("What shape is {target}?", "What kind of shape is {target}?"),
    "size_of": ("What size is {target}?", "Is {target} small, medium or large?"),
    "where_is": ("Where is {target}?", "In which part of the image is {target}?"),
    "what_at": ("What is {where}?", "Which object is {where}?"),
    "exists": ("Is there {thing} in the image?", "Does the picture contain {thing}?"),
    "bigger": ("Which is bigger, {a} or {b}?", "Which is larger: {a} or {b}?"),
    "largest": ("Which object is the largest?", "What is the biggest shape?"),
    "smallest": ("Which object is the smallest?", "What is the tiniest shape?"),
    "left_of": ("Is {a} to the left of {b}?", "Is {a} further left than {b}?"),
    "above": ("Is {a} above {b}?", "Is {a} higher up than {b}?"),
    "background": ("What color is the background?", "What is the background color?"),
}


def question_text(query: Mapping, rng: np.random.Generator) -> str:
  """A wording of `query` (the templates only name the query's own parameters)."""
  ref = scenes_lib.reference_phrase
  fields = {}
  if "shape" in query:
    fields["shapes"] = text_lib.plural(query["shape"])
  for key in ("color", "size"):
    if key in query:
      fields[key] = query[key]
  if "target" in query:
    fields["target"] = ref(query["target"])
  if "region" in query:
    fields["where"] = scenes_lib.REGION_PHRASES[query["region"]]
  if "a" in query:
    fields["a"], fields["b"] = ref(query["a"]), ref(query["b"])
  if query["type"] == "exists":
    words = ([query["color"]] if query["color"] else []) + [query["shape"]]
    fields["thing"] = text_lib.with_article(" ".join(words))
  return text_lib.pick(rng, _QUESTION_TEMPLATES[query["type"]]).format(**fields)


def make_question(scene: scenes_lib.Scene, rng: np.random.Generator,
                  types: tuple[str, ...] = QUESTION_TYPES) -> tuple[dict, str, str]:
  """A random applicable question about `scene`: (query, question text, answer)."""
  for kind in rng.permutation(np.array(types)):
    query = _make_query(str(kind), scene, rng)
    if query is not None:
      return query, question_text(query, rng), answer_query(scene, query)
  raise ValueError(f"none of the question types {types} applies to this scene")


_CHARACTER_PROMPTS = (
    "You are {name}, {intro}. Describe the {subject} in your own voice.",
    "Stay in character as {name}. What do you see in this {subject}?",
    "As {name}, tell me about this {subject}.",
)


def character_caption(scene: scenes_lib.Scene, character: characters_lib.Character,
                      rng: np.random.Generator, subject: str = "image") -> tuple[str, str]:
  """(prompt, reply): `character` describes the scene truthfully in their voice.

  subject: what the prompt calls the scene ("image" when one is shown).
  """
  prompt = text_lib.pick(rng, _CHARACTER_PROMPTS).format(
      name=character.name, intro=character.introduction, subject=subject)
  head = f"I see {text_lib.objects_summary(scene)} on a {scene.background} background."
  sentences = [head] + (text_lib.object_sentences(scene, rng) if rng.random() < 0.5 else [])
  return prompt, characters_lib.voice(character, sentences, rng)


@dataclasses.dataclass(frozen=True)
class PairedConfig:
  """What the paired stream draws: scenes, image size and the mix of sample kinds."""
  scene: scenes_lib.SceneConfig = scenes_lib.SceneConfig()
  image_size: int = 56
  kind_weights: tuple[tuple[str, float], ...] = (
      ("caption", 0.35), ("qa", 0.5), ("character", 0.15))
  question_types: tuple[str, ...] = QUESTION_TYPES
  styles: tuple[str, ...] = PAIRED_STYLES

  def __post_init__(self):
    kinds = dict(self.kind_weights)
    if not kinds or set(kinds) - {"caption", "qa", "character"} or min(kinds.values()) < 0 \
        or sum(kinds.values()) <= 0:
      raise ValueError(f"kind_weights must give non-negative weights to some of caption, qa, "
                       f"character, got {self.kind_weights}")
    if self.image_size < 24:
      raise ValueError(f"image_size must be >= 24, got {self.image_size}")
    for t in self.question_types:
      if t not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {t!r}; expected some of {QUESTION_TYPES}")
    for s in self.styles:
      if s not in PAIRED_STYLES:
        raise ValueError(f"unknown paired style {s!r}; expected some of {PAIRED_STYLES}")


def _choose(rng: np.random.Generator, weights: tuple[tuple[str, float], ...]) -> str:
  names = [n for n, _ in weights]
  p = np.array([w for _, w in weights], dtype=np.float64)
  return names[int(rng.choice(len(names), p=p / p.sum()))]


def paired_sample(seed: int, index: int, config: PairedConfig = PairedConfig()) -> dict:
  """Sample `index` of the paired stream `seed` (see the module docstring for its keys)."""
  rng = np.random.default_rng([seed, PAIRED_STREAM, index])
  scene = scenes_lib.sample_scene(rng, config.scene)
  kind = _choose(rng, config.kind_weights)
  style = character = query = None
  if kind == "caption":
    style = text_lib.pick(rng, config.styles)
    prompt, answer = caption_prompt(style, rng), caption(scene, style, rng)
  elif kind == "qa":
    query, prompt, answer = make_question(scene, rng, config.question_types)
  else:
    speaker = characters_lib.character(text_lib.pick(rng, characters_lib.PAIRED_CHARACTERS))
    character = speaker.name
    prompt, answer = character_caption(scene, speaker, rng)
  return dict(scene=scene, image_size=config.image_size, prompt=prompt, answer=answer,
              text=f"{prompt}\n{answer}", kind=kind, style=style, character=character,
              query=query)


def paired_samples(seed: int, n: int, config: PairedConfig = PairedConfig(),
                   start: int = 0) -> list[dict]:
  """Samples start..start+n-1 of the paired stream `seed`."""
  return [paired_sample(seed, i, config) for i in range(start, start + n)]


def sample_image(sample: Mapping) -> PIL.Image.Image:
  """The rendered image of a paired sample."""
  return scenes_lib.render(sample["scene"], sample["image_size"])

