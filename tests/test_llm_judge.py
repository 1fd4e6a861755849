"""The LLM judge client against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time

import pytest
from PIL import Image

from latent_mca.judge import (ASPECTS, SYSTEM_PROMPT, JudgeError, LLMJudge, RolePlayContext,
                              pairwise_prompt, parse_pair, score_ratio)

CONTEXT = RolePlayContext(role="Granny Rose")


_OK = "Both fine, [Scores]: (5, 5)"


def send_json(handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
  """A 200 reply with a JSON body, as an OpenAI-compatible endpoint sends it."""
  handler.send_response(200)
  handler.send_header("Content-Type", "application/json")
  handler.send_header("Content-Length", str(len(data)))
  handler.end_headers()
  handler.wfile.write(data)


class _Server:
  """Answers POST /v1/chat/completions from a script of behaviours, one per request."""

  def __init__(self):
    self.script = collections.deque()
    self.requests = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append((self.path, dict(self.headers), body))
        kind, value = outer.script.popleft() if outer.script else ("reply", _OK)
        if kind == "sleep":
          time.sleep(value)
          kind, value = "reply", _OK
        if kind == "status":
          self.send_response(value)
          self.end_headers()
          return
        send_json(self, json.dumps({"choices": [{"message": {"content": value}}]}).encode()
                  if kind == "reply" else value)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


def _judge(server, **kw):
  return LLMJudge(base_url=server.url, model="judge-model", api_key="secret",
                  sleep=lambda s: None, **kw)


def test_scores_every_dimension_and_sends_the_pairwise_prompt(server):
  dims = ("fluency", "accuracy")
  server.script.extend([("reply", "Model A is less fluent. [Scores]: (6, 8)\nmore words"),
                        ("reply", "A is wrong, [Scores]: (Model A: 3, Model B: 9)")])
  scores = _judge(server, dimensions=dims).score(
      CONTEXT, "What is in the picture?", "A blue square.", "A red circle.",
      image=Image.new("RGB", (8, 8)))
  assert scores.candidate == {"fluency": 6.0, "accuracy": 3.0}
  assert scores.reference == {"fluency": 8.0, "accuracy": 9.0}
  assert scores.ratio == pytest.approx(9 / 17)
  path, headers, body = server.requests[0]
  assert path == "/v1/chat/completions"
  assert headers["Authorization"] == "Bearer secret"
  assert body["model"] == "judge-model" and body["temperature"] == 0.0
  system, user = body["messages"]
  assert system == {"role": "system", "content": SYSTEM_PROMPT}
  image, text = user["content"]
  assert image["image_url"]["url"].startswith("data:image/png;base64,")
  assert text["text"] == pairwise_prompt("fluency", CONTEXT, "What is in the picture?",
                                         "A blue square.", "A red circle.")


def test_prompt_follows_the_reference_layout():
  prompt = pairwise_prompt("tone", CONTEXT, "Hi?", "cand", "ref")
  # The candidate is Model A, the ground truth Model B, then the task and the aspect.
  assert prompt.index("cand") < prompt.index("ref") < prompt.index("[Instruction]")
  assert ("role-play as Granny Rose, a person who is one of the Hypothetical Characters, and "
          "talk with a curious human") in prompt
  assert "Tone Consistency: Do the responses maintain a consistent tone that aligns with " \
         "Granny Rose's typical manner" in prompt
  assert prompt.endswith("does not affect your judgment.")
  named = RolePlayContext(role="Harry Potter", script="Harry Potter", other_role="Ron Weasley")
  accuracy = pairwise_prompt("accuracy", named, "q", "a", "b")
  assert "talk with Ron Weasley from Harry Potter" in accuracy
  assert "accurately answer Ron Weasley's words" in accuracy
  assert len(ASPECTS) == 8


def test_retries_server_errors_timeouts_and_malformed_replies(server):
  server.script.extend([("status", 503), ("sleep", 1.0), ("reply", "I think both are fine"),
                        ("raw", b"not json"), ("reply", "ok [Scores]: (4, 7)")])
  judge = _judge(server, timeout_s=0.3, retries=4, dimensions=("tone",))
  assert judge.score(CONTEXT, "q", "x", "r").candidate == {"tone": 4.0}
  assert len(server.requests) == 5


def test_gives_up_with_a_named_problem(server):
  server.script.extend([("reply", "no scores here")] * 3)
  with pytest.raises(JudgeError, match="3 attempt.*Scores"):
    _judge(server, retries=2, dimensions=("tone",)).score(CONTEXT, "q", "x", "r")
  server.script.append(("status", 401))
  with pytest.raises(JudgeError, match="HTTP 401"):  # a client error is not retried
    _judge(server, retries=5, dimensions=("tone",)).score(CONTEXT, "q", "x", "r")
  assert len(server.requests) == 4


def test_unreachable_endpoint():
  judge = LLMJudge(base_url="http://127.0.0.1:9/v1", model="m", retries=1, timeout_s=1.0,
                   sleep=lambda s: None)
  with pytest.raises(JudgeError, match="cannot reach"):
    judge.complete("hello")


def test_parse_pair_and_ratio_by_hand():
  assert parse_pair("Good. [Scores]: (7, 3)\nbecause") == (7.0, 3.0)
  assert parse_pair("[Scores]: (Model A: 8.5, Model B: 6)") == (8.5, 6.0)
  for bad in ("", "7, 3", "[Scores]: (seven, three)", "[Scores]: (7)", "[Scores]: (11, 3)",
              "[Scores]: (7, 3, 2)", "[Scores]: (1, 2) [Scores]: (3, 4)"):
    with pytest.raises(ValueError):
      parse_pair(bad)
  assert score_ratio({"a": 6, "b": 3}, {"a": 9, "b": 9}) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    score_ratio({"a": 1}, {"a": 0})
