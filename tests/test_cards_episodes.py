"""The cards job's episode window (success over the last N episodes without a bias to short
ones), how the report marks results counted otherwise, and the record of how frames are drawn."""

import json
import os

import numpy as np
import pytest

from latent_mca.stages.cards import Episodes


def _play(episodes, lengths, successes, steps, age=None):
  """Env e plays episodes of lengths[e] steps ending in successes[e], for `steps` steps;
  `age` (updated in place) carries the running episodes' ages from one call to the next."""
  age = np.zeros(len(lengths), int) if age is None else age
  for _ in range(steps):
    age += 1
    done = age == np.asarray(lengths)
    episodes.add(done, np.asarray(successes) & done, np.where(done, 1.0, 0.0))
    age[done] = 0


def test_short_successes_do_not_crowd_out_a_long_failure():
  # env 0 wins in one step, again and again; env 1 loses after ten.
  episodes, age = Episodes(2), np.zeros(2, int)
  _play(episodes, [1, 10], [True, False], 5, age)
  # Five wins have finished, but the loss begun at step 0 has not: nothing counts yet
  # (counted in finishing order, this would read 100%).
  assert len(episodes) == 0 and np.isnan(episodes.success_rate(200))
  _play(episodes, [1, 10], [True, False], 5, age)
  # step 10: the loss has finished; the ten wins and the loss begun at 0..9 all count
  assert len(episodes) == 11
  assert episodes.success_rate(200) == pytest.approx(100.0 * 10 / 11)
  # the window takes the latest starts: the last 3 are wins begun at steps 7, 8, 9
  assert episodes.success_rate(3) == 100.0
  assert [r[0] for r in episodes.counted()][-3:] == [7, 8, 9]


def test_equal_lengths_count_every_finished_episode():
  episodes = Episodes(3)
  _play(episodes, [2, 2, 2], [True, False, True], 6)
  assert len(episodes) == 9
  assert episodes.success_rate(9) == pytest.approx(100.0 * 6 / 9)


def test_state_keeps_what_counts_and_a_resumed_window_goes_on():
  episodes = Episodes(2)
  _play(episodes, [1, 4], [True, False], 6)
  # counted: wins begun at 0..3 and the loss begun at 0 (the loss begun at 4 still runs)
  assert len(episodes) == 5
  state = episodes.state()
  resumed = Episodes.restore(2, state)
  assert resumed.counted() == episodes.counted() and resumed.step == 6
  # the environments start afresh at step 6
  _play(resumed, [1, 4], [True, False], 4)
  assert len(resumed) == 5 + 4 + 1
  assert resumed.success_rate(100) == pytest.approx(100.0 * 8 / 10)
  # an earlier version's state (outcomes in finishing order) is refused by name
  with pytest.raises(ValueError, match="W/numberline/ppo_token.*earlier version"):
    Episodes.restore(2, {"outcomes": [True], "returns": [1.0]}, "W/numberline/ppo_token")


def test_the_report_marks_results_counted_in_finishing_order(tmp_path):
  from configs import cards as cards_configs
  from latent_mca.stages import cards

  config = cards_configs.get_config("smoke")
  config.games = "numberline,blackjack"
  for game, counted in (("numberline", {"counted": cards.COUNTED}), ("blackjack", {})):
    os.makedirs(tmp_path / game)
    with open(tmp_path / game / "eval_sft.json", "w") as f:
      json.dump({"success_rate": 50.0, "episodes": 200, "window": 200, **counted}, f)
  cards.report(config, str(tmp_path))
  table = (tmp_path / "cards_results.md").read_text()
  row = next(line for line in table.splitlines() if line.startswith("| ours: SFT only"))
  assert row == "| ours: SFT only | 50.0 (200 ep.) | 50.0 (200 ep.) † |"
  assert "† written by an earlier version" in table
  # every result counted by start: no mark, no footnote
  with open(tmp_path / "blackjack" / "eval_sft.json", "w") as f:
    json.dump({"success_rate": 50.0, "episodes": 200, "window": 200,
               "counted": cards.COUNTED}, f)
  cards.report(config, str(tmp_path))
  assert "†" not in (tmp_path / "cards_results.md").read_text()


def test_a_workdir_records_how_frames_are_drawn_and_warns_on_other_pixels(tmp_path, caplog):
  from latent_mca.stages import cards

  cards.check_render(str(tmp_path))
  made = json.loads((tmp_path / cards.RENDER).read_text())
  assert made["fingerprint"] == cards.render_lib.fingerprint() and made["pillow"]
  with caplog.at_level("WARNING"):
    cards.check_render(str(tmp_path))  # the same machine: silent
  assert "draws the card frames differently" not in caplog.text
  made.update(fingerprint="0" * 64, pillow="9.0.0", freetype="2.10.0")
  (tmp_path / cards.RENDER).write_text(json.dumps(made))
  with caplog.at_level("WARNING"):
    cards.check_render(str(tmp_path))
  assert "draws the card frames differently" in caplog.text and "9.0.0" in caplog.text
  # the record stays the first machine's
  assert json.loads((tmp_path / cards.RENDER).read_text())["pillow"] == "9.0.0"


class _ScriptedActor:
  """An Actor whose environment e plays episodes of lengths[e] steps ending in wins[e], so
  `evaluate`'s count can be worked out by hand; it acts without a model."""

  def __init__(self, config, lengths, wins):
    self.config, self.game = config, "numberline"
    self.lengths, self.wins = np.asarray(lengths), np.asarray(wins)
    self.acted = 0

  def check_batch_size(self, batch_size, field):
    assert batch_size == len(self.lengths), field

  def reset(self, rng, num_envs):
    return np.zeros((num_envs, 1)), np.zeros(num_envs, int)

  def act(self, params, extra, obs, rng, np_rng):
    self.acted += 1
    return {"frames": obs}, np.zeros(len(obs), int), 0.25, []

  def env_step(self, keys, age, index):
    age = age + 1
    done = age == self.lengths
    info = {"success": self.wins & done}
    return np.zeros((len(age), 1)), np.where(done, 0, age), done.astype(np.float32), done, info


def test_evaluate_plays_until_the_window_counts_by_start(tmp_path):
  from configs import cards as cards_configs
  from latent_mca.stages import cards

  config = cards_configs.get_config("smoke")
  config.eval.update(episodes=6, num_envs=2)
  # env 0 wins in one step, env 1 loses after four. Six episodes have finished by step 5,
  # but the loss begun at step 4 runs to step 8: only then do six (ten) count. The last six
  # by start are wins begun at 3, 4, 5, 6, 7 and the loss begun at 4.
  actor = _ScriptedActor(config, [1, 4], [True, False])
  path = str(tmp_path / "numberline" / "ppo_token" / "eval.json")
  result = cards.evaluate(actor, {}, {}, path, "ppo_token", updates=3)
  assert actor.acted == 8
  assert result == {"success_rate": pytest.approx(100.0 * 5 / 6), "episodes": 10,
                    "window": 6, "counted": cards.COUNTED, "random_action_rate": 0.25,
                    "updates": 3}
  assert json.loads(open(path).read()) == result


def test_the_report_sets_evaluated_policies_beside_their_training(tmp_path):
  from configs import cards as cards_configs
  from latent_mca.stages import cards

  config = cards_configs.get_config("smoke")
  config.games = "blackjack"
  run = tmp_path / "blackjack" / "ppo_token"
  os.makedirs(run)
  for name, rate, episodes in (("eval.json", 41.5, 1003), ("result.json", 30.0, 90)):
    with open(run / name, "w") as f:
      json.dump({"success_rate": rate, "episodes": episodes, "window": 1000,
                 "counted": cards.COUNTED}, f)
  cards.report(config, str(tmp_path))
  rows = dict(line.split(" | ", 1) for line in
              (tmp_path / "cards_results.md").read_text().splitlines()
              if line.startswith("| ours"))
  assert rows["| ours: token PPO"] == "41.5 (1003 ep.) |"
  assert rows["| ours: token PPO, in training"] == "30.0 (90 ep.) |"
  assert rows["| ours: SFT only"] == rows["| ours: latent PPO"] == "— |"
