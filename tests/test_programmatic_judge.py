"""latent_mca.judge.programmatic: the claim parser, the question reader and adversarial replies.

The adversarial replies are written here from the scene's raw objects (not
with the task's answer templates), in the words of the world, so each case
measures one property: truth, focus, persona in context, legibility.
"""

import re

import numpy as np
import pytest

from latent_mca import tasks, world
from latent_mca.judge import llm, programmatic as judge
from latent_mca.tasks import personalised

RNG_SEED = 0


@pytest.fixture(scope="module")
def pool():
  """Single-question role-play examples of both distributions with their facts and question."""
  examples = tasks.roleplay_examples(21, 300, "in") + tasks.roleplay_examples(21, 300, "out")
  out = []
  for e in examples:
    if e["dialogue_type"] != "comment":
      continue
    facts = tasks.example_facts(e)
    out.append((e, facts, judge.read_question(tasks.roleplay_question(e), facts)))
  return out


def _of_kind(pool, kind, n):
  found = [(e, f, q) for e, f, q in pool if q.kind == kind][:n]
  assert len(found) == n
  return found


def _count_sentence(q, n):
  """ "I see two red circles in this picture": a count answer for question q, worded here."""
  attrs = dict(q.attrs)
  adjectives = [attrs[k] for k in ("size", "color") if k in attrs]
  noun = attrs.get("shape", "shape")
  return " ".join(["I see", world.text.number_word(n), *adjectives,
                   noun if n == 1 else world.text.plural(noun), "in this picture"])


def _in_character(example, sentence):
  character = world.character(example["character"]["name"])
  return f"{character.greetings[0]} {sentence}{character.sentence_end} {character.catchphrase}"


# --- The parser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_facts():
  """A large red star top left, a small blue circle in the center, a medium one bottom right."""
  objects = (world.SceneObject("star", "red", "large", 0, 0, 0.16, 0.16),
             world.SceneObject("circle", "blue", "small", 1, 1, 0.5, 0.5),
             world.SceneObject("circle", "blue", "medium", 2, 2, 0.83, 0.83))
  return world.Scene(objects, "cream").facts()


@pytest.mark.parametrize("text, truth", [
    ("There are two blue circles.", True),
    ("There are three blue circles.", False),
    ("There are 3 shapes in total.", True),
    ("There is no green star.", True),
    ("There is no red star.", False),
    ("I don't see any purple crosses.", True),
    ("The red star is in the top left corner.", True),
    ("The red star is in the center.", False),
    ("In the center there is a small blue circle.", True),
    ("In the middle there is a large blue circle.", False),
    ("The star is red.", True),
    ("The star is not red.", False),
    ("The red object is a star.", True),
    ("The red object is a circle.", False),
    ("The red star is to the left of the blue circle in the center.", True),
    ("The red star is not to the left of the blue circle in the center.", False),
    ("The blue circle in the center is above the red star.", False),
    ("The red star is bigger than the blue circle in the center.", True),
    ("The blue circle in the center and the blue circle in the bottom right corner are the "
     "same size.", False),
    ("The red star is the largest object.", True),
    ("The largest object is the blue circle in the center.", False),
    ("There is nothing at the top middle.", True),
    ("There is nothing in the center.", False),
    ("The background is cream.", True),
    ("The background is white.", False),
])
def test_claims_are_checked_against_the_scene(scene_facts, text, truth):
  claims = judge.parse_claims(text)
  assert len(claims) == 1, claims
  assert judge.claim_holds(claims[0], scene_facts) is truth


def test_questions_and_decoration_assert_nothing(scene_facts):
  assert judge.parse_claims("Is there a green star in the image?") == []
  assert judge.parse_claims("Steady as she goes, matey! Such a shimmer.") == []
  every_line = [s for c in world.CHARACTERS
                for s in (*c.greetings, *c.interjections, c.catchphrase, *tasks.KNOWLEDGE[c.name])]
  every_line += [s for r in tasks.ROLES for s in (*r.openers, *r.actions, *r.feelings)]
  assert [s for s in every_line if judge.parse_claims(s.format(where="at home"))] == []


def test_questions_are_read_with_their_answers():
  rng = np.random.default_rng(RNG_SEED)
  seen = set()
  for _ in range(600):
    scene = world.sample_scene(rng)
    query, text, answer = world.make_question(scene, rng)
    q = judge.read_question(text, scene.facts())
    kind = "count" if query["type"].startswith("count_") else query["type"]
    assert q.kind == kind, text
    facts = scene.facts()
    if kind in ("count", "color_of", "shape_of", "size_of", "where_is", "exists", "left_of",
                "above", "background"):
      assert str(q.expected) == answer, text
    elif kind == "what_at":
      named = "nothing" if q.expected == world.NOTHING else world.text.with_article(
          facts["objects"][q.expected]["phrase"])
      assert named == answer, text
    elif kind == "bigger" and answer != world.SAME_SIZE:
      side = "a" if answer == world.reference_phrase(query["a"]) else "b"
      assert (q.expected,) == world.find_objects(scene, **query[side]), text
    elif kind == "bigger":
      assert q.expected == world.SAME_SIZE, text
    else:  # largest / smallest
      assert facts["objects"][q.expected]["reference_text"] == answer, text
    seen.add(kind)
  assert seen == {"count", *world.QUESTION_TYPES} - {
      t for t in world.QUESTION_TYPES if t.startswith("count_")}


# --- The required adversarial cases -------------------------------------------------------


def test_ground_truth_gets_ratio_one_and_near_full_marks():
  examples = (tasks.roleplay_examples(8, 60, "in") + tasks.roleplay_examples(8, 60, "out")
              + tasks.personalised_examples(8, 60, "in")
              + tasks.personalised_examples(8, 60, "out"))
  for e in examples:
    facts = tasks.example_facts(e)
    reference = judge.reference_reply(e)
    assert judge.reward(e, facts, reference) == 1.0
    scores = judge.score_response(e, facts, reference)
    assert set(scores) == set(judge.dimensions_for(e))
    assert min(scores.values()) >= 8.0, scores


def test_correct_in_character_reply_scores_high(pool):
  for e, facts, q in _of_kind(pool, "count", 6):
    reply = _in_character(e, _count_sentence(q, q.expected))
    assert judge.reward(e, facts, reply) >= 0.8, reply
  for e, facts, q in _of_kind(pool, "color_of", 4):
    target = facts["objects"][q.target]
    reply = _in_character(e, f"I see {world.text.with_article(target['phrase'])} "
                             f"{world.REGION_PHRASES[target['region']]}")
    assert judge.reward(e, facts, reply) >= 0.8, reply


def test_one_wrong_fact_scores_lower(pool):
  for e, facts, q in _of_kind(pool, "count", 6):
    right = _in_character(e, _count_sentence(q, q.expected))
    wrong = _in_character(e, _count_sentence(q, q.expected + 1))
    assert judge.reward(e, facts, wrong) < judge.reward(e, facts, right) - 0.2
  for e, facts, q in _of_kind(pool, "color_of", 4):
    target = facts["objects"][q.target]
    other = next(c for c in world.COLORS if c != target["color"])
    where = world.REGION_PHRASES[target["region"]]
    right = _in_character(e, f"The {target['shape']} {where} is {target['color']}")
    wrong = _in_character(e, f"The {target['shape']} {where} is {other}")
    assert judge.score_response(e, facts, wrong)["accuracy"] < 1.0
    assert judge.reward(e, facts, wrong) < judge.reward(e, facts, right) - 0.2


def test_listing_every_colour_and_shape_scores_below_a_focused_answer(pool):
  listing = ("There are " + ", ".join(world.COLORS) + " "
             + ", ".join(world.text.plural(s) for s in world.SHAPES) + " in this picture")
  for kind in ("count", "color_of", "describe", "where_is"):
    for e, facts, q in _of_kind(pool, kind, 3):
      focused = judge.reference_reply(e)
      listed = _in_character(e, listing)
      assert judge.reward(e, facts, listed) < 0.5
      assert judge.reward(e, facts, listed) < judge.reward(e, facts, focused) - 0.4
      # Appending the list to a correct answer still costs.
      assert judge.reward(e, facts, f"{focused} {listing}.") < 0.9


def test_bare_catchphrase_scores_low(pool):
  for name in world.CHARACTERS:
    e, facts, _ = next(x for x in pool if x[0]["character"]["name"] == name.name)
    assert judge.reward(e, facts, name.catchphrase) < 0.3, name.name
    greeting_and_catchphrase = f"{name.greetings[0]} {name.catchphrase}"
    assert judge.reward(e, facts, greeting_and_catchphrase) < 0.3, name.name


def test_empty_and_garbled_replies_score_near_zero(pool):
  rng = np.random.default_rng(RNG_SEED)
  for e, facts, q in pool[:20]:
    reference = judge.reference_reply(e)
    letters = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz    "), 200))
    words = reference.split()
    garbled = [
        "", "   \n ", letters,
        "matey " * 40, "red star " * 30, " ".join([words[0]] * 50),
        "Der rote Stern ist oben links und der blaue Kreis ist in der Mitte des Bildes.",
        "L'étoile rouge est en haut à gauche, le cercle bleu est au centre de l'image.",
        "图片左上角有一个红色的星星，中间有一个蓝色的圆。",
        " ".join([reference] * 4),  # looping
    ]
    for reply in garbled:
      assert judge.reward(e, facts, reply) < 0.1, reply[:80]
      assert max(judge.score_response(e, facts, reply).values()) < 2.5, reply[:80]
    # The reference's own words, shuffled: English words, no English.
    assert judge.reward(e, facts, " ".join(rng.permutation(words))) < 0.2


def test_out_of_character_reply_scores_lower_on_personality_and_tone(pool):
  for e, facts, q in _of_kind(pool, "count", 6):
    sentence = _count_sentence(q, q.expected)
    neutral = sentence[0].upper() + sentence[1:] + "."
    in_character = _in_character(e, sentence)
    as_assistant = f"As an AI language model, I can tell you this: {_in_character(e, sentence)}"
    plain, styled = (judge.score_response(e, facts, r) for r in (neutral, in_character))
    assert plain["personality"] < styled["personality"] - 5
    assert plain["tone"] < styled["tone"] - 5
    assert judge.score_response(e, facts, as_assistant)["personality"] < styled["personality"] - 5
    assert judge.reward(e, facts, neutral) < judge.reward(e, facts, in_character)
    # Another character's voice is not this one's.
    other = next(c for c in world.CHARACTERS if c.name != e["character"]["name"]
                 and c.name not in " ".join(e["character"].values()))
    impostor = f"{other.greetings[0]} {sentence}{other.sentence_end} {other.catchphrase}"
    assert judge.score_response(e, facts, impostor)["personality"] < 1.0


def _situation(person, scene, query, individual):
  """A personalised example for `person` on `scene` (written here, in the task's schema)."""
  role_set = [{"location": loc, "role": name} for loc, name in personalised.INDIVIDUALS[individual]]
  reference = personalised.personalised_reply(scene, query, person, np.random.default_rng(1))
  return {"id": "t", "subset": individual[:5], "individual": individual, "role_set": role_set,
          "situation": {"location": person.location, "image_description": "",
                        "eval_help": personalised.eval_help(person)},
          "image_path": tasks.scene_image_path(scene),
          "query": f"I am looking at the {personalised.LOCATIONS[person.location].items[0]}. "
                   + world.question_text(query, np.random.default_rng(2)),
          "reference_reply": reference}


@pytest.mark.parametrize("mine, theirs", [
    (("HCMAS-01", "Home"), ("HCMAS-02", "Office")),  # a child vs an engineer
    (("HCMAS-02", "Office"), ("HCMAS-01", "Home")),
    (("HCMAS-03", "School"), ("HCMAS-03", "Home")),  # the same person, another location's role
    (("HCSHR-01", "Hospital"), ("HCSHR-04", "Airport")),
])
def test_personalised_reply_for_another_role_set_scores_lower(mine, theirs):
  rng = np.random.default_rng(RNG_SEED)
  (ind_a, loc_a), (ind_b, loc_b) = mine, theirs
  person = personalised.role(dict(personalised.INDIVIDUALS[ind_a])[loc_a], loc_a)
  other = personalised.role(dict(personalised.INDIVIDUALS[ind_b])[loc_b], loc_b)
  for _ in range(8):
    scene = world.sample_scene(rng)
    query, _, _ = world.make_question(scene, rng)
    example = _situation(person, scene, query, ind_a)
    facts = scene.facts()
    matching = personalised.personalised_reply(scene, query, person, np.random.default_rng(7))
    mismatched = personalised.personalised_reply(scene, query, other, np.random.default_rng(7))
    assert judge.reward(example, facts, matching) >= 0.95
    assert judge.reward(example, facts, mismatched) < judge.reward(example, facts, matching) - 0.4
    scores = judge.score_response(example, facts, mismatched)
    assert max(scores[d] for d in ("role_set_sensitivity", "body_behavior_awareness",
                                   "mind_feelings_awareness")) < 1.0


# --- More ways to game it ---------------------------------------------------------------


def test_hedged_and_echoed_answers_score_lower(pool):
  for e, facts, q in _of_kind(pool, "count", 4):
    answer = _in_character(e, _count_sentence(q, q.expected))
    hedged = answer.replace(" in this picture", f" or {world.text.number_word(q.expected + 1)} "
                                                "in this picture")
    assert judge.reward(e, facts, hedged) < judge.reward(e, facts, answer) - 0.1
    echo = tasks.roleplay_question(e)
    assert judge.reward(e, facts, echo) < 0.3
  for e, facts, q in _of_kind(pool, "exists", 4):
    both = _in_character(e, "Yes. No")
    assert judge.reward(e, facts, both) < 0.5
    assert judge.score_response(e, facts, both)["coherency"] < 6


def test_every_knowledge_line_uses_the_profile(pool):
  counts = [x for x in pool if x[2].kind == "count"]
  for character in world.CHARACTERS:
    e, facts, q = next(x for x in counts if x[0]["character"]["name"] == character.name)
    answer = _in_character(e, _count_sentence(q, q.expected))
    assert judge.score_response(e, facts, answer)["knowledge"] == 0.0
    for line in tasks.KNOWLEDGE[character.name]:
      assert judge.score_response(e, facts, f"{answer} {line}")["knowledge"] == 10.0, line


def test_profile_dump_scores_low(pool):
  for e, facts, q in pool[:30]:
    dump = " ".join(e["character"][k] for k in ("introduction", "experience", "relationship",
                                                 "catchphrase"))
    assert judge.reward(e, facts, dump) < 0.4, dump


def test_contradicting_an_earlier_reply_costs_coherency():
  example = next(e for e in tasks.roleplay_examples(4, 200)
                 if e["dialogue_type"] == "human-role"
                 and re.search(r"There are \w+ shapes in total", e["dialogue"][1]["text"]))
  facts = tasks.example_facts(example)
  n = facts["num_objects"]
  reply = _in_character(example, f"There are {world.text.number_word(n + 1)} shapes in total")
  consistent = _in_character(example, "I see nothing more to add")
  assert (judge.score_response(example, facts, reply)["coherency"]
          < judge.score_response(example, facts, consistent)["coherency"])


# --- API --------------------------------------------------------------------------------


def test_batch_api_matches_single_scores(pool):
  e, facts, q = pool[0]
  replies = [judge.reference_reply(e), "", _in_character(e, "I see nothing")]
  batch = judge.rewards(e, facts, replies)
  assert batch == [judge.reward(e, facts, r) for r in replies]
  pair = judge.judge(e, facts, replies[2])
  assert isinstance(pair, llm.PairwiseScores) and pair.ratio == batch[2]
  assert judge.ROLEPLAY_DIMENSIONS == tuple(llm.DIMENSIONS)
  for scores in judge.score_responses(e, facts, replies):
    assert list(scores) == list(judge.ROLEPLAY_DIMENSIONS)
    assert all(0.0 <= v <= 10.0 for v in scores.values())
  with pytest.raises(ValueError, match="neither"):
    judge.reward({"id": "x"}, facts, "hi")
