"""judge.rewards: the pluggable RL reward functions, the LLM one against a loopback server."""

from __future__ import annotations

import base64
import collections
import http.server
import io
import json
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from latent_mca import tasks
from latent_mca.judge import (ASPECTS, PERSONALISED_ASPECTS, PERSONALISED_DIMENSIONS, JudgeError,
                              LLMJudge, LLMRewards, judge_defaults, make_reward_fn, programmatic,
                              programmatic_rewards)
from latent_mca.judge.rewards import PersonalisedContext, personalised_context, roleplay_context
from tests.test_llm_judge import send_json

_CANDIDATE = re.compile(r"\[Model A's Response Start\]\*\*\n\n(.*?)\n\n## \*\*\[Model A's", re.S)
_ASPECT = re.compile(r"aspect of each model's response:\n([^:\n]+):")


def _pair(candidate: str, aspect: str) -> tuple[int, int]:
  """The fake judge's (A, B): depends on the response and the aspect, so sums are checkable."""
  return (len(candidate.split()) + len(aspect)) % 10 + 1, len(aspect) % 9 + 1


class _Judge:
  """A loopback /chat/completions that scores with `_pair`; answers HTTP 400 to `refuse`."""

  def __init__(self):
    self.requests, self.in_flight, self.max_in_flight = [], 0, 0
    self.refuse, self.delay = None, 0.0
    lock, outer = threading.Lock(), self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
          outer.requests.append((dict(self.headers), body))
          outer.in_flight += 1
          outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
        time.sleep(outer.delay)
        text = body["messages"][1]["content"][-1]["text"]
        candidate, aspect = _CANDIDATE.search(text)[1], _ASPECT.search(text)[1]
        with lock:
          outer.in_flight -= 1
        if candidate == outer.refuse:
          self.send_response(400)
          self.end_headers()
          return
        a, b = _pair(candidate, aspect)
        send_json(self, json.dumps({"choices": [{"message": {
            "content": f"A is fine. [Scores]: ({a}, {b})"}}]}).encode())

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

  def aspects(self) -> collections.Counter:
    return collections.Counter(_ASPECT.search(b["messages"][1]["content"][-1]["text"])[1]
                               for _, b in self.requests)


@pytest.fixture
def server():
  s = _Judge()
  yield s
  s.httpd.shutdown()
  s.httpd.server_close()


def _rewards(server, concurrency=4) -> LLMRewards:
  judge = LLMJudge(base_url=server.url, model="judge", retries=0, sleep=lambda s: None)
  return LLMRewards(judge, concurrency=concurrency)


def _expected(responses, aspects) -> list[float]:
  names = [aspect for aspect, _ in aspects.values()]
  return [sum(_pair(r, n)[0] for n in names) / sum(_pair(r, n)[1] for n in names)
          for r in responses]


RESPONSES = ["Ahoy! Two red circles.", "I see a blue square in the middle of the image, matey.",
             "No."]


def test_roleplay_rewards_are_the_per_response_ratio_and_send_the_image(server):
  example = tasks.roleplay_example(0, 1)
  rendered = tasks.example_image(example, 32)
  example = {**example, "image": np.asarray(rendered)}  # as decoded from the prepared data
  got = _rewards(server)(example, RESPONSES)
  assert got == pytest.approx(_expected(RESPONSES, ASPECTS), rel=1e-12)
  assert server.aspects() == {aspect: len(RESPONSES) for aspect, _ in ASPECTS.values()}
  assert len(ASPECTS) == 8
  name = example["character"]["name"]
  for _, body in server.requests:
    image, text = (item[item["type"]] for item in body["messages"][1]["content"])
    url = image["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(sent.convert("RGB")), np.asarray(rendered))
    assert tasks.roleplay_question(example) in text
    assert f"## **[Model B's Response Start]**\n\n{tasks.roleplay_reference(example)}\n\n" in text
    assert f"role-play as {name}, a person who is one of the Hypothetical Characters" in text


def test_personalised_rewards_use_the_personalised_aspects(server):
  example = tasks.personalised_example(0, 2)  # no "image": the scene is rendered
  got = _rewards(server)(example, RESPONSES[:2])
  assert got == pytest.approx(_expected(RESPONSES[:2], PERSONALISED_ASPECTS), rel=1e-12)
  assert set(PERSONALISED_ASPECTS) == set(PERSONALISED_DIMENSIONS)
  assert server.aspects() == {aspect: 2 for aspect, _ in PERSONALISED_ASPECTS.values()}
  _, body = server.requests[0]
  image, text = (item[item["type"]] for item in body["messages"][1]["content"])
  assert image["url"].startswith("data:image/png;base64,")
  role = tasks.primary_role(example)
  assert example["query"] in text and example["reference_reply"] in text
  assert f"in the role of {role.name} at {role.location}" in text
  assert " ".join(example["situation"]["eval_help"].split()) in text
  assert "{" not in text.split("[Instruction]")[1].split("The output should")[0]


def test_concurrency_gives_the_same_rewards(server):
  server.delay = 0.01
  example = tasks.roleplay_example(0, 3)
  serial = _rewards(server, concurrency=1)(example, RESPONSES)
  assert server.max_in_flight == 1
  parallel = _rewards(server, concurrency=8)(example, RESPONSES)
  assert server.max_in_flight > 1
  assert parallel == serial


def test_judge_error_names_the_example(server):
  server.refuse = RESPONSES[1]
  example = tasks.roleplay_example(0, 4)
  with pytest.raises(JudgeError, match=re.escape(repr(example["id"])) + ".*HTTP 400"):
    _rewards(server)(example, RESPONSES)


def test_contexts_from_the_examples():
  example = tasks.roleplay_example(0, 0)
  assert roleplay_context(example).other == "the curious human"
  inter = {**example, "script": "Harry Potter",
           "dialogue": [{**t, "speaker": "Ron Weasley"} if t["role"] == "user" else t
                        for t in example["dialogue"]]}
  context = roleplay_context(inter)
  assert (context.script, context.other_role) == ("Harry Potter", "Ron Weasley")
  person = personalised_context({"role_set": [{"location": "Home", "role": "Parent"},
                                              {"location": "Office", "role": "Engineer"}],
                                 "situation": {"location": "Office", "eval_help": ""}})
  assert person == PersonalisedContext("Parent at Home; Engineer at Office", "Office", "Engineer")


def test_programmatic_rewards_match_the_programmatic_judge():
  for example in (tasks.roleplay_example(0, 5), tasks.personalised_example(0, 5)):
    responses = [programmatic.reference_reply(example), "Hello there.", RESPONSES[1]]
    want = programmatic.rewards(example, tasks.example_facts(example), responses)
    assert programmatic_rewards(example, responses) == want
    assert want[0] == pytest.approx(1.0)
  assert make_reward_fn(judge_defaults()) is programmatic_rewards


def test_make_reward_fn_llm(server, monkeypatch):
  config = judge_defaults()
  config.kind, config.model, config.concurrency = "llm", "judge", 2
  with pytest.raises(ValueError, match=r"rl\.judge\.base_url.*--config\.rl\.judge\.base_url="):
    make_reward_fn(config)
  config.base_url = server.url
  config.model = ""
  with pytest.raises(ValueError, match=r"--config\.rl\.judge\.model="):
    make_reward_fn(config)
  config.model = "judge"
  config.kind = "gpt"
  with pytest.raises(ValueError, match="'programmatic', 'llm'"):
    make_reward_fn(config)
  config.kind = "llm"
  config.api_key_env = "LATENT_MCA_TEST_JUDGE_KEY"
  monkeypatch.setenv("LATENT_MCA_TEST_JUDGE_KEY", "secret")
  fn = make_reward_fn(config)
  assert isinstance(fn, LLMRewards) and fn.concurrency == 2
  example = tasks.roleplay_example(0, 6)
  assert fn(example, RESPONSES[:1]) == pytest.approx(_expected(RESPONSES[:1], ASPECTS))
  headers, body = server.requests[0]
  assert headers["Authorization"] == "Bearer secret" and body["model"] == "judge"
