"""notebooks/quickstart.ipynb on the smoke run: a scene, a reply in each action space, the
judge's scores of both."""

from __future__ import annotations

import json
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from latent_mca import tasks
from latent_mca.judge import programmatic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def run_notebook(path: str) -> dict:
  """Every code cell of a notebook exec'd in order in one namespace, as
  test_notebooks_and_demo runs them; returns the namespace."""
  with open(path) as f:
    cells = json.load(f)["cells"]
  namespace: dict = {}
  name = os.path.basename(path)
  for cell in cells:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{name}:{cell['id']}", "exec"), namespace)
  return namespace


@pytest.fixture(scope="module")
def notebook(smoke):
  """(namespace of the executed notebook, smoke config, smoke workdir); the notebook reads
  the workdir from $LATENT_MCA_WORKDIR, set for the run only."""
  config, workdir, _, _ = smoke
  saved = os.environ.get("LATENT_MCA_WORKDIR")
  os.environ["LATENT_MCA_WORKDIR"] = workdir
  try:
    namespace = run_notebook(NOTEBOOK)
  finally:
    if saved is None:
      del os.environ["LATENT_MCA_WORKDIR"]
    else:
      os.environ["LATENT_MCA_WORKDIR"] = saved
    plt.close("all")
  return namespace, config, workdir


def test_the_notebook_is_stored_clean():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5)
  ids = [cell["id"] for cell in nb["cells"]]
  assert len(set(ids)) == len(ids) and all(ids)
  assert nb["cells"][0]["cell_type"] == "markdown"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["execution_count"] is None and cell["outputs"] == [], cell["id"]


def test_it_reads_the_given_workdir_and_its_config(notebook):
  ns, config, workdir = notebook
  assert ns["workdir"] == workdir
  assert ns["config"].to_dict() == config.to_dict()


def test_the_scene_is_the_examples_image_at_the_configured_size(notebook):
  ns, config, _ = notebook
  image = np.asarray(ns["image"])
  size = config.data.image_size
  assert image.shape == (size, size, 3) and image.dtype == np.uint8
  # What the model was shown: the dataset's stored rendering of the same scene.
  np.testing.assert_array_equal(image, np.asarray(ns["example"]["image"]))


def test_the_prompt_asks_the_question_and_leaves_out_the_reply(notebook):
  ns, _, _ = notebook
  example, prompt_text = ns["example"], ns["prompt_text"]
  question = (tasks.roleplay_question(example) if ns["task"] == "roleplay"
              else example["query"])
  assert question in prompt_text
  assert ns["reference"] == programmatic.reference_reply(example)
  assert ns["reference"] not in prompt_text
  assert prompt_text.endswith("<|im_start|>assistant\n")


def test_both_replies_are_text(notebook):
  ns, _, _ = notebook
  for name in ("token_reply", "latent_reply"):
    assert isinstance(ns[name], str) and ns[name].strip(), name


def test_latent_codes_are_the_policys_codes_one_per_reply_token(notebook):
  ns, config, _ = notebook
  codes = ns["latent_codes"]
  assert codes and all(type(c) is int for c in codes)
  assert all(0 <= c < config.latent.num_codes for c in codes)
  assert ns["num_codes"] == config.latent.num_codes
  assert len(codes) == len(ns["latent_tokens"]) <= config.rl.max_new_tokens
  # The decoded tokens are the reply, but for a stop token at its end.
  text = "".join(ns["latent_tokens"])
  for special in ns["processor"].tokenizer.all_special_tokens:
    text = text.replace(special, "")
  assert text.strip() == ns["latent_reply"].strip()


def test_judge_scores_are_in_range_and_the_rewards_are_rls(notebook):
  ns, _, _ = notebook
  example, scores, rewards = ns["example"], ns["scores"], ns["rewards"]
  dims = programmatic.dimensions_for(example)
  assert set(scores) == {"reference", "token", "latent"}
  for name, s in scores.items():
    assert set(s) == set(dims), name
    assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 10.0
               for v in s.values()), (name, s)
  assert sum(scores["reference"].values()) > 0  # the reward's denominator
  facts = tasks.example_facts(example)
  for space in ("token", "latent"):
    reward = rewards[space]
    assert math.isfinite(reward) and reward >= 0.0
    assert reward == pytest.approx(sum(scores[space].values())
                                   / sum(scores["reference"].values()))
    assert reward == pytest.approx(programmatic.reward(example, facts, ns[f"{space}_reply"]))
    # The RL sampler's own rewards for the same reply (one row per device, all alike).
    assert reward == pytest.approx(float(ns[f"{space}_rewards"][0]))
