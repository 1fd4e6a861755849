"""Multimodal role-play on the synthetic world, in the MMRole schema of `latent_mca.data.real`.

An example is a character (a paired one = in-distribution, a text-only one =
out-of-distribution), a scene image, a user's question about it and the
character's reply: true statements computed from `Scene.facts()`, a line that
draws on the character's profile (their knowledge) and the character's voice
(`world.voice`: greeting, sentence endings, interjections, catchphrase). Its
keys are exactly those `read_mmrole` yields:

    {"id": "roleplay/<in|out>/<seed>/<index>",
     "character": {"name", "introduction", "personality", "experience",
                   "relationship", "catchphrase"},
     "image_path": SCENE_URI_PREFIX + the scene's JSON,
     "dialogue": [{"role": "user" | "assistant", "speaker", "text"}, ...],
     "distribution": "in" | "out",
     "dialogue_type": "comment" (one question) | "human-role" (two exchanges),
     "scene": {"role_info": "", "place_info": "", "scene_info": ""}}

The image is not a file: `image_path` carries the scene itself, so an example
holds its own ground truth. `example_image` renders it (or loads a real
file), `example_scene` / `example_facts` read it back. The reply to judge is
the last assistant turn; `roleplay_messages` builds the chat up to it.

The pieces both dialogue tasks share (scene images, questions, true answer
statements) live here; `personalised` imports them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image

from latent_mca.data.image_processing import load_image
from latent_mca.world import characters as characters_lib
from latent_mca.world import paired as paired_lib
from latent_mca.world import scenes as scenes_lib
from latent_mca.world import text as text_lib

# Seeds per-example generators with (seed, ROLEPLAY_STREAM, distribution, index);
# the world's paired and text-only streams are 1 and 2.
ROLEPLAY_STREAM = 3
DISTRIBUTIONS = ("in", "out")
SCENE_URI_PREFIX = "scene:"
PROFILE_FIELDS = ("introduction", "personality", "experience", "relationship", "catchphrase")
SCENE_INFO_FIELDS = ("role_info", "place_info", "scene_info")

# Open requests: the expected answer describes the whole scene.
OPEN_QUESTIONS = ("What do you make of this picture?", "Describe what you see in this image.",
                  "What do you see here?", "Tell me about this picture.")

# Lines that use each character's profile (introduction, experience,
# relationship) without copying it; none states anything about a scene.
KNOWLEDGE: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "Captain Maro": (
        "I would paint this on driftwood back at my lighthouse.",
        "Forty years at sea taught me to read a picture like a chart.",
        "Granny Rose would hang this by the lighthouse window."),
    "Professor Quill": (
        "I shall catalogue this figure for the university museum.",
        "Such geometry would stump Lady Amberly at the town quiz.",
        "Pip, my assistant, will file it beside every polygon we own."),
    "Pip the Robot": (
        "My toy workshop memory holds ten thousand pictures like this.",
        "Report filed for Professor Quill, my boss.",
        "Counting is what this helper loves most."),
    "Granny Rose": (
        "I could knit this pattern by my window this afternoon.",
        "My art class at the village school would have loved this.",
        "Zig would adore it, and so would Captain Maro."),
    "Zig the Skater": (
        "I would film a trick over this at the park jam.",
        "Granny Rose would totally knit this.",
        "Captain Maro taught me knots that look like this."),
    "Lady Amberly": (
        "It would hang nicely beside the fine paintings at Amberly Hall.",
        "I shall show it at my next grand gala.",
        "Professor Quill's museum ought to acquire it."),
    "Sir Bramble": (
        "I saw such banners on the Thornwood bridge I once guarded.",
        "Echo the Parrot shall hear of this from its sworn protector.",
        "A knight errant like me would guard this with honour."),
    "Luna Moth": (
        "I would add this to my paintings of the moon at night.",
        "I must write to Nova, my pen pal, about it.",
        "Night after night I paint, and this belongs in my works."),
    "Inspector Vale": (
        "Reminds me of that museum jewel that vanished.",
        "Coach Duke would miss it, but police work is detail.",
        "A sharp eye solved the mystery before, and it will again."),
    "Chef Basil": (
        "My famous trattoria would serve a dish that looks like this.",
        "Inspector Vale tastes with his eyes too when I feed him on Sunday.",
        "A cheerful cook like me sees a feast here."),
    "Coach Duke": (
        "This is a training drill in disguise for the town team.",
        "The neighbourhood kids will study this on the weekends.",
        "The town team won its titles by spotting details like these."),
    "Nova the Alien": (
        "Back on my faraway planet we paint with starlight instead.",
        "I will tell my pen pal Luna Moth about this.",
        "I saw patterns like this in the cornfield where I landed last spring."),
    "Mister Fennel": (
        "Sixty years on Elm Street and they still hang pictures like this.",
        "Louder than Coach Duke's whistle, this picture.",
        "Another thing to complain about, as a grumpy neighbour should."),
    "Echo the Parrot": (
        "Escaped the pet shop to see this!",
        "Sir Bramble, my companion, must see it!",
        "Talkative bird repeats what it sees!"),
})


@dataclasses.dataclass(frozen=True)
class RoleplayConfig:
  """What the role-play examples draw.

  open_question_prob: chance of an open request ("Describe what you see")
  instead of a question with one answer. multi_turn_prob: chance of a
  "human-role" dialogue (two exchanges) instead of a "comment" (one).
  address_prob: chance that a question starts with the character's name.
  """
  scene: scenes_lib.SceneConfig = scenes_lib.SceneConfig()
  open_question_prob: float = 0.25
  multi_turn_prob: float = 0.3
  address_prob: float = 0.3

  def __post_init__(self):
    for name in ("open_question_prob", "multi_turn_prob", "address_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"RoleplayConfig.{name} must be in [0, 1], got {value}")


# --- Scene images carried in `image_path` -------------------------------------


def scene_image_path(scene: scenes_lib.Scene) -> str:
  """The `image_path` of a synthetic example: the scene itself, as a URI."""
  return SCENE_URI_PREFIX + scenes_lib.scene_to_json(scene)


def example_scene(example: Mapping) -> scenes_lib.Scene | None:
  """The scene of a synthetic example (either task); None for real data (a file path)."""
  path = example["image_path"]
  if not path.startswith(SCENE_URI_PREFIX):
    return None
  return scenes_lib.scene_from_json(path[len(SCENE_URI_PREFIX):])


def example_facts(example: Mapping) -> dict:
  """`Scene.facts()` of a synthetic example, what the programmatic judge checks against."""
  scene = example_scene(example)
  if scene is None:
    raise ValueError(f"example {example.get('id')!r} is real data: its image is a file "
                     "with no scene facts")
  return scene.facts()


def example_image(example: Mapping, image_size: int = 56) -> PIL.Image.Image:
  """The example's image: its scene rendered at image_size, or the real image file."""
  scene = example_scene(example)
  if scene is None:
    return load_image(example["image_path"])
  return scenes_lib.render(scene, image_size)


# --- Questions and true answer statements (shared with `personalised`) -------


def sample_question(scene: scenes_lib.Scene, rng: np.random.Generator, open_prob: float,
                    open_questions: Sequence[str] = OPEN_QUESTIONS) -> tuple[dict | None, str]:
  """(query, question text): an open request (query None) or a world question (`make_question`)."""
  if rng.random() < open_prob:
    return None, text_lib.pick(rng, open_questions)
  query, question, _ = paired_lib.make_question(scene, rng)
  return query, question


def _counted(n: int, adjectives: Sequence[str], noun: str, digits: bool) -> str:
  """"two red circles", "one red circle", "no red circles" ("2 red circles" with digits)."""
  words = " ".join([*adjectives, noun if n == 1 else text_lib.plural(noun)])
  if n == 0:
    return f"no {words}"
  return f"{n if digits else text_lib.number_word(n)} {words}"


def describe_sentences(scene: scenes_lib.Scene, rng: np.random.Generator) -> list[str]:
  """The answer to an open request: every object grouped, sometimes one sentence each."""
  head = f"I see {text_lib.objects_summary(scene)} on a {scene.background} background."
  return [head] + (text_lib.object_sentences(scene, rng) if rng.random() < 0.5 else [])


def answer_sentences(scene: scenes_lib.Scene, query: Mapping | None, rng: np.random.Generator,
                     digits: bool = False) -> list[str]:
  """True statements that answer `query` (None: an open request) in full sentences.

  The statement repeats what was asked ("The star in the center is red.", not
  "Red."), so the answer reads on its own. digits: counts as "2", not "two".
  """
  if query is None:
    return describe_sentences(scene, rng)
  kind = query["type"]
  answer = paired_lib.answer_query(scene, query)
  ref = scenes_lib.reference_phrase
  cap = text_lib.capitalize
  if kind.startswith("count_"):
    n = int(answer)
    adjectives = [query[k] for k in ("size", "color") if k in query]
    noun = query.get("shape", "shape" if kind == "count_total" else "object")
    where = "in total" if kind == "count_total" else "in the image"
    return [f"There {'is' if n == 1 else 'are'} {_counted(n, adjectives, noun, digits)} {where}."]
  if kind in ("color_of", "size_of"):
    return [f"{cap(ref(query['target']))} is {answer}."]
  if kind == "shape_of":
    return [f"{cap(ref(query['target']))} is {text_lib.with_article(answer)}."]
  if kind == "where_is":
    return [f"{cap(ref(query['target']))} is {scenes_lib.REGION_PHRASES[answer]}."]
  if kind == "what_at":
    where = scenes_lib.REGION_PHRASES[query["region"]]
    if answer == paired_lib.NOTHING:
      return [f"There is nothing {where}."]
    return [f"{cap(where)} there is {answer}."]
  if kind == "exists":
    thing = " ".join(([query["color"]] if query["color"] else []) + [query["shape"]])
    if answer == "yes":
      return [f"Yes, there is {text_lib.with_article(thing)} in the image."]
    return [f"No, there is no {thing} in the image."]
  if kind == "bigger":
    a, b = ref(query["a"]), ref(query["b"])
    if answer == paired_lib.SAME_SIZE:
      return [f"{cap(a)} and {b} are the same size."]
    return [f"{cap(answer)} is bigger than {b if answer == a else a}."]
  if kind in ("largest", "smallest"):
    return [f"{cap(answer)} is the {kind} object."]
  if kind in ("left_of", "above"):
    relation = "to the left of" if kind == "left_of" else "above"
    a, b = ref(query["a"]), ref(query["b"])
    if answer == "yes":
      return [f"Yes, {a} is {relation} {b}."]
    return [f"No, {a} is not {relation} {b}."]
  if kind == "background":
    return [f"The background is {answer}."]
  raise ValueError(f"unknown question type {kind!r}; expected one of {paired_lib.QUESTION_TYPES}")


def _distinct_question(scene, rng, open_prob, asked):
  """A question unlike those in `asked` (a second open request would repeat the first answer)."""
  for _ in range(20):
    query, question = sample_question(scene, rng, open_prob)
    if query not in asked:
      return query, question
  raise ValueError("could not draw a question that differs from the earlier ones")


# --- Examples -----------------------------------------------------------------


def check_distribution(distribution: str) -> None:
  """Raises ValueError unless `distribution` is "in" or "out"."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def character_profile(character: characters_lib.Character) -> dict:
  """The character in the role-play schema: name and the benchmark's five profile fields."""
  profile = character.profile()
  return {"name": character.name, **{k: profile[k] for k in PROFILE_FIELDS}}


def roleplay_reply(character: characters_lib.Character, scene: scenes_lib.Scene,
                   query: Mapping | None, rng: np.random.Generator) -> str:
  """The ground-truth reply: the true answer and a knowledge line, in the character's voice."""
  sentences = answer_sentences(scene, query, rng) + [text_lib.pick(rng, KNOWLEDGE[character.name])]
  return characters_lib.voice(character, sentences, rng)


def roleplay_example(seed: int, index: int, distribution: str = "in",
                     config: RoleplayConfig = RoleplayConfig()) -> dict:
  """Example `index` of the role-play stream `seed` for one character distribution."""
  check_distribution(distribution)
  rng = np.random.default_rng([seed, ROLEPLAY_STREAM, DISTRIBUTIONS.index(distribution), index])
  names = (characters_lib.PAIRED_CHARACTERS if distribution == "in"
           else characters_lib.TEXT_ONLY_CHARACTERS)
  speaker = characters_lib.character(text_lib.pick(rng, names))
  scene = scenes_lib.sample_scene(rng, config.scene)
  exchanges = 2 if rng.random() < config.multi_turn_prob else 1
  dialogue, asked = [], []
  for _ in range(exchanges):
    query, question = _distinct_question(scene, rng, config.open_question_prob, asked)
    asked.append(query)
    if rng.random() < config.address_prob:
      question = f"{speaker.name}, {question[0].lower()}{question[1:]}"
    dialogue.append({"role": "user", "speaker": "human", "text": question})
    dialogue.append({"role": "assistant", "speaker": speaker.name,
                     "text": roleplay_reply(speaker, scene, query, rng)})
  return {
      "id": f"roleplay/{distribution}/{seed}/{index}",
      "character": character_profile(speaker),
      "image_path": scene_image_path(scene),
      "dialogue": dialogue,
      "distribution": distribution,
      "dialogue_type": "comment" if exchanges == 1 else "human-role",
      "scene": {k: "" for k in SCENE_INFO_FIELDS},
  }


def roleplay_examples(seed: int, n: int, distribution: str = "in",
                      config: RoleplayConfig = RoleplayConfig(), start: int = 0) -> list[dict]:
  """Examples start..start+n-1 of the role-play stream `seed` ("in" or "out" characters)."""
  check_distribution(distribution)
  return [roleplay_example(seed, i, distribution, config) for i in range(start, start + n)]


# --- Chat messages ------------------------------------------------------------


def reply_index(example: Mapping) -> int:
  """Index in the dialogue of the reply to produce: the last assistant turn."""
  turns = [i for i, t in enumerate(example["dialogue"]) if t["role"] == "assistant"]
  if not turns:
    raise ValueError(f"example {example.get('id')!r} has no assistant turn to reply with")
  return turns[-1]


def roleplay_reference(example: Mapping) -> str:
  """The ground-truth reply: the text of the last assistant turn."""
  return example["dialogue"][reply_index(example)]["text"]


def roleplay_question(example: Mapping) -> str:
  """The user turn the reply answers (the last one before it)."""
  last = reply_index(example)
  users = [t for t in example["dialogue"][:last] if t["role"] == "user"]
  if not users:
    raise ValueError(f"example {example.get('id')!r} has no user turn before its reply")
  return users[-1]["text"]


def roleplay_system_prompt(character: Mapping) -> str:
  """The system prompt: play the character, whose profile follows, truthfully about the image."""
  name = character["name"]
  profile = "\n".join(f"{k.capitalize()}: {character[k]}" for k in PROFILE_FIELDS)
  return (f"You are {name}. Stay in character as {name} for the whole conversation: speak in "
          f"{name}'s voice, draw on {name}'s profile below, and describe the image truthfully.\n"
          f"{profile}")


def roleplay_messages(example: Mapping, image=None, include_reply: bool = False) -> list[dict]:
  """OpenAI-style chat messages for `Processor`: system profile, the turns before the reply.

  The first user turn carries the image item ({"type": "image"}, with
  "image": image when given; otherwise pass the image to the processor).
  User turns spoken by another character (MMRole inter-role) are prefixed
  with the speaker's name. include_reply: end with the reference reply (SFT).
  """
  last = reply_index(example)
  turns = example["dialogue"][:last + 1 if include_reply else last]
  messages = [{"role": "system", "content": roleplay_system_prompt(example["character"])}]
  image_item = {"type": "image"} if image is None else {"type": "image", "image": image}
  placed = False
  for turn in turns:
    if turn["role"] == "assistant":
      messages.append({"role": "assistant", "content": turn["text"]})
      continue
    text = turn["text"] if turn["speaker"] == "human" else f"{turn['speaker']}: {turn['text']}"
    content = ([] if placed else [image_item]) + [{"type": "text", "text": text}]
    placed = True
    messages.append({"role": "user", "content": content})
  if not placed:
    raise ValueError(f"example {example.get('id')!r} has no user turn to show the image in")
  return messages
