"""Outputs made from a checkpoint that was trained again since are moved aside and made again
(`latent_mca.training.lineage`), and the final checkpoint's id that tells them apart."""

import json
import os
import shutil

import jax.numpy as jnp
import pytest

from configs import cards as cards_configs
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import checkpoint, lineage


def _save(stage_dir, step, num_steps):
  with checkpoint.Checkpointer(stage_dir) as c:
    c.save(step, {"w": jnp.full(3, float(step))}, loader_state={}, history=[],
           num_steps=num_steps)


def test_the_final_checkpoint_id_changes_when_the_stage_trains_again(tmp_path):
  sft = str(tmp_path / "run" / "sft")
  assert checkpoint.final_id(sft) is None  # no folder
  _save(sft, 1, 2)
  assert checkpoint.final_id(sft) is None  # not finished
  _save(sft, 2, 2)
  first = checkpoint.final_id(sft)
  assert first.startswith("sft/2@")
  assert checkpoint.final_id(sft) == first
  shutil.copytree(tmp_path / "run", tmp_path / "copy")  # a copied workdir keeps its ids
  assert checkpoint.final_id(str(tmp_path / "copy" / "sft")) == first
  _save(sft, 3, 3)  # trained on to more steps
  assert checkpoint.final_id(sft).startswith("sft/3@")
  shutil.rmtree(sft)
  _save(sft, 2, 2)  # trained again from scratch: the same step, another id
  again = checkpoint.final_id(sft)
  assert again.startswith("sft/2@") and again != first


def test_changed_names_the_sources_with_another_id():
  assert lineage.changed({"sft": "sft/2@1"}, {"sft": "sft/2@1"}) == []
  assert lineage.changed({"sft": "sft/2@1"}, {"sft": "sft/2@5"}) == ["sft"]
  assert lineage.changed({"sft": "sft/2@1", "reading": "r"}, {"sft": "s", "reading": "q"}) \
      == ["sft", "reading"]
  # nothing recorded (an output from before), a source not recorded, or gone now: kept
  assert lineage.changed(None, {"sft": "sft/2@5"}) == []
  assert lineage.changed({}, {"sft": "sft/2@5"}) == []
  assert lineage.changed({"sft": "sft/2@1"}, {"sft": None}) == []


def test_move_aside_keeps_every_earlier_copy(tmp_path):
  path = tmp_path / "eval_sft.json"
  for text in ("1", "2"):
    path.write_text(text)
    lineage.move_aside(str(path))
  assert not path.exists()
  assert (tmp_path / "eval_sft.stale1.json").read_text() == "1"
  assert (tmp_path / "eval_sft.stale2.json").read_text() == "2"
  folder = tmp_path / "ppo_token"
  os.makedirs(folder / "checkpoints")
  assert lineage.move_aside(str(folder)) == str(tmp_path / "ppo_token.stale1")
  assert (tmp_path / "ppo_token.stale1" / "checkpoints").is_dir()


def test_folders_made_from_another_checkpoint_are_moved_aside(tmp_path):
  idm, bc = str(tmp_path / "latent_idm"), str(tmp_path / "latent_bc")
  lineage.check_folders([idm, bc], {"sft": "a"})
  assert json.load(open(os.path.join(idm, lineage.MADE_FROM))) == {"sft": "a"}
  os.makedirs(bc)
  open(os.path.join(bc, "metrics.jsonl"), "w").close()
  lineage.check_folders([idm, bc], {"sft": "a"})  # the same source: kept
  assert os.path.isfile(os.path.join(bc, "metrics.jsonl"))
  lineage.check_folders([idm, bc], {"sft": "b"})
  assert json.load(open(os.path.join(idm + ".stale1", lineage.MADE_FROM))) == {"sft": "a"}
  assert os.path.isfile(os.path.join(bc + ".stale1", "metrics.jsonl"))
  assert json.load(open(os.path.join(idm, lineage.MADE_FROM))) == {"sft": "b"}
  assert not os.path.exists(bc)
  # a start not there yet (its checkpoint missing): nothing is written
  lineage.check_folders([str(tmp_path / "ppo_token")], {"sft": None})
  assert not os.path.exists(tmp_path / "ppo_token")
  # a later stage left without its first was made from a first that is gone
  os.makedirs(bc)
  shutil.rmtree(idm)
  lineage.check_folders([idm, bc], {"sft": "b"})
  assert os.path.isdir(bc + ".stale2") and not os.path.exists(bc)
  # folders from before sources were recorded are kept as they are
  os.remove(os.path.join(idm, lineage.MADE_FROM))
  os.makedirs(bc)
  lineage.check_folders([idm, bc], {"sft": "c"})
  assert os.path.isdir(bc) and not os.path.exists(os.path.join(idm, lineage.MADE_FROM))


class _Evaluations:
  """Stands in for the Actor and `evaluate` of `stages.cards`: records each evaluation's
  fields and writes a result with the next success rate."""

  def __init__(self, monkeypatch):
    self.fields = []
    test = self

    class FakeActor:
      def __init__(self, config, workdir, game, space):
        self.config = config

      def start_variables(self, workdir, rng):
        return "params", "extra"

    def fake_evaluate(actor, params, extra, path, label, **fields):
      test.fields.append(fields)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      backbone_lib.write_json(path, {"success_rate": float(len(test.fields)), "episodes": 9,
                                     "counted": cards.COUNTED,
                                     **fields})

    monkeypatch.setattr(cards, "Actor", FakeActor)
    monkeypatch.setattr(cards, "evaluate", fake_evaluate)


def test_the_warm_start_is_evaluated_again_once_it_was_trained_again(tmp_path, monkeypatch):
  config = cards_configs.get_config("smoke")
  config.games = "blackjack"
  evaluations = _Evaluations(monkeypatch)
  sft = str(tmp_path / "sft")
  _save(sft, 2, 2)
  first = checkpoint.final_id(sft)
  assert cards.eval_sft(config, str(tmp_path)) == {"blackjack/sft/success_rate": 1.0}
  assert evaluations.fields[-1]["made_from"] == {"sft": first}
  assert cards.eval_sft(config, str(tmp_path)) == {"blackjack/sft/success_rate": 1.0}
  assert len(evaluations.fields) == 1  # reused
  _save(sft, 4, 4)  # SFT trained on
  assert cards.eval_sft(config, str(tmp_path)) == {"blackjack/sft/success_rate": 2.0}
  assert evaluations.fields[-1]["made_from"] == {"sft": checkpoint.final_id(sft)} != {
      "sft": first}
  old = json.load(open(tmp_path / "blackjack" / "eval_sft.stale1.json"))
  assert old["success_rate"] == 1.0 and old["made_from"] == {"sft": first}
  # the report marks a result of an earlier warm start, as when only the report runs
  path = tmp_path / "blackjack" / "eval_sft.json"
  path.write_text(json.dumps(dict(json.loads(path.read_text()), made_from={"sft": first})))
  cards.report(config, str(tmp_path))
  report = open(tmp_path / "cards_results.md").read()
  assert "| ours: SFT only | 2.0 (9 ep.) ‡ |" in report
  assert "‡ made from an earlier warm start" in report


def test_a_ppo_run_from_an_earlier_start_is_moved_aside_before_it_is_made(tmp_path,
                                                                           monkeypatch):
  """A done run of the current start is returned as it is; one of an earlier start is moved
  aside, folder and all, before the new one begins (the Actor)."""
  config = cards_configs.get_config("smoke")
  config.games = "blackjack"
  sft = str(tmp_path / "sft")
  _save(sft, 2, 2)
  sources = {"sft": checkpoint.final_id(sft)}
  run_dir = tmp_path / "blackjack" / "ppo_token"
  os.makedirs(run_dir)
  (run_dir / lineage.MADE_FROM).write_text(json.dumps(sources))
  done = {"updates": 2, "warm_start": "shared", "made_from": sources, "success_rate": 5.0}
  (run_dir / "result.json").write_text(json.dumps(done))
  (run_dir / "eval.json").write_text(json.dumps({"updates": 2, "success_rate": 6.0}))

  class Started(Exception):
    pass

  def actor(*args):
    raise Started

  monkeypatch.setattr(cards, "Actor", actor)
  assert cards._ppo_run(config, str(tmp_path), "blackjack", "token")[0] == done
  _save(sft, 4, 4)
  with pytest.raises(Started):
    cards._ppo_run(config, str(tmp_path), "blackjack", "token")
  assert json.load(open(tmp_path / "blackjack" / "ppo_token.stale1" / "result.json")) == done
  assert json.load(open(run_dir / lineage.MADE_FROM)) == {"sft": checkpoint.final_id(sft)}
  assert not (run_dir / "result.json").exists()
