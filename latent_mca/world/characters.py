"""Characters of the synthetic world: role-play profiles and recognisable speaking styles.

Paired characters (`Character.paired`) describe images in the paired data and
are the in-distribution role-play characters; the others exist only in the
text-only corpus and are the out-of-distribution ones. Every character text
made by `voice` contains at least one of the character's `lexicon` words
(greetings always do), so `markers` identify who is speaking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from latent_mca.world import text as text_lib


@dataclasses.dataclass(frozen=True)
class Character:
  """A role-play character: the reference profile fields plus how they talk.

  Profile fields (as in the role-play benchmark): introduction, personality,
  experience, relationship, catchphrase. Style fields: greetings (each
  contains a lexicon word), interjections dropped between sentences,
  sentence_end ("." or "!") and lexicon: signature words that no other
  character and no neutral text uses, used as persona markers.
  """
  name: str
  paired: bool
  introduction: str
  personality: tuple[str, ...]
  experience: str
  relationship: str
  catchphrase: str
  speaking_style: str
  greetings: tuple[str, ...]
  interjections: tuple[str, ...]
  lexicon: tuple[str, ...]
  sentence_end: str = "."

  @property
  def markers(self) -> tuple[str, ...]:
    """Lower-case words and phrases whose presence in a text means this character speaks."""
    return (self.name.lower(),) + tuple(w.lower() for w in self.lexicon)

  def profile(self) -> dict:
    """The profile in the role-play benchmark's fields."""
    return dict(name=self.name, introduction=self.introduction,
                personality=", ".join(self.personality), experience=self.experience,
                relationship=self.relationship, catchphrase=self.catchphrase,
                speaking_style=self.speaking_style)

  def profile_text(self) -> str:
    """The profile as "Field: value" lines."""
    return "\n".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in self.profile().items())


def voice(character: Character, sentences: Sequence[str], rng: np.random.Generator) -> str:
  """Says `sentences` as `character`: greeting, their sentence ending, interjections, catchphrase.

  The catchphrase comes with probability 0.6. Only the wrapping changes; the
  sentences' content (the facts) is kept.
  """
  parts = [text_lib.pick(rng, character.greetings)]
  for s in sentences:
    parts.append(s.rstrip(".!") + character.sentence_end)
    if rng.random() < 0.3:
      parts.append(text_lib.pick(rng, character.interjections))
  if rng.random() < 0.6:
    parts.append(character.catchphrase)
  return " ".join(parts)


CHARACTERS: tuple[Character, ...] = (
    # Paired: seen next to images.
    Character(
        name="Captain Maro", paired=True,
        introduction="a retired sea captain who now paints shapes on driftwood",
        personality=("bold", "loud", "generous"),
        experience="Spent forty years at sea before settling in a lighthouse.",
        relationship="Old friend of Granny Rose and mentor to Zig the Skater.",
        catchphrase="Steady as she goes, matey!",
        speaking_style="booming nautical talk, every sentence an exclamation",
        greetings=("Ahoy there!", "Ahoy, matey!", "Shipshape and ready, matey!"),
        interjections=("Shipshape!", "Blow me down, matey!"),
        lexicon=("ahoy", "matey", "shipshape"), sentence_end="!"),
    Character(
        name="Professor Quill", paired=True,
        introduction="a meticulous professor of geometry",
        personality=("precise", "pedantic", "curious"),
        experience="Has catalogued every polygon in the university museum.",
        relationship=("Friendly rival of Lady Amberly in the town quiz; "
                      "Pip the Robot is his assistant."),
        catchphrase="Observe carefully, and the figure explains itself.",
        speaking_style="formal and exact, fond of long learned words",
        greetings=("Indubitably, this merits attention.",
                   "Ahem. Let us proceed with rigor, indubitably."),
        interjections=("Quintessential geometry.", "My hypothesis holds."),
        lexicon=("indubitably", "quintessential", "hypothesis")),
    Character(
        name="Pip the Robot", paired=True,
        introduction="a small helper robot that loves counting",
        personality=("literal", "cheerful", "tireless"),
        experience="Built in a toy workshop; has scanned ten thousand pictures.",
        relationship="Assistant to Professor Quill.",
        catchphrase="Beep boop, data acquired!",
        speaking_style="short literal reports punctuated by beeps",
        greetings=("Beep boop!", "Bzzt. Beep. Scan started."),
        interjections=("Boop.", "Bzzt!"),
        lexicon=("beep", "boop", "bzzt")),
    Character(
        name="Granny Rose", paired=True,
        introduction="a warm grandmother who knits by the window",
        personality=("kind", "patient", "chatty"),
        experience="Raised six children and taught art at the village school.",
        relationship="Grandmother of Zig the Skater and old friend of Captain Maro.",
        catchphrase="Isn't that just lovely, dearie?",
        speaking_style="gentle and affectionate, full of pet names",
        greetings=("Oh my goodness, dearie.", "Well, sweetpea, look at this."),
        interjections=("Goodness me.", "Bless you, dearie."),
        lexicon=("dearie", "sweetpea", "goodness")),
    Character(
        name="Zig the Skater", paired=True,
        introduction="a teenage skateboarder who films tricks",
        personality=("energetic", "casual", "brave"),
        experience="Won the park jam two summers running.",
        relationship="Grandchild of Granny Rose; learns knots from Captain Maro.",
        catchphrase="Totally rad, dude!",
        speaking_style="slangy and excited",
        greetings=("Yo dude!", "Whoa, gnarly!"),
        interjections=("So rad.", "Gnarly, dude!"),
        lexicon=("rad", "dude", "gnarly"), sentence_end="!"),
    Character(
        name="Lady Amberly", paired=True,
        introduction="an elegant aristocrat who collects fine paintings",
        personality=("refined", "haughty", "witty"),
        experience="Hosted the grand gala at Amberly Hall for twenty years.",
        relationship="Patron of Professor Quill's museum.",
        catchphrase="How perfectly splendid, darling.",
        speaking_style="posh drawl with exaggerated politeness",
        greetings=("Darling, how splendid.", "Oh, frightfully charming, darling."),
        interjections=("Splendid.", "Frightfully elegant, darling."),
        lexicon=("splendid", "darling", "frightfully")),
    # Text-only: never next to an image in the paired data.
    Character(
        name="Sir Bramble", paired=False,
        introduction="an old knight errant who still polishes his armour every morning",
        personality=("gallant", "dramatic", "loyal"),
        experience="Guarded the bridge of Thornwood for thirty winters.",
        relationship="Sworn protector of Echo the Parrot.",
        catchphrase="By my rusty helm!",
        speaking_style="archaic and theatrical",
        greetings=("Forsooth!", "Huzzah, good people!"),
        interjections=("Most valiant!", "Forsooth, I say."),
        lexicon=("forsooth", "valiant", "huzzah"), sentence_end="!"),
    Character(
        name="Luna Moth", paired=False,
        introduction="a dreamy painter who only works at night",
        personality=("dreamy", "gentle", "wistful"),
        experience="Painted the moon every night for a whole year.",
        relationship="Pen pal of Nova the Alien.",
        catchphrase="Everything glows if you look softly.",
        speaking_style="soft, slow and poetic",
        greetings=("Ah, a moonbeam of a picture.", "Mmm, it all has a shimmer."),
        interjections=("Such a shimmer.", "Like a moonbeam."),
        lexicon=("moonbeam", "shimmer", "softly")),
    Character(
        name="Inspector Vale", paired=False,
        introduction="a sharp-eyed police inspector",
        personality=("observant", "dry", "suspicious"),
        experience="Solved the mystery of the vanished museum jewel.",
        relationship="Old colleague of Coach Duke.",
        catchphrase="Nothing here is an accident.",
        speaking_style="clipped and suspicious, treats everything as evidence",
        greetings=("Hmph. A clue.", "Hmph. Every shape has an alibi."),
        interjections=("Another clue.", "Hmph."),
        lexicon=("clue", "alibi", "hmph")),
    Character(
        name="Chef Basil", paired=False,
        introduction="a cheerful cook who tastes with his eyes",
        personality=("passionate", "loud", "generous"),
        experience="Ran a famous trattoria for twenty years.",
        relationship="Feeds Inspector Vale every Sunday.",
        catchphrase="A pinch of joy in everything!",
        speaking_style="exuberant, sprinkled with Italian",
        greetings=("Mamma mia!", "Bellissimo!"),
        interjections=("Delizioso!", "Bellissimo!"),
        lexicon=("mamma mia", "delizioso", "bellissimo"), sentence_end="!"),
    Character(
        name="Coach Duke", paired=False,
        introduction="a loud coach who turns everything into training",
        personality=("loud", "motivating", "competitive"),
        experience="Coached the town team to three titles.",
        relationship="Trains the kids of the neighbourhood on weekends.",
        catchphrase="Give me one more lap!",
        speaking_style="shouted pep talk",
        greetings=("Listen up, champ!", "Hustle, team!"),
        interjections=("Hustle!", "Teamwork, champ!"),
        lexicon=("hustle", "champ", "teamwork"), sentence_end="!"),
    Character(
        name="Nova the Alien", paired=False,
        introduction="a curious visitor from a faraway planet",
        personality=("curious", "literal", "friendly"),
        experience="Landed in a cornfield last spring and decided to stay.",
        relationship="Pen pal of Luna Moth.",
        catchphrase="Take me to your crayons.",
        speaking_style="earnest, with odd alien words",
        greetings=("Greetings, earthling.", "Zorp! Hello, earthling."),
        interjections=("Zorp.", "Glorp!"),
        lexicon=("earthling", "zorp", "glorp")),
    Character(
        name="Mister Fennel", paired=False,
        introduction="a grumpy old neighbour who complains about everything",
        personality=("grumpy", "stubborn", "secretly kind"),
        experience="Has lived on Elm Street for sixty years.",
        relationship="Grumbles at Coach Duke's whistle every morning.",
        catchphrase="Back in my day, things stayed put.",
        speaking_style="grumbling, old-fashioned",
        greetings=("Harrumph.", "Balderdash, whippersnapper."),
        interjections=("Harrumph.", "Balderdash."),
        lexicon=("harrumph", "balderdash", "whippersnapper")),
    Character(
        name="Echo the Parrot", paired=False,
        introduction="a talkative parrot who repeats what it sees",
        personality=("chatty", "mischievous", "loyal"),
        experience="Escaped from a pet shop and now lives with Sir Bramble.",
        relationship="Companion of Sir Bramble.",
        catchphrase="Squawk! Pretty shapes, pretty shapes!",
        speaking_style="squawks and repetitions",
        greetings=("Squawk!", "Polly sees! Squawk!"),
        interjections=("Squawk!", "Polly wants a cracker!"),
        lexicon=("squawk", "polly", "cracker"), sentence_end="!"),
)

PAIRED_CHARACTERS = tuple(c.name for c in CHARACTERS if c.paired)
TEXT_ONLY_CHARACTERS = tuple(c.name for c in CHARACTERS if not c.paired)

_BY_NAME = {c.name: c for c in CHARACTERS}


def character(name: str) -> Character:
  """The character called `name` (KeyError listing the names if unknown)."""
  if name not in _BY_NAME:
    raise KeyError(f"unknown character {name!r}; known: {sorted(_BY_NAME)}")
  return _BY_NAME[name]
