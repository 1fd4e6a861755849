"""English phrasing of scene facts, shared by captions, questions, characters and the corpus.

Every sentence here is generated from a scene's objects, so whatever it says
is true of the scene.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from latent_mca.world import scenes as scenes_lib

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def number_word(n: int) -> str:
  """The English word for 0..9 (e.g. "three"); digits above nine."""
  return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
  """English plural of a shape or the nouns "object" / "shape"."""
  return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def with_article(phrase: str) -> str:
  """The phrase with "a" or "an" in front: "a red star", "an orange circle"."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def count_noun(n: int, noun: str) -> str:
  """A counted noun: "one star", "three stars", "no stars"."""
  if n == 0:
    return "no " + plural(noun)
  return f"{number_word(n)} {noun if n == 1 else plural(noun)}"


def join_words(items: Sequence[str]) -> str:
  """An English list: "a", "a and b", "a, b and c"."""
  items = list(items)
  if len(items) <= 1:
    return "".join(items)
  return ", ".join(items[:-1]) + " and " + items[-1]


def capitalize(text: str) -> str:
  """Upper-cases the first character only (keeps the rest as written)."""
  return text[:1].upper() + text[1:]


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  """One of `options`, uniformly."""
  return options[int(rng.integers(len(options)))]


def group_phrases(scene: scenes_lib.Scene, with_size: bool = False) -> list[str]:
  """Objects grouped by colour and shape (and size), in reading order.

  E.g. ["two red circles", "a blue star"].
  """
  groups: dict[tuple[str, ...], int] = {}
  for o in scene.objects:
    key = (o.size, o.color, o.shape) if with_size else (o.color, o.shape)
    groups[key] = groups.get(key, 0) + 1
  phrases = []
  for key, n in groups.items():
    adjectives, noun = " ".join(key[:-1]), key[-1]
    phrases.append(with_article(f"{adjectives} {noun}") if n == 1
                   else f"{number_word(n)} {adjectives} {plural(noun)}")
  return phrases


def objects_summary(scene: scenes_lib.Scene) -> str:
  """All objects in one phrase, e.g. "two red circles and a blue star"."""
  return join_words(group_phrases(scene))


def total_phrase(scene: scenes_lib.Scene, noun: str = "shape") -> str:
  """The number of objects as a phrase, e.g. "three shapes"."""
  return count_noun(len(scene.objects), noun)


_OBJECT_SENTENCES = (
    "There is {obj} {where}.",
    "{Obj} is {where}.",
    "{Where} there is {obj}.",
    "{Obj} sits {where}.",
)


def object_sentence(obj: scenes_lib.SceneObject, rng: np.random.Generator) -> str:
  """One sentence stating an object's size, colour, shape and region."""
  phrase = with_article(obj.phrase)
  where = scenes_lib.REGION_PHRASES[obj.region]
  return pick(rng, _OBJECT_SENTENCES).format(
      obj=phrase, Obj=capitalize(phrase), where=where, Where=capitalize(where))


def object_sentences(scene: scenes_lib.Scene, rng: np.random.Generator) -> list[str]:
  """One `object_sentence` per object, in reading order."""
  return [object_sentence(o, rng) for o in scene.objects]


def shape_count_phrases(scene: scenes_lib.Scene) -> list[str]:
  """["two circles", "one star"] for the shapes present, in reading order."""
  counts: dict[str, int] = {}
  for o in scene.objects:
    counts[o.shape] = counts.get(o.shape, 0) + 1
  return [count_noun(n, s) for s, n in counts.items()]


def color_count_phrases(scene: scenes_lib.Scene) -> list[str]:
  """["two red", "one blue"] for the colours present, in reading order."""
  counts: dict[str, int] = {}
  for o in scene.objects:
    counts[o.color] = counts.get(o.color, 0) + 1
  return [f"{number_word(n)} {c}" for c, n in counts.items()]


def relation_sentences(scene: scenes_lib.Scene, rng: np.random.Generator, limit: int) -> list[str]:
  """Up to `limit` true left/right/above/below statements between uniquely named objects.

  References avoid the region (which would give the relation away) and pairs
  without such references are skipped.
  """
  n = len(scene.objects)
  refs = [scenes_lib.unique_reference(scene, i, exclude=("region",)) for i in range(n)]
  sentences = []
  for flat in rng.permutation(n * n):
    i, j = divmod(int(flat), n)
    if len(sentences) >= limit:
      break
    if i == j or refs[i] is None or refs[j] is None:
      continue
    a, b = scene.objects[i], scene.objects[j]
    relations = []
    if a.col < b.col:
      relations.append("to the left of")
    if a.row < b.row:
      relations.append("above")
    if not relations:
      continue
    sentences.append(capitalize(f"{scenes_lib.reference_phrase(refs[i])} is "
                                f"{pick(rng, relations)} {scenes_lib.reference_phrase(refs[j])}."))
  return sentences
