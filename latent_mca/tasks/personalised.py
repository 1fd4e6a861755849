"""Personalised dialogue on the synthetic world, in `latent_mca.data.real`'s PCogAlignBench schema.

A person (an individual) holds one role at each of a few locations ("Child at
Home; Student at School"). In a situation at one of them they show the
assistant a picture (a scene: where they saw it names the place, e.g. "the
fridge drawing") and ask about it. The reference reply answers with true
statements from `Scene.facts()` and is adapted to the role they hold at that
location: it addresses that role, gives advice for what they want to do
(PCogAlign's "body behavior") and supports how they want to feel ("mind
feelings"), in a register that suits them (a child gets simple words and
counts in words, an engineer digits). Another role in the same situation
gets different content. In-distribution role sets (subset "HCMAS") and
out-of-distribution ones (subset "HCSHR") share no role and no location.

Keys are exactly those `read_pcogalign` yields:

    {"id": "personalised/<in|out>/<seed>/<index>", "subset": "HCMAS" | "HCSHR",
     "individual": str, "role_set": [{"location", "role"}],
     "situation": {"location", "image_description", "eval_help"},
     "image_path": the scene URI (see `roleplay.example_scene`),
     "query": str, "reference_reply": str}
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import numpy as np

from latent_mca.tasks import roleplay
from latent_mca.world import paired as paired_lib
from latent_mca.world import scenes as scenes_lib
from latent_mca.world import text as text_lib

PERSONALISED_STREAM = 4
SUBSETS = types.MappingProxyType({"in": "HCMAS", "out": "HCSHR"})

OPEN_QUERIES = ("What does it show?", "Can you describe it for me?", "What is in this picture?")


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a situation happens: how a reply says it ("at home"), where pictures are seen there."""
  name: str
  phrase: str
  items: tuple[str, ...]


LOCATIONS: Mapping[str, Location] = types.MappingProxyType({loc.name: loc for loc in (
    Location("Home", "at home", ("fridge drawing", "kitchen placemat")),
    Location("School", "at school", ("classroom poster", "worksheet")),
    Location("Office", "at the office", ("meeting slide", "office noticeboard")),
    Location("Studio", "in the studio", ("easel sketch", "studio print")),
    Location("Hospital", "at the hospital", ("waiting room poster", "clinic leaflet")),
    Location("Airport", "at the airport", ("terminal sign", "lounge poster")),
    Location("Farm", "on the farm", ("feed sack label", "tractor decal")),
    Location("Library", "in the library", ("picture book page", "library display card")),
)})


@dataclasses.dataclass(frozen=True)
class Role:
  """A role a person holds at one location, and what a reply adapted to it contains.

  register: "simple" (short sentences, counts in words), "everyday" or
  "expert" (counts in digits). need / body_goal / mind_goal: what the person
  wants, written into the situation's eval_help. openers address the role
  ({where}: the location phrase), actions advise what to do, feelings
  support how to feel; each contains one of the matching markers
  (role_markers, action_markers, feeling_markers), words no other role uses,
  which is how the programmatic judge tells whom a reply was written for.
  """
  name: str
  location: str
  register: str
  need: str
  body_goal: str
  mind_goal: str
  openers: tuple[str, ...]
  actions: tuple[str, ...]
  feelings: tuple[str, ...]
  role_markers: tuple[str, ...]
  action_markers: tuple[str, ...]
  feeling_markers: tuple[str, ...]


ROLES: tuple[Role, ...] = (
    # In-distribution (HCMAS): Home, School, Office, Studio.
    Role("Child", "Home", "simple", "a simple, playful answer",
         "to count or copy the picture along with the answer", "to feel proud and have fun",
         ("Hey buddy, what a picture {where}!", "Hi kiddo, let us look at it {where}."),
         ("Touch each part with your finger as we go.", "Grab a crayon and copy it on paper."),
         ("I am so proud of you for asking!", "Hooray, you did great!"),
         ("buddy", "kiddo"), ("finger", "crayon"), ("proud", "hooray")),
    Role("Parent", "Home", "everyday", "a clear answer that fits family life",
         "to put the picture somewhere the family can enjoy it", "to feel relaxed at home",
         ("Here is a nice picture for the family {where}.",
          "The kids will enjoy this picture {where}."),
         ("Pin it to the fridge with a magnet.", "Put it on the fridge door with a magnet."),
         ("Take a moment to relax and cherish it.", "Relax and cherish this little moment."),
         ("family", "kids"), ("fridge", "magnet"), ("cherish", "relax")),
    Role("Student", "School", "everyday", "an answer that helps with school work",
         "to write the answer down for class", "to feel confident",
         ("This could help with your homework {where}.",
          "Your classmates will ask about this {where}."),
         ("Jot the answer down in your notebook.", "Write it in your notebook right away."),
         ("You can feel confident about it.", "You will ace it, so stay confident."),
         ("homework", "classmates"), ("notebook", "jot"), ("confident", "ace")),
    Role("Teacher", "School", "expert", "an answer ready to teach with",
         "to prepare a lesson from the picture", "to feel prepared and unhurried",
         ("This makes a neat lesson for your pupils {where}.",
          "Your pupils could learn from this lesson {where}."),
         ("Sketch it on the whiteboard before class.", "Put it on a handout for the class."),
         ("You are well prepared, so take it unhurried.", "Go unhurried; you are prepared."),
         ("lesson", "pupils"), ("whiteboard", "handout"), ("prepared", "unhurried")),
    Role("Engineer", "Office", "expert", "a precise, technical answer",
         "to record the result", "to feel reassured that it is under control",
         ("For your layout specification {where}, here is the readout.",
          "Here is the readout for the layout review {where}."),
         ("Log the result in your spreadsheet.", "Enter it in the spreadsheet log."),
         ("Everything is under control, so feel reassured.",
          "You can feel reassured; it is under control."),
         ("specification", "readout"), ("spreadsheet", "log"), ("reassured", "control")),
    Role("Manager", "Office", "everyday", "a short answer to brief the team with",
         "to pass the result on", "to stay composed",
         ("Here is the summary for your agenda {where}.",
          "A quick item for the stakeholders {where}."),
         ("Add it to a memo and delegate the follow-up.", "Send a memo and delegate the details."),
         ("Stay composed; it is an easy item.", "Breathe and stay composed."),
         ("agenda", "stakeholders"), ("memo", "delegate"), ("composed", "breathe")),
    Role("Painter", "Studio", "expert", "an answer about composition",
         "to paint from the picture", "to feel inspired",
         ("What a composition for your palette {where}.",
          "Here is a composition worth a palette {where}."),
         ("Try it on canvas with a broad brush.", "Block it onto a canvas with a flat brush."),
         ("Let it keep you inspired.", "May it be your muse and keep you inspired."),
         ("composition", "palette"), ("canvas", "brush"), ("inspired", "muse")),
    Role("Apprentice", "Studio", "simple", "an answer to learn from",
         "to practise drawing the picture", "to feel encouraged",
         ("A good study for an apprentice {where}.",
          "Here is a task for your apprenticeship {where}."),
         ("Copy it into your sketchbook to practise.", "Practise it twice in your sketchbook."),
         ("Be patient; you should feel encouraged.", "Patience pays, so feel encouraged."),
         ("apprentice", "apprenticeship"), ("sketchbook", "practise"), ("encouraged", "patience")),
    # Out-of-distribution (HCSHR): Hospital, Airport, Farm, Library.
    Role("Patient", "Hospital", "simple", "a gentle, calm answer",
         "to rest while looking at the picture", "to feel soothed",
         ("Here is something gentle for your recovery {where}.",
          "A calm picture for the ward {where}."),
         ("Look at it from your bedside and rest.", "Rest by the bedside and take your time."),
         ("It is soothing, so let your worries go.", "Let this soothing picture calm you."),
         ("recovery", "ward"), ("bedside", "rest"), ("soothing", "worries")),
    Role("Nurse", "Hospital", "expert", "a quick, exact answer between tasks",
         "to note it and get back to work", "to take a short breather",
         ("A quick check between shifts {where}.", "Here is the check for your shift {where}."),
         ("Note it on your clipboard.", "Add it to the clipboard chart."),
         ("Take a breather; your care is appreciated.",
          "You deserve a breather; you are appreciated."),
         ("shift", "shifts"), ("clipboard", "chart"), ("breather", "appreciated")),
    Role("Pilot", "Airport", "expert", "a precise answer like a briefing",
         "to add it to the pre-flight routine", "to feel focused",
         ("Briefing for the cockpit crew {where}.", "Here is your cockpit briefing {where}."),
         ("Tick it off on your checklist.", "Mark it on the checklist before take-off."),
         ("Stay focused; clear skies ahead.", "Clear skies, so stay focused."),
         ("cockpit", "briefing"), ("checklist", "tick"), ("focused", "skies")),
    Role("Passenger", "Airport", "everyday", "a friendly answer while travelling",
         "to pass the wait pleasantly", "to unwind before the journey",
         ("Something to look at before your journey {where}.",
          "A little distraction on your journey {where}."),
         ("Keep your luggage close while you look.",
          "Take a seat by your luggage and enjoy the view."),
         ("Unwind and take it leisurely.", "Time to unwind, leisurely."),
         ("journey", "distraction"), ("luggage", "seat"), ("unwind", "leisurely")),
    Role("Farmer", "Farm", "everyday", "a practical, down-to-earth answer",
         "to get on with the farm work", "to feel content with the day",
         ("A break from the harvest {where}.", "Here is a pause in the crops season {where}."),
         ("Check it again after you fix the fence.", "Show it to the farmhands by the fence."),
         ("Be content; the day is going well.", "A content day, well earned."),
         ("harvest", "crops"), ("fence", "farmhands"), ("content", "earned")),
    Role("Librarian", "Library", "expert", "a well-ordered, exact answer",
         "to catalogue the picture", "to keep things quiet and orderly",
         ("For your catalogue records {where}.", "An item for the shelves and records {where}."),
         ("File it on an index card.", "Archive it on an index card."),
         ("All quiet and orderly.", "Keep it orderly and quiet."),
         ("catalogue", "shelves"), ("index", "archive"), ("orderly", "quiet")),
    Role("Reader", "Library", "simple", "a cosy, story-like answer",
         "to keep reading with the picture in mind", "to feel cosy and delighted",
         ("A new chapter for a bookworm {where}.",
          "Here is a chapter treat for a bookworm {where}."),
         ("Slip a bookmark in and borrow the book.", "Borrow it and keep your bookmark there."),
         ("Get cosy and be delighted.", "How delightful and cosy."),
         ("bookworm", "chapter"), ("bookmark", "borrow"), ("cosy", "delighted")),
)

_ROLES_BY_KEY = {(r.name, r.location): r for r in ROLES}

# Individuals: fixed role sets (location -> role), as the benchmark's individuals.
INDIVIDUALS: Mapping[str, tuple[tuple[str, str], ...]] = types.MappingProxyType({
    "HCMAS-01": (("Home", "Child"), ("School", "Student")),
    "HCMAS-02": (("Home", "Parent"), ("Office", "Engineer")),
    "HCMAS-03": (("Home", "Parent"), ("School", "Teacher")),
    "HCMAS-04": (("School", "Student"), ("Studio", "Apprentice")),
    "HCMAS-05": (("Office", "Manager"), ("Studio", "Painter")),
    "HCMAS-06": (("Home", "Child"), ("Studio", "Apprentice")),
    "HCMAS-07": (("Home", "Parent"), ("School", "Teacher"), ("Studio", "Painter")),
    "HCMAS-08": (("Office", "Engineer"), ("Studio", "Painter")),
    "HCSHR-01": (("Hospital", "Patient"), ("Library", "Librarian")),
    "HCSHR-02": (("Hospital", "Nurse"), ("Airport", "Passenger")),
    "HCSHR-03": (("Farm", "Farmer"), ("Library", "Reader")),
    "HCSHR-04": (("Airport", "Pilot"), ("Farm", "Farmer")),
    "HCSHR-05": (("Airport", "Passenger"), ("Library", "Reader"), ("Hospital", "Patient")),
})


def role(name: str, location: str) -> Role:
  """The role `name` held at `location` (KeyError listing the known pairs if unknown)."""
  if (name, location) not in _ROLES_BY_KEY:
    raise KeyError(f"unknown role {name!r} at {location!r}; known: {sorted(_ROLES_BY_KEY)}")
  return _ROLES_BY_KEY[(name, location)]


def individuals(distribution: str) -> tuple[str, ...]:
  """The individuals of one distribution ("in": HCMAS role sets, "out": HCSHR ones)."""
  roleplay.check_distribution(distribution)
  return tuple(k for k in INDIVIDUALS if k.startswith(SUBSETS[distribution]))


@dataclasses.dataclass(frozen=True)
class PersonalisedConfig:
  """What the personalised examples draw; open_question_prob as in `RoleplayConfig`."""
  scene: scenes_lib.SceneConfig = scenes_lib.SceneConfig()
  open_question_prob: float = 0.25

  def __post_init__(self):
    if not 0.0 <= self.open_question_prob <= 1.0:
      raise ValueError(f"PersonalisedConfig.open_question_prob must be in [0, 1], "
                       f"got {self.open_question_prob}")


def primary_role(example: Mapping) -> Role:
  """The role the person holds where the situation happens (the one a reply must suit)."""
  location = example["situation"]["location"]
  names = [r["role"] for r in example["role_set"] if r["location"] == location]
  if len(names) != 1:
    raise ValueError(f"example {example.get('id')!r}: the role set has {len(names)} roles at "
                     f"the situation's location {location!r}, not one")
  return role(names[0], location)


def personalised_reply(scene: scenes_lib.Scene, query: Mapping | None, person: Role,
                       rng: np.random.Generator) -> str:
  """The reference reply for `person`: address the role, true answer, advice, support."""
  opener = text_lib.pick(rng, person.openers).format(where=LOCATIONS[person.location].phrase)
  answer = roleplay.answer_sentences(scene, query, rng, digits=person.register == "expert")
  return " ".join([opener, *answer, text_lib.pick(rng, person.actions),
                   text_lib.pick(rng, person.feelings)])


def eval_help(person: Role) -> str:
  """What the person wanted from the reply, as PCogAlign's EvalHelp describes it."""
  where = LOCATIONS[person.location].phrase
  return (f"As a {person.name} {where}, I wanted {person.need}. Body behavior: I wanted "
          f"{person.body_goal}. Mind feelings: I wanted {person.mind_goal}.")


def personalised_example(seed: int, index: int, distribution: str = "in",
                         config: PersonalisedConfig = PersonalisedConfig()) -> dict:
  """Example `index` of the personalised stream `seed` for one role-set distribution."""
  roleplay.check_distribution(distribution)
  rng = np.random.default_rng(
      [seed, PERSONALISED_STREAM, roleplay.DISTRIBUTIONS.index(distribution), index])
  individual = text_lib.pick(rng, individuals(distribution))
  role_set = INDIVIDUALS[individual]
  location, role_name = role_set[int(rng.integers(len(role_set)))]
  person = role(role_name, location)
  scene = scenes_lib.sample_scene(rng, config.scene)
  query, question = roleplay.sample_question(scene, rng, config.open_question_prob, OPEN_QUERIES)
  item = text_lib.pick(rng, LOCATIONS[location].items)
  return {
      "id": f"personalised/{distribution}/{seed}/{index}",
      "subset": SUBSETS[distribution],
      "individual": individual,
      "role_set": [{"location": loc, "role": name} for loc, name in role_set],
      "situation": {"location": location,
                    "image_description": paired_lib.caption(scene, "plain", rng),
                    "eval_help": eval_help(person)},
      "image_path": roleplay.scene_image_path(scene),
      "query": f"I am looking at the {item}. {question}",
      "reference_reply": personalised_reply(scene, query, person, rng),
  }


def personalised_examples(seed: int, n: int, distribution: str = "in",
                          config: PersonalisedConfig = PersonalisedConfig(),
                          start: int = 0) -> list[dict]:
  """Examples start..start+n-1 of the personalised stream `seed` ("in" or "out" role sets)."""
  roleplay.check_distribution(distribution)
  return [personalised_example(seed, i, distribution, config) for i in range(start, start + n)]


def role_set_text(role_set) -> str:
  """The role set as the benchmark writes it: "Child at Home; Student at School"."""
  return "; ".join(f"{r['role']} at {r['location']}" for r in role_set)


def personalised_system_prompt(example: Mapping) -> str:
  """PCogAlign's role-set system prompt."""
  return f'You are a helpful assistant for a user who is "{role_set_text(example["role_set"])}".'


def personalised_messages(example: Mapping, image=None, include_reply: bool = False) -> list[dict]:
  """OpenAI-style chat messages for `Processor`: role-set system prompt, image + query.

  image: put into the image item when given (otherwise pass it to the
  processor). include_reply: end with the reference reply (SFT; it must be
  non-empty, which real data guarantees only in the golden test files).
  """
  image_item = {"type": "image"} if image is None else {"type": "image", "image": image}
  messages = [{"role": "system", "content": personalised_system_prompt(example)},
              {"role": "user", "content": [image_item, {"type": "text", "text": example["query"]}]}]
  if include_reply:
    if not example["reference_reply"]:
      raise ValueError(f"example {example.get('id')!r} has no reference reply")
    messages.append({"role": "assistant", "content": example["reference_reply"]})
  return messages
