"""The text-only corpus: more than the paired data covers, so coverage gains are measurable.

Paired samples (`paired.py`) use only the `PAIRED_STYLES` captions, questions
and the `PAIRED_CHARACTERS`. This corpus adds what never appears next to an
image: scene descriptions in `TEXT_ONLY_STYLES` (news, poem, ...), the
`TEXT_ONLY_CHARACTERS` (describing scenes, talking about topics, their
profiles) and everyday `TOPICS` (weather, cooking, ...). A share of it
("shared" coverage) is paired-style text without the image, so the two
distributions overlap.

Each text-only style, character and topic has marker words that every text of
it contains and that no paired template uses; `coverage_markers` finds them and
`in_paired_coverage` says whether a text stays within what the paired data shows.
Sample `index` of stream `seed` has its own generator (seed, TEXT_ONLY_STREAM,
index). A sample is a dict: "text", "kind" (one of `CORPUS_KINDS`), "style",
"character", "topic" (names or None), "scene" (the described `Scene` or None)
and "coverage" ("text_only" or "shared").
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Mapping

import numpy as np

from latent_mca.world import characters as characters_lib
from latent_mca.world import paired as paired_lib
from latent_mca.world import scenes as scenes_lib
from latent_mca.world import text as text_lib
from latent_mca.world.characters import CHARACTERS, PAIRED_CHARACTERS, TEXT_ONLY_CHARACTERS
from latent_mca.world.paired import PAIRED_STYLES

TEXT_ONLY_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Style:
  """A text-only way of describing a scene; every opener contains one of `markers`.

  Template fields: openers {summary} {total} {bg} {k}; lines (one per object)
  {obj} {Obj} {where} {Where} {i}.
  """
  name: str
  markers: tuple[str, ...]
  openers: tuple[str, ...]
  lines: tuple[str, ...]
  closers: tuple[str, ...]


STYLES: tuple[Style, ...] = (
    Style("news", ("breaking", "reporters", "correspondent"),
          ("Breaking news: reporters confirm {summary} on a {bg} background.",
           "Breaking: {total} spotted on a {bg} background, reporters say."),
          ("Witnesses place {obj} {where}.", "Reporters confirm {obj} {where}."),
          ("Our correspondent will keep you updated.",
           "Back to the studio, says our correspondent.")),
    Style("poem", ("verse", "stanza"),
          ("A verse for {total} on {bg}:", "Here begins a verse of {summary}."),
          ("{Obj} rests {where},", "{Where} waits {obj},"),
          ("and so the verse is done.", "thus ends the final stanza.")),
    Style("fairy_tale", ("once upon a time", "happily ever after", "enchanted"),
          ("Once upon a time, on a {bg} meadow, there lived {summary}.",
           "Once upon a time there was an enchanted picture of {total}."),
          ("{Obj} made its home {where}.", "{Where} dwelt {obj}."),
          ("And they all lived happily ever after.", "The end, happily ever after.")),
    Style("recipe", ("recipe", "ingredients"),
          ("Recipe for one picture. Ingredients: {summary}.",
           "Today's recipe needs {total} and a {bg} base."),
          ("Place {obj} {where}.", "Gently set {obj} {where}."),
          ("Serve at once.", "Let it rest and enjoy.")),
    Style("sports", ("commentator", "scoreboard", "fans"),
          ("Welcome back, fans! Your commentator here with {total} on the field.",
           "The scoreboard shows {total} lining up on a {bg} pitch!"),
          ("{Obj} takes position {where}!", "And {obj} is {where}!"),
          ("What a lineup, fans!", "Back to you at the scoreboard!")),
    Style("detective", ("case file", "case closed", "suspects"),
          ("Case file: {total} found on a {bg} floor.", "Case file. The suspects: {summary}."),
          ("{Obj} was last seen {where}.", "One witness puts {obj} {where}."),
          ("Case closed.", "The case remains open.")),
    Style("letter", ("dear friend", "yours truly", "warm regards"),
          ("Dear friend, I wish you could see this picture of {summary}.",
           "Dear friend, today I drew {total} on {bg} paper."),
          ("I put {obj} {where}.", "{Obj} is {where}."),
          ("Yours truly, a fellow painter.", "Warm regards, your pen pal.")),
    Style("lab_notes", ("lab notebook", "specimen", "specimens"),
          ("Lab notebook, entry {k}. Specimens observed: {summary}.",
           "Lab notebook entry {k}: {total} under observation."),
          ("Specimen {i}: {obj}, located {where}.", "Specimen {i} is {obj} {where}."),
          ("End of entry.", "Further observation required.")),
)
TEXT_ONLY_STYLES = tuple(s.name for s in STYLES)


@dataclasses.dataclass(frozen=True)
class Topic:
  """An everyday subject that never appears next to an image; every opener contains a marker."""
  name: str
  markers: tuple[str, ...]
  openers: tuple[str, ...]
  sentences: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic("weather", ("weather", "forecast", "umbrella"),
          ("The forecast for {day} promises {weather} weather.", "Today the weather is {weather}."),
          ("Take an umbrella if you go out in the {daypart}.",
           "The wind will be {wind} by the {daypart}.",
           "Temperatures reach {number} degrees.", "Clouds gather over the hills.")),
    Topic("cooking", ("soup", "oven", "kitchen"),
          ("The kitchen smells of {dish}.", "Tonight's soup is made with {veg}."),
          ("Chop the {veg} into small pieces.", "Let the pot simmer for {number} minutes.",
           "Season with salt and {spice}.", "Bake the bread in the oven until golden.")),
    Topic("music", ("melody", "violin", "concert"),
          ("The concert opens with a {mood} melody.", "A violin plays a {mood} tune in the hall."),
          ("The {instrument} joins in the second part.", "The audience claps for {number} minutes.",
           "The rhythm slows down near the end.", "Everyone hums the melody on the way home.")),
    Topic("gardening", ("garden", "tulips", "compost"),
          ("In the garden, the tulips are {bloom}.",
           "It is time to spread compost over the {bed}."),
          ("Water the {plant} every {day}.", "Pull the weeds before they spread.",
           "The {plant} need plenty of sun.", "Plant the bulbs in {month}.")),
    Topic("sailing", ("harbor", "sailboat", "anchor"),
          ("The sailboat leaves the harbor at {clock}.", "We drop anchor near the {shore}."),
          ("The wind fills the sail from the {direction}.", "Gulls circle above the mast.",
           "The tide turns at {clock}.", "Waves rock the deck gently.")),
    Topic("trains", ("railway", "locomotive", "timetable"),
          ("The {clock} train is on the timetable again.",
           "An old locomotive pulls into the railway station."),
          ("The conductor checks the tickets.", "The journey to {town} takes {number} hours.",
           "Passengers wave from the platform.", "The carriages rattle over the bridge.")),
    Topic("chess", ("chess", "checkmate", "chessboard"),
          ("The chess club meets on {day}.", "On the chessboard, white opens with the {piece}."),
          ("Black answers with a quick {piece} move.", "The game lasts {number} moves.",
           "A careful player avoids checkmate.", "The {piece} guards the king.")),
    Topic("tea", ("teapot", "kettle", "teatime"),
          ("The kettle whistles at teatime.", "Warm the teapot before brewing {tea}."),
          ("Let the {tea} steep for {number} minutes.", "Add a splash of milk if you like.",
           "Biscuits go well with {tea}.", "The cups wait on the {furniture}.")),
)
TOPIC_NAMES = tuple(t.name for t in TOPICS)

_FILLS: Mapping[str, tuple[str, ...]] = {
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "weather": ("sunny", "rainy", "foggy", "windy", "snowy", "mild"),
    "daypart": ("morning", "afternoon", "evening"),
    "wind": ("calm", "gusty", "strong"),
    "number": tuple(str(n) for n in (3, 5, 7, 10, 12, 15, 20, 25, 30)),
    "dish": ("tomato soup", "onion soup", "lentil stew", "fresh bread", "apple pie"),
    "veg": ("carrots", "leeks", "potatoes", "onions"),
    "spice": ("pepper", "thyme", "paprika", "nutmeg"),
    "mood": ("gentle", "lively", "sad", "bright"),
    "instrument": ("cello", "flute", "piano", "drum"),
    "bloom": ("blooming", "closed", "fading", "budding"),
    "bed": ("vegetable bed", "rose bed", "lawn"),
    "plant": ("roses", "beans", "tomatoes", "herbs"),
    "month": ("March", "April", "September", "October"),
    "clock": ("dawn", "noon", "six", "nine"),
    "shore": ("lighthouse", "old pier", "island"),
    "direction": ("north", "south", "east", "west"),
    "town": ("Millbrook", "Ashford", "Kingsport"),
    "piece": ("pawn", "knight", "bishop", "rook", "queen"),
    "tea": ("green tea", "black tea", "mint tea", "chamomile"),
    "furniture": ("windowsill", "side table", "tray"),
}


def _fill(template: str, rng: np.random.Generator) -> str:
  """Fills a topic template's slots from `_FILLS`."""
  names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
  return template.format(**{n: text_lib.pick(rng, _FILLS[n]) for n in names})


def topic_sentences(topic: Topic, rng: np.random.Generator) -> list[str]:
  """An opener (with a marker) and one to three more sentences about `topic`."""
  extra = rng.permutation(len(topic.sentences))[:int(rng.integers(1, 4))]
  return [_fill(text_lib.pick(rng, topic.openers), rng)] + [
      _fill(topic.sentences[int(k)], rng) for k in extra]


def styled_description(scene: scenes_lib.Scene, style: Style, rng: np.random.Generator) -> str:
  """A true description of `scene` in a text-only style."""
  head = text_lib.pick(rng, style.openers).format(
      summary=text_lib.objects_summary(scene), total=text_lib.total_phrase(scene),
      bg=scene.background, k=int(rng.integers(1, 1000)))
  lines = []
  for i, o in enumerate(scene.objects, start=1):
    obj = text_lib.with_article(o.phrase)
    where = scenes_lib.REGION_PHRASES[o.region]
    lines.append(text_lib.pick(rng, style.lines).format(
        obj=obj, Obj=text_lib.capitalize(obj), where=where, Where=text_lib.capitalize(where), i=i))
  return " ".join([head] + lines + [text_lib.pick(rng, style.closers)])


def _words(text: str) -> str:
  """Lower-case words joined by single spaces and padded, so " m " finds whole-word markers."""
  return " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "


# Whole words only: Zig's "rad" must not fire inside "radius".
_CHARACTER_MARKERS = {c.name: tuple(_words(m) for m in c.markers) for c in CHARACTERS}
_STYLE_MARKERS = {s.name: tuple(_words(m) for m in s.markers) for s in STYLES}
_TOPIC_MARKERS = {t.name: tuple(_words(m) for m in t.markers) for t in TOPICS}


def coverage_markers(text: str) -> dict[str, tuple[str, ...]]:
  """Which characters (paired or not), text-only styles and topics a text shows markers of."""
  words = _words(text)

  def found(markers):
    return tuple(name for name, ms in markers.items() if any(m in words for m in ms))

  return dict(characters=found(_CHARACTER_MARKERS), styles=found(_STYLE_MARKERS),
              topics=found(_TOPIC_MARKERS))


def in_paired_coverage(text: str) -> bool:
  """True when a text shows no text-only character, style or topic (what paired data covers)."""
  found = coverage_markers(text)
  return not (found["styles"] or found["topics"]
              or set(found["characters"]) & set(TEXT_ONLY_CHARACTERS))


CORPUS_KINDS = ("styled_description", "character_description", "character_profile",
                "character_topic", "topic", "plain_description")


@dataclasses.dataclass(frozen=True)
class TextOnlyConfig:
  """What the text-only stream draws.

  text_only_character_prob: chance that a character sample uses a
  text-only character rather than a paired one.
  """
  scene: scenes_lib.SceneConfig = scenes_lib.SceneConfig()
  kind_weights: tuple[tuple[str, float], ...] = (
      ("styled_description", 0.3), ("character_description", 0.25),
      ("character_profile", 0.05), ("character_topic", 0.15), ("topic", 0.1),
      ("plain_description", 0.15))
  text_only_character_prob: float = 0.75

  def __post_init__(self):
    kinds = dict(self.kind_weights)
    if not kinds or set(kinds) - set(CORPUS_KINDS) or min(kinds.values()) < 0 \
        or sum(kinds.values()) <= 0:
      raise ValueError(f"kind_weights must give non-negative weights to some of {CORPUS_KINDS}, "
                       f"got {self.kind_weights}")
    if not 0.0 <= self.text_only_character_prob <= 1.0:
      raise ValueError(f"text_only_character_prob must be in [0, 1], "
                       f"got {self.text_only_character_prob}")


def text_only_sample(seed: int, index: int, config: TextOnlyConfig = TextOnlyConfig()) -> dict:
  """Sample `index` of the text-only stream `seed` (see the module docstring for its keys)."""
  rng = np.random.default_rng([seed, TEXT_ONLY_STREAM, index])
  names = [n for n, _ in config.kind_weights]
  p = np.array([w for _, w in config.kind_weights], dtype=np.float64)
  kind = names[int(rng.choice(len(names), p=p / p.sum()))]
  style = speaker = topic = scene = None
  if kind in ("character_description", "character_profile", "character_topic"):
    pool = TEXT_ONLY_CHARACTERS if rng.random() < config.text_only_character_prob \
        else PAIRED_CHARACTERS
    speaker = characters_lib.character(text_lib.pick(rng, pool))
  if kind in ("styled_description", "character_description", "plain_description"):
    scene = scenes_lib.sample_scene(rng, config.scene)
  if kind in ("character_topic", "topic"):
    topic = TOPICS[int(rng.integers(len(TOPICS)))]

  if kind == "styled_description":
    style = STYLES[int(rng.integers(len(STYLES)))].name
    text = styled_description(scene, STYLES[TEXT_ONLY_STYLES.index(style)], rng)
  elif kind == "character_description":
    # Same format as the paired character captions, with no image to look at.
    prompt, reply = paired_lib.character_caption(scene, speaker, rng, subject="scene")
    text = prompt + "\n" + reply
  elif kind == "character_profile":
    text = "Character profile\n" + speaker.profile_text()
  elif kind == "character_topic":
    text = (f"{speaker.name} talks about {topic.name}:\n"
            + characters_lib.voice(speaker, topic_sentences(topic, rng), rng))
  elif kind == "topic":
    text = " ".join(topic_sentences(topic, rng))
  else:
    style = text_lib.pick(rng, PAIRED_STYLES)
    text = (paired_lib.caption_prompt(style, rng) + "\n" + paired_lib.caption(scene, style, rng))

  text_only = (style in TEXT_ONLY_STYLES or topic is not None
               or (speaker is not None and not speaker.paired))
  return dict(text=text, kind=kind, style=style,
              character=None if speaker is None else speaker.name,
              topic=None if topic is None else topic.name, scene=scene,
              coverage="text_only" if text_only else "shared")


def text_only_samples(seed: int, n: int, config: TextOnlyConfig = TextOnlyConfig(),
                      start: int = 0) -> list[dict]:
  """Samples start..start+n-1 of the text-only stream `seed`."""
  return [text_only_sample(seed, i, config) for i in range(start, start + n)]


__all__ = [
    "CHARACTERS", "CORPUS_KINDS", "PAIRED_CHARACTERS", "PAIRED_STYLES", "STYLES",
    "TEXT_ONLY_CHARACTERS", "TEXT_ONLY_STREAM", "TEXT_ONLY_STYLES", "TOPICS", "TOPIC_NAMES",
    "Style", "TextOnlyConfig", "Topic", "coverage_markers", "in_paired_coverage",
    "styled_description", "text_only_sample", "text_only_samples", "topic_sentences",
]
