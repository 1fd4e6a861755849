"""A programmatic judge for the synthetic dialogue tasks: the LLM judge's dimensions, computed.

`score_response(example, facts, response)` scores one reply 0..10 on every
dimension of its task: `ROLEPLAY_DIMENSIONS` (the names of
`judge.llm.DIMENSIONS`) for a role-play example, `PERSONALISED_DIMENSIONS`
(PCogAlignBench's five) for a personalised one. `facts` is the example's
`Scene.facts()` (`tasks.example_facts`). The reward is
`score_ratio(response scores, reference scores)`, the reference being the
example's ground-truth reply scored the same way, exactly as with the LLM
judge (`reward`, `rewards` for a group of rollouts, `judge` for both score
sets). Everything is a pure function of its arguments. It serves the
synthetic tasks (`latent_mca.tasks`) only: real benchmark data has no scene
facts and characters outside the world; score it with `judge.llm`.

Reading a reply
---------------
Text is lower-cased into words and split into sentences; questions (ending
in "?") assert nothing. An object mention is [determiner | number | "no"]
[size / colour adjectives] [shape or "object", "shape", "one"]: "two red
circles", "the small star", "a red one", "red". A region phrase ("in the top
left corner", "in the middle") attaches to the mention before it (or, when
none, the one after it). Mentions joined by a copula merge ("the red object
is a star", "the star in the center is not red"); joined by a relation they
form one relation claim ("X is to the left of / above / bigger than / the
same size as Y"); "X is the largest object" is a superlative claim; "nothing
in the center" an empty-region claim; a background colour word a background
claim. Every other mention claims that such objects exist: exactly n of them
with a number, none with "no" or a negation before it. `claim_holds` checks a
claim against the facts. A role-play character's set phrases (catchphrase,
greetings, interjections) are removed first: decoration, not content ("Give
me one more lap!" is no count).

The question is read with the same parser: its kind from its wording ("how
many", "what color", "where", "bigger", "largest", "left of", "above", "is
there", a region alone: "what is at ...", otherwise an open request to
describe the image), its objects from its mentions, its expected answer from
the facts.

Shared quantities
-----------------
- L, legibility in [0, 1], multiplies every dimension: (share of words that
  are English or the world's or the example's: full at 90%, 0 at 60%) x
  (word order: share of word-class bigrams the world's language attests
  (`world_bigrams`): full at 85%, 0 at 50%, so shuffled words fail) x
  (repetition: distinct 4-grams and distinct words; loops score 0). Empty,
  garbled, foreign, shuffled or looping replies get ~0 everywhere.
- Answer candidates: the values the reply gives for what was asked: counts
  of exactly the asked objects and bare numbers ("two in total"); the asked
  attribute of mentions that refer to the asked object, and lone adjectives
  of that kind; regions of the asked object and lone regions; yes / no
  (explicit, or a claim about the asked thing or relation); the object
  claimed bigger / largest / at the region; background words.
- addressed: 1 when the reply gives a candidate, right or wrong (for an open
  request: names an object by colour or shape), 0.2 when it only uses scene
  words, else 0. g = L x (0.1 + 0.9 addressed) gates the dimensions that
  content must carry: persona markers, knowledge, accuracy, relevance.
- precision: share of true claims and right yes / no answers.

Dimensions (role-play)
----------------------
- instruction_adherence: 10 / (number of distinct candidates) when the
  expected answer is among them (listing every value divides the credit), 1
  for a wrong answer, 0 for none; for an open request, 10 x the share of the
  scene's objects named truly with colour and shape. Times L x precision: the
  instruction is to answer truthfully.
- fluency: 10 x L x (0.5 + 0.5 x share of sentences starting with a capital)
  x min(1, words / 8) x min(1, 150 / words).
- coherency: 10 x L x (0.3 + 0.7 addressed) x 0.5^(inconsistencies: each
  answer candidate beyond the first ("two or three"), yes and no both,
  incompatible counts of the same objects within the reply or against the
  dialogue's earlier replies) x (1 - share of the reply's factual sentences
  that repeat one of its own).
- image_text_relevance: 10 x g x (share of colour / shape / background words,
  beyond those in the question, that are present in the scene) when the
  reply makes a claim about the image, else 0.
- accuracy: 10 x g x right / (right + 2 wrong) over every claim and yes / no
  answer (a wrong one costs twice what a right one earns); 0 without any.
  Listing everything makes many wrong claims.
- personality: 10 x g x purity x (0.6 + 0.4 style) x (0.3 if the reply steps
  out of the role, "as an AI", else 1); purity = own / (own + 2 foreign) over
  distinct markers found (the character's name, lexicon words and
  catchphrase vs those of other characters not named in the profile), 0
  without an own one; style = share of sentences ending in "!" for
  characters who exclaim, else 1.
- knowledge: 10 x g x min(1, distinct profile words used / 2), words of the
  introduction, experience and relationship (not names, scene words or
  function words); halved when the reply copies 5 words in a row of them.
- tone: 10 x g x purity x (0.5 + 0.3 [a catchphrase, greeting or
  interjection said verbatim] + 0.2 style).

Dimensions (personalised)
-------------------------
The primary role is the one held at the situation's location; "foreign"
markers are those of every other role, the person's other roles included.
- role_set_sensitivity / body_behavior_awareness / mind_feelings_awareness:
  10 x g x purity over the role's role / action / feeling markers.
- contextual_awareness: 0.5 adherence + 0.3 accuracy + 2 L [the situation's
  location named] (adherence and accuracy as for role-play).
- conversational_flow: fluency x (0.3 + 0.7 addressed) x (1 - share of
  repeated factual sentences) x, for "simple"-register roles, min(1, 14 /
  mean sentence length in words).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

from latent_mca.judge.llm import DIMENSIONS, PairwiseScores, score_ratio
from latent_mca.tasks import personalised as personalised_lib
from latent_mca.tasks import roleplay as roleplay_lib
from latent_mca.world import characters as characters_lib
from latent_mca.world import corpus as corpus_lib
from latent_mca.world import paired as paired_lib
from latent_mca.world import scenes as scenes_lib
from latent_mca.world import text as text_lib

ROLEPLAY_DIMENSIONS = tuple(DIMENSIONS)
# PCogAlignBench's evaluation dimensions (its rating prompt), with what each asks for.
PERSONALISED_DIMENSIONS: dict[str, str] = {
    "role_set_sensitivity": "tailored to the user's roles, above all the one held where they are",
    "body_behavior_awareness": "guidance that helps the user act as they want to",
    "mind_feelings_awareness": "support for the feelings the user wants to reach",
    "contextual_awareness": "answers the query correctly and fits the location and situation",
    "conversational_flow": "natural, concise, engaging language in a register that suits the user",
}

# --- Vocabulary -----------------------------------------------------------------

_COLOR = {c: c for c in scenes_lib.COLORS} | {"grey": "gray"}
_SHAPE = {s: s for s in scenes_lib.SHAPES} | {text_lib.plural(s): s for s in scenes_lib.SHAPES}
_SIZE = {z: z for z in scenes_lib.SIZES} | {"big": "large", "tiny": "small"}
_GENERIC = frozenset({"object", "objects", "shape", "shapes", "thing", "things", "figure",
                      "figures", "one", "ones"})
_NUMBER = {w: i for i, w in enumerate(text_lib.NUMBER_WORDS)} | {"single": 1}
_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "these", "those", "any", "some",
                          "another", "each", "every"})
_NEGATORS = frozenset({"not", "never", "isn", "aren", "wasn", "weren", "doesn", "don", "didn",
                       "cannot", "nor"})
_COPULAS = frozenset({"is", "are", "was", "were", "be", "looks", "look", "seems", "appears"})
_ADVERBS = frozenset({"also", "both", "all", "really", "definitely", "clearly", "quite", "very",
                      "surely", "certainly"})
# Phrases no character says: an assistant stepping out of the role.
_OUT_OF_CHARACTER = tuple(f" {p} " for p in (
    "as an ai", "language model", "i am an assistant", "i am an ai", "ai assistant",
    "i cannot role play", "as a helpful assistant"))
_YES = frozenset({"yes", "yeah", "yep", "aye"})
_NO = frozenset({"no", "nope", "nay"})
_ROWS = {"top": 0, "upper": 0, "middle": 1, "center": 1, "centre": 1, "bottom": 2, "lower": 2}
_COLS = {"left": 0, "middle": 1, "center": 1, "centre": 1, "right": 2}
_CENTER = frozenset({"center", "centre", "middle"})
_REGION_PREPOSITIONS = frozenset({"in", "at", "on", "near", "from", "toward", "towards"})
_REGION_NOUNS = frozenset({"corner", "cell", "area", "part", "side", "region", "section", "spot"})
_SUPERLATIVES = {"largest": "largest", "biggest": "largest", "smallest": "smallest",
                 "tiniest": "smallest"}
_EMPTY_WORDS = frozenset({"nothing", "empty"})
# A number alone is an answer ("I count two.", "two in total"), not "two winters".
_AFTER_BARE_NUMBER = frozenset({",", ":", "in", "here", "there", "altogether", "total", "overall"})
_BACKGROUNDS = frozenset(scenes_lib.BACKGROUNDS)
_SCENE_WORDS = (frozenset(_COLOR) | frozenset(_SHAPE) | frozenset(_SIZE) | _BACKGROUNDS
                | frozenset(_ROWS) | frozenset(_COLS))
_CONFLICT = "<conflict>"  # an attribute said two ways: matches no object

_TOKEN = re.compile(r"[^\W\d_]+|\d+|[.!?;,:]")
_WORD = re.compile(r"[^\W\d_]+|\d+")
_SENTENCE_END = frozenset(".!?;")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")

# Function words and the everyday words replies are built from; with the
# world's own texts below they decide which words count as English.
_COMMON_WORDS = frozenset("""
a about above across after again against ago all almost along already also although always am
among an and another answer any anything are aren around as ask asked asking at away back be
because been before behind being below beneath beside besides best better between beyond big
bigger biggest both bottom but by call came can cannot center centre certainly chart check clear
clearly close color colors colour colours come comes corner could count counted counting d day
dear definitely describe described description did didn different do does doesn don done down
each either else empty enjoy enough even ever every everything exactly eye eyes far few figure
figures find fine first for found from front fun further get give given go goes going good got
great had has have having he hello her here hers him his how i if image images in inside into is
isn it its itself just keep kind know large larger largest last least left less let lets like
little ll look looking looks lot lovely lower m made make many may me medium middle might mine
more most much must my near nearly need never new next nice no none nor not nothing now number
of off oh ok okay on once one only onto or other others our out over own part picture pictures
place placed please point positioned pretty put quite rather re really right s said same saw say
says see seen seems set shape shapes she should show shows side sit sits size sized small smaller
smallest so some something spot still such sure surely t take tell than thank thanks that the
their them then there these they thing things think this those though three through tiny tiniest
to today together too top total two under up upon upper us ve very view want was way we well
were what when where which while who whole why will with within without would yes yet you your
yours
""".split())


def _words(text: str) -> list[str]:
  """Lower-case words (letters of any script, or digit runs)."""
  return _WORD.findall(text.lower())


def _padded(text: str) -> str:
  """Words joined by single spaces and padded, so " m " finds a whole-word marker m."""
  return " " + " ".join(_words(text)) + " "


def _texts_of(value) -> list[str]:
  """Every string inside nested tuples / dicts / dataclasses."""
  if isinstance(value, str):
    return [value]
  if dataclasses.is_dataclass(value):
    value = dataclasses.asdict(value)
  if isinstance(value, Mapping):
    value = list(value.values())
  if isinstance(value, (list, tuple)):
    return [s for v in value for s in _texts_of(v)]
  return []


_WORLD_LEXICON = frozenset(
    _COMMON_WORDS | _SCENE_WORDS | frozenset(_NUMBER) | frozenset(_GENERIC)
    | {w for s in _texts_of((characters_lib.CHARACTERS, roleplay_lib.KNOWLEDGE,
                             roleplay_lib.OPEN_QUESTIONS, personalised_lib.ROLES,
                             personalised_lib.LOCATIONS, personalised_lib.OPEN_QUERIES,
                             corpus_lib.STYLES, corpus_lib.TOPICS,
                             tuple(scenes_lib.REGION_PHRASES.values())))
       for w in _words(s)})

# Word classes for word-order statistics: "two red stars" and "five blue circles" read alike.
_CLASSES = ({w: "<c>" for w in _COLOR} | {w: "<s>" for w in _SHAPE} | {w: "<z>" for w in _SIZE}
            | {w: "<n>" for w in _NUMBER} | {w: "<b>" for w in _BACKGROUNDS})


def _bigrams(text: str) -> list[tuple[str, str]]:
  """Adjacent token pairs over word classes, "|" marking sentence ends and the start."""
  toks = ["|"]
  for tok in _TOKEN.findall(text.lower()):
    toks.append("|" if tok in _SENTENCE_END else "," if tok in ",:" else "<n>" if tok.isdigit()
                else _CLASSES.get(tok, tok))
  return list(zip(toks, toks[1:]))


@functools.lru_cache(maxsize=1)
def world_bigrams() -> frozenset:
  """Word-class bigrams of the world's language: its templates and a sample of everything it says.

  Built once per process (about a second) from the task replies and
  questions, the paired captions and the text-only corpus; a reply whose
  word order is mostly unattested is word salad, however English its words.
  """
  texts = _texts_of((characters_lib.CHARACTERS, roleplay_lib.KNOWLEDGE,
                     tuple(scenes_lib.REGION_PHRASES.values())))
  for distribution in roleplay_lib.DISTRIBUTIONS:
    for example in roleplay_lib.roleplay_examples(0, 150, distribution):
      texts += [t["text"] for t in example["dialogue"]]
    for example in personalised_lib.personalised_examples(0, 150, distribution):
      texts += [example["query"], example["reference_reply"]]
  texts += [s["text"] for s in paired_lib.paired_samples(0, 300)]
  texts += [s["text"] for s in corpus_lib.text_only_samples(0, 300)]
  return frozenset(b for t in texts for b in _bigrams(t))


# Words that carry no knowledge of a profile.
_KNOWLEDGE_STOPWORDS = _COMMON_WORDS | frozenset("old new now who whom whose since".split())

# --- Parsing --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claim:
  """One checkable statement about the scene (see `claim_holds` for what makes it true).

  kind: "objects" (objects with `attrs`, in `region` if set, exist; exactly
  `count` of them when count is set; none when negated), "empty" (nothing in
  `region`), "relation" (the subject (attrs, region) is `relation` the other
  (other_attrs, other_region): left_of, right_of, above, below, bigger,
  smaller, same_size; negated: is not), "superlative" (the subject is the
  `relation` "largest" / "smallest" object), "background" (the background is
  attrs["background"]). attrs are sorted (name, value) pairs.
  """
  kind: str
  attrs: tuple[tuple[str, str], ...] = ()
  region: str | None = None
  count: int | None = None
  negated: bool = False
  relation: str | None = None
  other_attrs: tuple[tuple[str, str], ...] = ()
  other_region: str | None = None


@dataclasses.dataclass
class _Mention:
  """An object mention in one sentence: tokens [start, end)."""
  attrs: dict
  start: int
  end: int
  count: int | None
  determiner: str | None
  noun: bool
  region: str | None = None
  negated: bool = False
  merged: bool = False  # folded into the mention before it ("... is red")
  related: bool = False  # part of a relation or superlative claim

  def key(self) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(self.attrs.items()))


@dataclasses.dataclass
class _Reading:
  """What a text says: its claims and the raw material for answer candidates."""
  claims: list[Claim]
  mentions: list[_Mention]
  loose_regions: list[str]
  empty_regions: set
  answers: set
  numbers: set
  backgrounds: set


def _scan_regions(toks: Sequence[str]) -> list[tuple[int, int, int, int, str]]:
  """Region phrases: (phrase start, name start, name end, phrase end, region)."""
  found, i = [], 0
  while i < len(toks):
    pair = (toks[i], toks[i + 1]) if i + 1 < len(toks) else None
    if pair and pair[0] in _ROWS and pair[1] in _COLS and not (
        pair[0] in _CENTER and pair[1] in _CENTER):
      name, end = scenes_lib.region_name(_ROWS[pair[0]], _COLS[pair[1]]), i + 2
    elif toks[i] in _CENTER:
      name, end = "center", i + 1
    else:
      i += 1
      continue
    start = i
    if start > 0 and toks[start - 1] == "the":
      start -= 1
    if start > 0 and toks[start - 1] in _REGION_PREPOSITIONS:
      start -= 1
    stop = end + 1 if end < len(toks) and toks[end] in _REGION_NOUNS else end
    found.append((start, i, end, stop, name))
    i = end
  return found


def _scan_mentions(toks: Sequence[str]) -> list[_Mention]:
  """Object mentions, left to right (see the module docstring for their form)."""
  out, i = [], 0
  while i < len(toks):
    j, determiner, count = i, None, None
    if toks[j] in _DETERMINERS:
      determiner, j = toks[j], j + 1
    elif toks[j] == "no":
      determiner, count, j = "no", 0, j + 1
    if j < len(toks) and (toks[j] in _NUMBER or toks[j].isdigit()) and not (
        j + 1 < len(toks) and toks[j + 1] == "of"):
      count = _NUMBER[toks[j]] if toks[j] in _NUMBER else int(toks[j])
      j += 1
    attrs, k = {}, j
    while k < len(toks) and (toks[k] in _SIZE or toks[k] in _COLOR):
      name, value = ("size", _SIZE[toks[k]]) if toks[k] in _SIZE else ("color", _COLOR[toks[k]])
      if name in attrs:
        break  # "red blue" is two mentions
      attrs[name], k = value, k + 1
    noun = False
    if k < len(toks) and toks[k] in _SHAPE:
      attrs["shape"], k, noun = _SHAPE[toks[k]], k + 1, True
      if k < len(toks) and toks[k] in _GENERIC and toks[k] not in ("one", "ones"):
        k += 1  # "star shape"
    elif k < len(toks) and toks[k] in _GENERIC and (attrs or toks[k] not in ("one", "ones")):
      k, noun = k + 1, True
    # A bare noun counts when numbered or pointed at ("the object in the center").
    if attrs or (noun and (count is not None or determiner is not None)):
      out.append(_Mention(attrs, i, k, count, determiner, noun))
      i = k
    else:
      i += 1
  return out


def _attach_regions(mentions, regions) -> list[str]:
  """Gives each region to the mention before it (else after it); returns the unattached ones."""
  loose, floor = [], 0
  for start, _, _, stop, name in regions:
    before = [m for m in mentions if floor <= m.start and m.end <= start and m.region is None]
    after = [m for m in mentions if m.start >= stop and m.region is None]
    if before:
      before[-1].region = name
    elif after:
      after[0].region = name
    else:
      loose.append(name)
    floor = stop
  return loose


def _relation(between: Sequence[str]) -> str | None:
  """The relation words between two mentions state, if any."""
  words = set(between)
  if len(between) > 9:
    return None
  if {"same", "size"} <= words:
    return "same_size"
  if "than" in words and words & {"bigger", "larger"}:
    return "bigger"
  if "than" in words and words & {"smaller", "tinier"}:
    return "smaller"
  if "left" in words and words & {"of", "than"}:
    return "left_of"
  if "right" in words and words & {"of", "than"}:
    return "right_of"
  if words & {"above", "higher", "over"}:
    return "above"
  if words & {"below", "beneath", "under", "lower"}:
    return "below"
  return None


def _read_sentence(toks: Sequence[str], reading: _Reading) -> None:
  """Adds one sentence's claims, mentions and answer material to `reading`."""
  regions = _scan_regions(toks)
  in_region = {p for start, _, _, stop, _ in regions for p in range(start, stop)}
  mentions = _scan_mentions(toks)
  loose = _attach_regions(mentions, regions)

  def gap(a: int, b: int) -> list[str]:
    return [toks[p] for p in range(a, b) if p not in in_region]

  claims = reading.claims
  subject = None
  for m in mentions:
    if subject is not None:
      between = gap(subject.end, m.start)
      negated = any(t in _NEGATORS for t in between)
      relation = _relation(between)
      if relation is None and between == ["and"]:
        after = gap(m.end, len(toks))[:5]
        relation = "same_size" if {"same", "size"} <= set(after) else None
      if relation is not None:
        claims.append(Claim("relation", subject.key(), subject.region, negated=negated,
                            relation=relation, other_attrs=m.key(), other_region=m.region))
        subject.related = m.related = True
      elif (between and set(between) <= _COPULAS | _NEGATORS | _ADVERBS
            and set(between) & _COPULAS
            and (not m.noun or (m.determiner in ("a", "an") and m.count is None))):
        for name, value in m.attrs.items():
          subject.attrs[name] = value if subject.attrs.get(name, value) == value else _CONFLICT
        subject.region = subject.region or m.region
        subject.negated = subject.negated or negated
        m.merged = True
        continue
    subject = m

  live = [m for m in mentions if not m.merged]
  for p, tok in enumerate(toks):
    if tok not in _SUPERLATIVES:
      continue
    before = [m for m in live if m.end <= p and set(gap(m.end, p)) & _COPULAS
              and set(gap(m.end, p)) <= _COPULAS | _NEGATORS | _ADVERBS | {"the"}]
    after = [m for m in live if m.start > p and set(gap(p + 1, m.start)) & _COPULAS
             and set(gap(p + 1, m.start)) <= _COPULAS | _GENERIC | {"the"}]
    target = before[-1] if before else (after[0] if after else None)
    if target is not None:
      negated = any(t in _NEGATORS for t in gap(target.end, p))
      claims.append(Claim("superlative", target.key(), target.region, negated=negated,
                          relation=_SUPERLATIVES[tok]))
      target.related = True

  if set(toks) & _EMPTY_WORDS:
    for name in loose:
      claims.append(Claim("empty", region=name))
      reading.empty_regions.add(name)
  reading.loose_regions.extend(loose)

  floor = 0
  for m in live:
    window = toks[max(floor, m.start - 4):m.start]
    if "," in window:
      window = window[len(window) - window[::-1].index(","):]
    m.negated = m.negated or m.count == 0 or any(t in _NEGATORS for t in window)
    floor = m.end
    if not m.related and (m.attrs or m.count is not None or m.region):
      claims.append(Claim("objects", m.key(), m.region, count=None if m.negated else m.count,
                          negated=m.negated))
  reading.mentions.extend(live)

  starts = {m.start for m in mentions}
  covered = {p for m in mentions for p in range(m.start, m.end)}
  for p, tok in enumerate(toks):
    if tok in _YES:
      reading.answers.add("yes")
    elif tok in _NO and p not in starts:
      reading.answers.add("no")
    elif p not in covered and (tok in _NUMBER or tok.isdigit()) and (
        p + 1 == len(toks) or toks[p + 1] in _AFTER_BARE_NUMBER):
      reading.numbers.add(_NUMBER[tok] if tok in _NUMBER else int(tok))
    elif tok in _BACKGROUNDS and tok not in reading.backgrounds:
      reading.backgrounds.add(tok)
      claims.append(Claim("background", (("background", tok),)))


def _read(text: str, statements_only: bool = True) -> _Reading:
  """Parses a text sentence by sentence; questions (ending in "?") assert nothing unless asked."""
  reading = _Reading([], [], [], set(), set(), set(), set())
  sentence: list[str] = []
  for tok in _TOKEN.findall(text.lower()) + ["."]:
    if tok in _SENTENCE_END:
      if sentence and not (statements_only and tok == "?"):
        _read_sentence(sentence, reading)
      sentence = []
    else:
      sentence.append(tok)
  return reading


def parse_claims(text: str) -> list[Claim]:
  """Every claim about a scene that the statements of `text` make (questions make none)."""
  return _read(text).claims


# --- Checking -------------------------------------------------------------------

_RELATIONS = {
    "left_of": lambda a, b: a["col"] < b["col"],
    "right_of": lambda a, b: a["col"] > b["col"],
    "above": lambda a, b: a["row"] < b["row"],
    "below": lambda a, b: a["row"] > b["row"],
    "bigger": lambda a, b: scenes_lib.SIZES.index(a["size"]) > scenes_lib.SIZES.index(b["size"]),
    "smaller": lambda a, b: scenes_lib.SIZES.index(a["size"]) < scenes_lib.SIZES.index(b["size"]),
    "same_size": lambda a, b: a["size"] == b["size"],
}


def _matching(attrs, region: str | None, facts: Mapping) -> list[int]:
  """Indices of the objects with all of `attrs` (sorted pairs or a dict) in `region`."""
  pairs = tuple(attrs.items()) if isinstance(attrs, Mapping) else attrs
  return [o["index"] for o in facts["objects"]
          if all(o[k] == v for k, v in pairs) and (region is None or o["region"] == region)]


def claim_holds(claim: Claim, facts: Mapping) -> bool:
  """Whether `claim` is true of the scene whose `Scene.facts()` are `facts`."""
  if claim.kind == "background":
    return dict(claim.attrs)["background"] == facts["background"]
  if claim.kind == "empty":
    return facts["by_region"][claim.region] is None
  found = _matching(claim.attrs, claim.region, facts)
  if claim.kind == "objects":
    if claim.negated:
      return not found
    return len(found) == claim.count if claim.count is not None else bool(found)
  if claim.kind == "superlative":
    ranked = set(facts[claim.relation])
    return bool(found) and (not set(found) & ranked if claim.negated else set(found) <= ranked)
  if claim.kind == "relation":
    others = _matching(claim.other_attrs, claim.other_region, facts)
    if not found or not others:
      return False
    objects, test = facts["objects"], _RELATIONS[claim.relation]
    holds = any(test(objects[i], objects[j]) for i in found for j in others if i != j)
    return not holds if claim.negated else holds
  raise ValueError(f"unknown claim kind {claim.kind!r}")


# --- The question ---------------------------------------------------------------

_ASKED_ATTRIBUTE = {"color_of": "color", "shape_of": "shape", "size_of": "size"}
_OPPOSITE = {"left_of": "right_of", "above": "below"}


@dataclasses.dataclass(frozen=True)
class Question:
  """A question read from text: its kind, the objects it names and the expected answer."""
  kind: str
  attrs: tuple = ()
  target: int | None = None
  other: int | None = None
  region: str | None = None
  expected: object = None


def _unique(m: _Mention, facts) -> int | None:
  found = _matching(m.attrs, m.region, facts)
  return found[0] if len(found) == 1 else None


def _question_kind(text: str, reading: _Reading) -> str:
  words = set(_words(text))
  relations = {c.relation for c in reading.claims if c.kind == "relation"}
  if "how many" in text.lower() or "count" in words:
    return "count"
  if "background" in words:
    return "background"
  if words & {"color", "colour"}:
    return "color_of"
  if words & {"bigger", "larger"}:
    return "bigger"
  if words & {"largest", "biggest"}:
    return "largest"
  if words & {"smallest", "tiniest"}:
    return "smallest"
  if "size" in words or {"small", "medium", "large"} <= words:
    return "size_of"
  if "shape" in words and words & {"what", "which", "kind"}:
    return "shape_of"
  if "where" in words or "part" in words:
    return "where_is"
  if "left_of" in relations:
    return "left_of"
  if "above" in relations:
    return "above"
  if reading.loose_regions:
    return "what_at"
  if words & {"there", "contain", "contains", "any"}:
    return "exists"
  return "describe"


def read_question(text: str, facts: Mapping) -> Question:
  """The question in `text` with its expected answer; kind "describe" for open requests.

  A question whose objects cannot be told apart in this scene (or that names
  none where it needs them) gets kind "unknown"; its adherence then only
  asks for a true claim.
  """
  reading = _read(text, statements_only=False)
  kind = _question_kind(text, reading)
  nouns = [m for m in reading.mentions if m.noun]
  if kind == "count":
    attrs = reading.mentions[0].key() if reading.mentions else ()
    return Question("count", attrs, expected=len(_matching(attrs, None, facts)))
  if kind == "background":
    return Question(kind, expected=facts["background"])
  if kind in ("largest", "smallest"):
    ranked = facts[kind]
    return Question(kind, expected=ranked[0]) if len(ranked) == 1 else Question("unknown")
  if kind == "what_at":
    region = reading.loose_regions[0]
    index = facts["by_region"][region]
    return Question(kind, region=region, expected=paired_lib.NOTHING if index is None else index)
  if kind == "exists":
    if not reading.mentions:
      return Question("unknown")
    attrs = reading.mentions[0].key()
    return Question(kind, attrs, expected="yes" if _matching(attrs, None, facts) else "no")
  if kind == "describe":
    return Question(kind)
  if kind in ("bigger", "left_of", "above"):
    if len(nouns) < 2:
      return Question("unknown")
    a, b = _unique(nouns[0], facts), _unique(nouns[1], facts)
    if a is None or b is None or a == b:
      return Question("unknown")
    oa, ob = facts["objects"][a], facts["objects"][b]
    if kind == "bigger":
      expected = (a if _RELATIONS["bigger"](oa, ob) else b if _RELATIONS["bigger"](ob, oa)
                  else paired_lib.SAME_SIZE)
    else:
      expected = "yes" if _RELATIONS[kind](oa, ob) else "no"
    return Question(kind, target=a, other=b, expected=expected)
  target = _unique(nouns[0], facts) if nouns else None
  if target is None:
    return Question("unknown")
  obj = facts["objects"][target]
  expected = obj["region"] if kind == "where_is" else obj[_ASKED_ATTRIBUTE[kind]]
  return Question(kind, target=target, expected=expected)


def _refers_to(attrs, region, obj: Mapping, skip: str = "") -> bool:
  """Whether a mention / claim subject names `obj`: some attribute or region, none contradicting."""
  pairs = [(k, v) for k, v in (attrs.items() if isinstance(attrs, Mapping) else attrs) if k != skip]
  if not pairs and region is None:
    return False
  return all(obj[k] == v for k, v in pairs) and region in (None, obj["region"])


def _candidates(q: Question, reading: _Reading, facts: Mapping) -> set:
  """The answers the reply gives to the question (right or wrong)."""
  objects = facts["objects"]
  if q.kind == "count":
    counts = {0 if m.negated else m.count for m in reading.mentions
              if m.key() == q.attrs and m.region is None and (m.count is not None or m.negated)}
    return counts | reading.numbers
  if q.kind in _ASKED_ATTRIBUTE:
    name = _ASKED_ATTRIBUTE[q.kind]
    return {m.attrs[name] for m in reading.mentions if name in m.attrs and not m.negated and (
        _refers_to(m.attrs, m.region, objects[q.target], skip=name)
        or (not m.noun and set(m.attrs) == {name}))}
  if q.kind == "where_is":
    linked = {m.region for m in reading.mentions if m.region and m.attrs and not m.negated
              and _refers_to(m.attrs, None, objects[q.target])}
    return linked | set(reading.loose_regions)
  if q.kind == "what_at":
    stated = [m for m in reading.mentions if not m.negated]
    at = [m for m in stated if m.region == q.region]
    out = {paired_lib.NOTHING} if q.region in reading.empty_regions else set()
    for m in at or [m for m in stated if m.region is None and m.attrs]:
      right = (q.expected != paired_lib.NOTHING and {"shape", "color"} & set(m.attrs)
               and _refers_to(m.attrs, None, objects[q.expected]))
      out.add(q.expected if right else m.key())
    return out
  if q.kind == "exists":
    return set(reading.answers) | {"no" if m.negated else "yes" for m in reading.mentions
                                   if m.key() == q.attrs and not m.related}
  if q.kind in ("left_of", "above"):
    out = set(reading.answers)
    for c in reading.claims:
      if (c.kind == "relation" and c.relation in (q.kind, _OPPOSITE[q.kind])
          and _refers_to(c.attrs, c.region, objects[q.target])
          and _refers_to(c.other_attrs, c.other_region, objects[q.other])):
        out.add("yes" if (c.relation == q.kind) != c.negated else "no")
    return out
  if q.kind == "bigger":
    out = set()
    for c in reading.claims:
      if c.kind != "relation" or c.relation not in ("bigger", "smaller", "same_size"):
        continue
      if c.relation == "same_size":
        out.add(paired_lib.SAME_SIZE)
        continue
      winner = (c.attrs, c.region) if c.relation == "bigger" else (c.other_attrs, c.other_region)
      found = _matching(*winner, facts)
      out.add(found[0] if len(found) == 1 else winner)
    return out
  if q.kind in ("largest", "smallest"):
    out = set()
    for c in reading.claims:
      if c.kind == "superlative" and c.relation == q.kind and not c.negated:
        found = _matching(c.attrs, c.region, facts)
        out.add(found[0] if len(found) == 1 else c.attrs)
    return out
  if q.kind == "background":
    return set(reading.backgrounds)
  raise ValueError(f"no answer candidates for question kind {q.kind!r}")


# --- Scoring --------------------------------------------------------------------


def _clip(x: float) -> float:
  return min(1.0, max(0.0, x))


def _legibility(text: str, words: Sequence[str], known: frozenset, attested: frozenset) -> float:
  """Known words x word order x repetition, each in [0, 1] (see the module docstring)."""
  if not words:
    return 0.0
  known_share = sum(w in known for w in words) / len(words)
  pairs = _bigrams(text)
  ordered = sum(p in attested for p in pairs) / len(pairs)
  grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
  distinct4 = len(set(grams)) / len(grams) if grams else 1.0
  distinct1 = len(set(words)) / len(words) if len(words) >= 4 else 1.0
  return (_clip((known_share - 0.6) / 0.3) * _clip((ordered - 0.5) / 0.35)
          * _clip((distinct4 - 0.4) / 0.4) * _clip((distinct1 - 0.15) / 0.2))


def _sentences(text: str) -> list[str]:
  return [s for s in _SENTENCE_SPLIT.split(text.strip()) if _words(s)]


def _repeated_share(text: str) -> float:
  """Share of the sentences of `text` that make a claim and repeat an earlier such sentence."""
  factual = [" ".join(_words(s)) for s in _sentences(text) if parse_claims(s)]
  return (len(factual) - len(set(factual))) / len(factual) if factual else 0.0


def _contradictions(claims: Sequence[Claim], answers: set) -> int:
  """yes and no both, plus groups of object claims whose counts cannot all hold."""
  found = int({"yes", "no"} <= answers)
  allowed: dict = {}
  for c in claims:
    if c.kind != "objects":
      continue
    counts = {0} if c.negated else {c.count} if c.count is not None else set(range(1, 10))
    key = (c.attrs, c.region)
    allowed[key] = allowed.get(key, counts) & counts
  return found + sum(not v for v in allowed.values())


def _purity(words_padded: str, own: Sequence[str], foreign: Sequence[str]) -> float:
  """own / (own + 2 foreign) over distinct whole-word markers found; 0 without an own one."""
  hits = sum(f" {m} " in words_padded for m in own)
  bad = sum(f" {m} " in words_padded for m in foreign)
  return hits / (hits + 2 * bad) if hits else 0.0


def _stem(word: str) -> str:
  return word[:-1] if len(word) > 3 and word.endswith("s") else word


@dataclasses.dataclass(frozen=True)
class _Context:
  """What scoring needs from one example, worked out once for all its responses."""
  task: str
  question: Question
  question_words: frozenset
  known: frozenset
  attested: frozenset  # word-class bigrams of the world and of the example's own texts
  earlier: tuple  # claims of the dialogue's earlier replies
  facts: Mapping
  # Per marker kind: (own markers, other characters' / roles' markers), whole words.
  markers: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]
  # Role-play.
  set_phrases: tuple = ()
  set_phrase_pattern: re.Pattern | None = None
  exclaims: bool = False
  knowledge_words: frozenset = frozenset()
  profile_grams: frozenset = frozenset()
  # Personalised.
  role: personalised_lib.Role | None = None
  location_word: str = ""


def _is_roleplay(example: Mapping) -> bool:
  if "character" in example and "dialogue" in example:
    return True
  if "role_set" in example and "query" in example:
    return False
  raise ValueError(f"example {example.get('id')!r} is neither a role-play nor a personalised "
                   "example (see latent_mca.data.real for the schemas)")


def reference_reply(example: Mapping) -> str:
  """The ground-truth reply of an example of either task."""
  if _is_roleplay(example):
    return roleplay_lib.roleplay_reference(example)
  return example["reference_reply"]


def dimensions_for(example: Mapping) -> tuple[str, ...]:
  """The dimensions an example is scored on."""
  return ROLEPLAY_DIMENSIONS if _is_roleplay(example) else tuple(PERSONALISED_DIMENSIONS)


def _context(example: Mapping, facts: Mapping) -> _Context:
  if _is_roleplay(example):
    question = roleplay_lib.roleplay_question(example)
    history = example["dialogue"][:roleplay_lib.reply_index(example)]
    profile = example["character"]
    speaker = characters_lib.character(profile["name"])
    profile_text = " ".join(profile[k] for k in ("introduction", "experience", "relationship"))
    mentioned = _padded(profile_text + " " + profile["name"])
    others = [m for c in characters_lib.CHARACTERS if c.name != speaker.name for m in c.markers
              if f" {_padded(m).strip()} " not in mentioned]
    profile_words = _words(profile_text)
    phrases = (speaker.catchphrase, *speaker.greetings, *speaker.interjections)
    blocked = _KNOWLEDGE_STOPWORDS | _SCENE_WORDS | set(_words(profile["name"])) | set(
        _words(" ".join(speaker.lexicon)))
    extra = " ".join([question, *(profile[k] for k in profile), *(t["text"] for t in history)])
    own = tuple(_padded(m).strip() for m in (*speaker.markers, speaker.catchphrase))
    return _Context(
        task="roleplay", question=read_question(question, facts),
        question_words=frozenset(_words(question)),
        known=_WORLD_LEXICON | frozenset(_words(extra)),
        attested=world_bigrams() | frozenset(_bigrams(extra)),
        earlier=tuple(c for t in history if t["role"] == "assistant"
                      for c in parse_claims(t["text"])),
        facts=facts,
        markers={"persona": (own, tuple(_padded(m).strip() for m in others))},
        set_phrases=tuple(_padded(p).strip() for p in phrases),
        set_phrase_pattern=re.compile("|".join(
            r"\W+".join(map(re.escape, _words(p))) for p in phrases), re.IGNORECASE),
        exclaims=speaker.sentence_end == "!",
        knowledge_words=frozenset(_stem(w) for w in profile_words if len(w) >= 3
                                  and w not in blocked and _stem(w) not in blocked),
        profile_grams=frozenset(tuple(profile_words[i:i + 5])
                                for i in range(len(profile_words) - 4)))
  person = personalised_lib.primary_role(example)
  query = example["query"]
  extra = " ".join([query, personalised_lib.role_set_text(example["role_set"]),
                    *example["situation"].values()])
  return _Context(
      task="personalised", question=read_question(query, facts),
      question_words=frozenset(_words(query)),
      known=_WORLD_LEXICON | frozenset(_words(extra)),
      attested=world_bigrams() | frozenset(_bigrams(extra)), earlier=(), facts=facts,
      markers={field: (getattr(person, field),
                       tuple(m for r in personalised_lib.ROLES if r is not person
                             for m in getattr(r, field)))
               for field in ("role_markers", "action_markers", "feeling_markers")},
      role=person, location_word=person.location.lower())


def _score(ctx: _Context, response: str) -> dict[str, float]:
  """All dimensions of one response under a prepared context."""
  words = _words(response)
  padded = " " + " ".join(words) + " "
  sentences = _sentences(response)
  legible = _legibility(response, words, ctx.known, ctx.attested)
  # Set phrases (a catchphrase like "Give me one more lap!") are decoration, not content.
  content = ctx.set_phrase_pattern.sub(".", response) if ctx.set_phrase_pattern else response
  reading = _read(content)
  facts, q = ctx.facts, ctx.question

  # Answer: candidates, adherence and whether the reply addresses the question at all.
  if q.kind == "describe":
    covered = set()
    for c in reading.claims:
      if (c.kind == "objects" and not c.negated and {"color", "shape"} <= dict(c.attrs).keys()
          and claim_holds(c, facts)):
        covered |= set(_matching(c.attrs, c.region, facts))
    adherence = 10.0 * len(covered) / facts["num_objects"]
    given = any(c.kind == "objects" and {"color", "shape"} & dict(c.attrs).keys()
                for c in reading.claims)
    hedges = 0
  elif q.kind == "unknown":
    adherence = 10.0 * any(claim_holds(c, facts) for c in reading.claims)
    given, hedges = bool(reading.claims), 0
  else:
    candidates = _candidates(q, reading, facts)
    given, hedges = bool(candidates), max(0, len(candidates) - 1)
    adherence = (10.0 / len(candidates) if q.expected in candidates
                 else 1.0 if candidates else 0.0)
  addressed = 1.0 if given else 0.2 if set(words) & _SCENE_WORDS else 0.0
  gate = legible * (0.1 + 0.9 * addressed)

  # Facts: every claim, plus yes / no answers to yes / no questions.
  judged = [claim_holds(c, facts) for c in reading.claims]
  if q.kind in ("exists", "left_of", "above"):
    judged += [a == q.expected for a in sorted(reading.answers)]
  right = sum(judged)
  accuracy = 10.0 * gate * right / (right + 2 * (len(judged) - right)) if judged else 0.0
  # The instruction is to answer truthfully: false statements around the answer dilute it.
  adherence *= legible * (right / len(judged) if judged else 1.0)

  repeated = _repeated_share(content)
  capitals = (sum(next((ch for ch in s if ch.isalpha()), "a").isupper() for s in sentences)
              / len(sentences) if sentences else 0.0)
  fluency = (10.0 * legible * (0.5 + 0.5 * capitals) * min(1.0, len(words) / 8)
             * min(1.0, 150 / max(len(words), 1)))

  purity = {kind: _purity(padded, *pair) for kind, pair in ctx.markers.items()}
  if ctx.task == "personalised":
    lengths = [len(_words(s)) for s in sentences]
    register = (min(1.0, 14 / (sum(lengths) / len(lengths)))
                if ctx.role.register == "simple" and lengths else 1.0)
    return {
        "role_set_sensitivity": 10.0 * gate * purity["role_markers"],
        "body_behavior_awareness": 10.0 * gate * purity["action_markers"],
        "mind_feelings_awareness": 10.0 * gate * purity["feeling_markers"],
        "contextual_awareness": (0.5 * adherence + 0.3 * accuracy
                                 + 2.0 * legible * (f" {ctx.location_word} " in padded)),
        "conversational_flow": fluency * (0.3 + 0.7 * addressed) * (1 - repeated) * register,
    }

  refs = [_COLOR.get(w) or _SHAPE.get(w) or w for w in words
          if (w in _COLOR or w in _SHAPE or w in _BACKGROUNDS) and w not in ctx.question_words]
  present = set(facts["present_colors"]) | set(facts["present_shapes"]) | {facts["background"]}
  grounded = sum(r in present for r in refs) / len(refs) if refs else 1.0
  relevance = 10.0 * gate * grounded if reading.claims else 0.0

  contradictions = hedges + _contradictions([*ctx.earlier, *reading.claims], reading.answers)
  coherency = 10.0 * legible * (0.3 + 0.7 * addressed) * 0.5 ** contradictions * (1 - repeated)
  persona = purity["persona"]
  in_character = not any(p in padded for p in _OUT_OF_CHARACTER)
  style = (sum(s.rstrip().endswith("!") for s in sentences) / len(sentences)
           if ctx.exclaims and sentences else 1.0)
  verbatim = any(f" {p} " in padded for p in ctx.set_phrases)
  used = {_stem(w) for w in words} & ctx.knowledge_words
  parroted = any(tuple(words[i:i + 5]) in ctx.profile_grams for i in range(len(words) - 4))
  return {
      "instruction_adherence": adherence,
      "fluency": fluency,
      "coherency": coherency,
      "image_text_relevance": relevance,
      "accuracy": accuracy,
      "personality": 10.0 * gate * persona * (0.6 + 0.4 * style) * (1.0 if in_character else 0.3),
      "knowledge": 10.0 * gate * min(1.0, len(used) / 2) * (0.5 if parroted else 1.0),
      "tone": 10.0 * gate * persona * (0.5 + 0.3 * verbatim + 0.2 * style),
  }


def score_responses(example: Mapping, facts: Mapping, responses: Sequence[str]) -> list[dict]:
  """Per-dimension scores (0..10) of each response to one example (the context is read once)."""
  ctx = _context(example, facts)
  return [_score(ctx, r) for r in responses]


def score_response(example: Mapping, facts: Mapping, response: str) -> dict[str, float]:
  """Per-dimension scores (0..10) of one response; see the module docstring for each rule."""
  return score_responses(example, facts, [response])[0]


def judge(example: Mapping, facts: Mapping, response: str) -> PairwiseScores:
  """Scores of the reference reply and of `response`, as the LLM judge returns them."""
  reference, candidate = score_responses(example, facts, [reference_reply(example), response])
  return PairwiseScores(reference=reference, candidate=candidate)


def rewards(example: Mapping, facts: Mapping, responses: Sequence[str]) -> list[float]:
  """score_ratio(response scores, reference scores) for each response (e.g. a GRPO group)."""
  ctx = _context(example, facts)
  reference = _score(ctx, reference_reply(example))
  return [score_ratio(_score(ctx, r), reference) for r in responses]


def reward(example: Mapping, facts: Mapping, response: str) -> float:
  """The judge-score ratio of one response."""
  return rewards(example, facts, [response])[0]
