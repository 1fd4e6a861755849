"""The LLM judge client against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time

import pytest
from PIL import Image

from latent_mca.judge import (DIMENSIONS, JudgeError, LLMJudge, pairwise_prompt, parse_pair,
                              score_ratio)


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
        kind, value = outer.script.popleft() if outer.script else ("reply", "5 5")
        if kind == "sleep":
          time.sleep(value)
          kind, value = "reply", "5 5"
        if kind == "status":
          self.send_response(value)
          self.end_headers()
          return
        data = (json.dumps({"choices": [{"message": {"content": value}}]}).encode()
                if kind == "reply" else value)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
  server.script.extend([("reply", "8 6\nAssistant 2 is less fluent."), ("reply", "(9, 3)")])
  scores = _judge(server, dimensions=dims).score("Who is in the picture?", "A red circle.",
                                                 "A blue square.", image=Image.new("RGB", (8, 8)))
  assert scores.reference == {"fluency": 8.0, "accuracy": 9.0}
  assert scores.candidate == {"fluency": 6.0, "accuracy": 3.0}
  assert scores.ratio == pytest.approx(9 / 17)
  path, headers, body = server.requests[0]
  assert path == "/v1/chat/completions"
  assert headers["Authorization"] == "Bearer secret"
  assert body["model"] == "judge-model" and body["temperature"] == 0.0
  text, image = body["messages"][0]["content"]
  assert text["text"] == pairwise_prompt("fluency", "Who is in the picture?", "A red circle.",
                                         "A blue square.")
  assert image["image_url"]["url"].startswith("data:image/png;base64,")


def test_retries_server_errors_timeouts_and_malformed_replies(server):
  server.script.extend([("status", 503), ("sleep", 1.0), ("reply", "I think both are fine"),
                        ("raw", b"not json"), ("reply", "7 4")])
  judge = _judge(server, timeout_s=0.3, retries=4, dimensions=("tone",))
  assert judge.score("c", "r", "x").candidate == {"tone": 4.0}
  assert len(server.requests) == 5


def test_gives_up_with_a_named_problem(server):
  server.script.extend([("reply", "no scores here")] * 3)
  with pytest.raises(JudgeError, match="3 attempt.*not two scores"):
    _judge(server, retries=2, dimensions=("tone",)).score("c", "r", "x")
  server.script.append(("status", 401))
  with pytest.raises(JudgeError, match="HTTP 401"):  # a client error is not retried
    _judge(server, retries=5, dimensions=("tone",)).score("c", "r", "x")
  assert len(server.requests) == 4


def test_unreachable_endpoint():
  judge = LLMJudge(base_url="http://127.0.0.1:9/v1", model="m", retries=1, timeout_s=1.0,
                   sleep=lambda s: None)
  with pytest.raises(JudgeError, match="cannot reach"):
    judge.complete("hello")


def test_parse_pair_and_ratio_by_hand():
  assert parse_pair("\n 7 3\nbecause") == (7.0, 3.0)
  assert parse_pair("8.5,6") == (8.5, 6.0)
  for bad in ("", "seven three", "7", "11 3", "7 3 2"):
    with pytest.raises(ValueError):
      parse_pair(bad)
  assert score_ratio({"a": 6, "b": 3}, {"a": 9, "b": 9}) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    score_ratio({"a": 1}, {"a": 0})
  assert set(DIMENSIONS) >= {"fluency", "accuracy", "personality", "tone"}
