"""The cards job end to end at toy sizes (configs/cards.py:smoke), and its config errors."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cards as cards_configs
from experiments import cards_grounding, cards_latent_fit, run
from latent_mca.cards import experts
from latent_mca.config_schema import ConfigError
from latent_mca.jobs import cards as cards_job
from latent_mca.models import qwen2_5_vl
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import checkpoint
from latent_mca.training.checkpoint import CheckpointNotFoundError
from tests.test_reference_configs import _load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cards"))
  config = cards_configs.get_config("smoke")
  config.games = "blackjack"
  return config, workdir, cards_job.run(config, workdir)


# The whole job compiles about a dozen programs (3-4 min on 2 CPU cores, 10 with the cores
# shared): slow. Its pieces run in CI: tests/test_card_*.py, test_cards_agent.py, test_rl_ppo.py.
@pytest.mark.slow
def test_every_stage_writes_its_outputs(smoke_run):
  config, workdir, metrics = smoke_run
  expert = json.load(open(os.path.join(workdir, "expert", "blackjack.json")))
  assert expert["transitions"] == len(expert["responses"]) == 16
  assert all('"action": "' in text for text in expert["responses"])
  for path in ("tokenizer/tokenizer.json", "reading/metrics.jsonl", "reading/result.json",
               "sft/metrics.jsonl", "latent_bc/metrics.jsonl",
               "blackjack/eval_sft.json", "blackjack/eval_latent.json",
               "blackjack/ppo_token/metrics.jsonl",
               "blackjack/ppo_latent/metrics.jsonl", "cards_results.md"):
    assert os.path.isfile(os.path.join(workdir, path)), path
  bc = json.load(open(os.path.join(workdir, "blackjack", "eval_latent.json")))
  assert bc["bc_steps"] == config.latent_bc.num_steps and bc["counted"] == cards.COUNTED
  assert bc["episodes"] >= bc["window"] == config.eval.blackjack_episodes
  assert metrics["blackjack/latent_bc/success_rate"] == bc["success_rate"]
  # smoke_config runs the reading stage at toy size: 2 glyph + 2 reading steps.
  assert 0.0 <= metrics["reading/blackjack/value_accuracy"] <= 1.0
  assert "reading/blackjack/value_accuracy/shuffled" in metrics
  for space in ("token", "latent"):
    run_dir = os.path.join(workdir, "blackjack", f"ppo_{space}")
    result = json.load(open(os.path.join(run_dir, "result.json")))
    # 2 updates x 2 steps x 4 environments; a Blackjack episode lasts 1-3 steps.
    assert result["env_steps"] == 16 and result["episodes"] >= 4
    assert 0.0 <= result["success_rate"] <= 100.0
    assert metrics[f"blackjack/ppo_{space}/train_success_rate"] == result["success_rate"]
    # the trained policy evaluated in fresh environments over the whole window
    evaluation = json.load(open(os.path.join(run_dir, "eval.json")))
    assert evaluation["episodes"] >= evaluation["window"] == config.eval.blackjack_episodes
    assert evaluation["updates"] == 2 and evaluation["counted"] == cards.COUNTED
    assert metrics[f"blackjack/ppo_{space}/success_rate"] == evaluation["success_rate"]
    lines = open(os.path.join(workdir, "blackjack", f"ppo_{space}", "metrics.jsonl")).readlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


@pytest.mark.slow
def test_the_report_sets_ours_beside_the_reference(smoke_run):
  _, workdir, _ = smoke_run
  table = open(os.path.join(workdir, "cards_results.md")).read()
  for row in ("ours: SFT only", "ours: latent BC only", "ours: token PPO", "ours: latent PPO",
              "ours: token PPO, in training", "reference: RL4VLM"):
    assert f"| {row} |" in table
  assert "| reference: RL4VLM | 40.2 |" in table  # Blackjack's reference number


@pytest.mark.slow
def test_the_latent_fit_counts_the_tokens_as_the_sft_loss_does(smoke_run):
  """experiments/cards_latent_fit: its warm-start accuracy is backbone.next_token_sums's on
  the same batches."""
  config, workdir, _ = smoke_run
  result = cards_latent_fit.measure(config, workdir, batches=2, batch_size=4)["blackjack"]
  _, _, layout, model_cfg = cards._setup(config, workdir)
  params = cards._sft_backbone(workdir, model_cfg)
  loader = cards._ExpertLoader(layout, [cards.ExpertData(config, workdir, "blackjack")], 4,
                               config.seed + cards_latent_fit._SEED_OFFSET)
  model = qwen2_5_vl.Qwen2_5_VL(model_cfg)
  sums = [jax.jit(functools.partial(backbone_lib.next_token_sums, model))(params, next(loader))
          for _ in range(2)]
  correct, count = (sum(float(s[k]) for s in sums) for k in ("correct", "count"))
  # the smoke config's responses (24 tokens) end before Blackjack's action: none counted
  assert result["tokens"] == count and result["action_tokens"] == 0
  assert result["sft_accuracy"] == pytest.approx(correct / count, abs=1e-6)
  for name in ("idm", "policy", "bc"):
    assert 0.0 <= result[f"{name}_accuracy"] <= 1.0
  cards_latent_fit.write(workdir, {"blackjack": result})
  assert "| Blackjack |" in open(os.path.join(workdir, "cards_latent_fit.md")).read()


@pytest.mark.slow
def test_a_second_run_reuses_every_stage(smoke_run):
  config, workdir, metrics = smoke_run
  again = cards_job.run(config, workdir)
  assert again == metrics


def test_bad_games_and_stages_are_config_errors(tmp_path):
  config = cards_configs.get_config("smoke")
  config.games = "numberline,poker"
  with pytest.raises(ConfigError, match="poker"):
    cards_job.run(config, str(tmp_path))
  config.games = "numberline"
  config.stages = "expert,train"
  with pytest.raises(ConfigError, match="train"):
    cards_job.run(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown argument"):
    cards_configs.get_config("poker")


def test_the_expert_plan_is_checked_in_the_config_and_against_the_saved_data(tmp_path):
  config = cards_configs.get_config("smoke")
  assert config.expert.plan == "canonical"
  config.expert.plan = "best"
  with pytest.raises(ConfigError, match="config.expert.plan: unknown plan 'best'"):
    cards_job.run(config, str(tmp_path))
  # data saved before the option planned by card order: going on with it needs plan=deal
  config.expert.plan = "canonical"
  meta = str(tmp_path / "expert" / "points24.json")
  with pytest.raises(ConfigError, match="points24.json: the expert data plans by 'deal'.*"
                                        "--config.expert.plan=deal"):
    cards.check_plan(config, "points24", {"responses": []}, meta)
  config.expert.plan = "deal"
  cards.check_plan(config, "points24", {"responses": []}, meta)
  cards.check_plan(config, "numberline", {"plan": "canonical"}, meta)  # plans nothing


def test_saved_expert_data_of_another_size_is_a_config_error_not_reused(tmp_path):
  config = cards_configs.get_config("smoke")
  config.expert.update(dict(transitions=100, num_envs=32))  # 4 steps of 32: 128
  meta = str(tmp_path / "expert" / "points24.json")
  cards.check_transitions(config, {"transitions": 128}, meta)
  with pytest.raises(ConfigError, match=r"points24.json: the expert data holds 64 transitions, "
                                        r"config.expert.transitions=100 asks for 128; pass "
                                        r"--config.expert.transitions=64"):
    cards.check_transitions(config, {"transitions": 64}, meta)
  config.expert.num_envs = 0
  with pytest.raises(ConfigError, match="config.expert.num_envs"):
    cards.check_transitions(config, {"transitions": 128}, meta)
  with pytest.raises(ConfigError, match="config.expert.num_envs"):
    cards_job.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_noise_actions_are_legal_random_and_never_end_a_points_episode():
  env = cards.make_env(cards_configs.get_config("smoke"), "points24")
  # K 4 4 A with "4" typed once: the other 4, the ace and every operator but "=" are left
  state = env.reset_state(jax.random.key(0)).replace(ranks=jnp.asarray([13, 4, 4, 1]))
  state = env.step_state(jax.random.key(0), state, env.actions.index("4"))[0]
  batch = jax.tree.map(lambda x: jnp.broadcast_to(x, (600,) + x.shape), state)
  drawn = cards.noise_actions(env, batch, np.random.default_rng(0))
  names = {env.actions[a] for a in drawn}
  assert names == {"1", "4", "10", "+", "-", "*", "/", "(", ")"}
  counts = np.bincount(drawn, minlength=env.num_actions)
  assert counts[counts > 0].min() > 600 / 9 / 2  # about uniform over the 9
  blackjack = cards.make_env(cards_configs.get_config("smoke"), "blackjack")
  states = jax.vmap(blackjack.reset_state)(jax.random.split(jax.random.key(1), 200))
  assert set(cards.noise_actions(blackjack, states, np.random.default_rng(0))) == {0, 1}


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_noisy_expert_data_labels_off_plan_states_with_the_experts_response(tmp_path, noise):
  config = cards_configs.get_config("smoke")
  config.games = "points24"
  config.expert.update(dict(transitions=256, num_envs=16, noise=noise))  # 16 steps
  metrics = cards.expert(config, str(tmp_path))
  meta = json.load(open(tmp_path / "expert" / "points24.json"))
  assert meta["noise"] == noise and meta["transitions"] == 256
  data = cards.ExpertData(config, str(tmp_path), "points24")
  off_plan = 0
  for i in range(len(data)):
    view = data.env.describe(jax.tree.map(lambda x: x[i], data.states))
    # every saved response is the expert's for its state, noisy step or not
    assert data.texts[i] == experts.expert_response("points24", view, "canonical")[0]
    plan = experts.planned_solution(view["values"], 24, "+-*/")
    off_plan += tuple(view["formula"]) != plan[:len(view["formula"])]
  if noise:
    assert off_plan > 10 and metrics["expert/points24/success_rate"] < 1.0
  else:
    assert off_plan == 0 and metrics["expert/points24/success_rate"] == 1.0
  # the same workdir with another noise is refused, not trained on
  config.expert.noise = 0.25
  with pytest.raises(ConfigError, match=f"played with noise {noise}, config.expert.noise is "
                                        f"0.25; pass --config.expert.noise={noise}"):
    cards.expert(config, str(tmp_path))
  with pytest.raises(ConfigError, match=f"played with noise {noise}"):
    cards.ExpertData(config, str(tmp_path), "points24")
  assert json.load(open(tmp_path / "expert" / "points24.json")) == meta
  config.expert.noise = 1.0
  with pytest.raises(ConfigError, match=r"config.expert.noise must be in \[0, 1\), got 1.0"):
    cards.check_expert_counts(config)


def test_the_gpu_config_is_all_four_games_with_a_larger_warm_start_per_game():
  base, gpu = cards_configs.get_config("all"), cards_configs.get_config("gpu")
  assert gpu.games == base.games == "numberline,ezpoints,points24,blackjack"
  assert (base.warm_start, gpu.warm_start) == ("shared", "per_game")
  assert (gpu.expert.transitions, gpu.reading.glyph_steps, gpu.reading.steps,
          gpu.reading.batch_size, gpu.sft.num_steps, gpu.sft.batch_size) == (
              4096, 1000, 8000, 32, 2000, 32)
  assert gpu.expert.transitions > base.expert.transitions
  assert gpu.reading.steps > base.reading.steps and gpu.sft.num_steps > base.sft.num_steps
  # everything else is the CPU job's
  for field in ("ppo", "latent", "latent_idm", "latent_bc", "eval", "backbone", "image_size"):
    assert gpu[field] == base[field], field


def test_the_cpu_config_runs_each_game_as_the_job_of_its_own_config():
  """configs/cards.py:cpu runs, in workdir/<game>, exactly the job configs/cards.py:<game>
  runs (so a finished one copied there is reused), Points24's with its recipe."""
  cpu = cards_configs.get_config("cpu")
  assert cpu.games == "numberline,ezpoints,points24,blackjack"
  assert cpu.warm_start == "separate"
  for game in cards.games(cpu):
    assert cards.separate_config(cpu, game).to_dict() == cards_configs.get_config(game).to_dict()
  assert cards.separate_config(cpu, "points24").latent_bc.num_steps == 1000
  assert cards.separate_config(cpu, "blackjack").reading.steps == 4000
  assert cards.separate_config(cpu, "numberline").reading.steps == 4000
  assert cards.separate_config(cpu, "ezpoints").reading.steps == 1200
  with pytest.raises(ConfigError, match="'separate': each game is a job of its own"):
    cards.warm_starts(cpu, "w")


@pytest.mark.parametrize("arg", ["all", "cpu", "gpu", "smoke", *cards_configs.GAMES])
def test_every_cards_config_passes_the_runners_validation(arg):
  """As `experiments.run` loads and checks them, per_game (an open group) included."""
  job, config = run.resolve_config(_load(f"{cards_configs.__file__}:{arg}"))
  assert job is cards_job and config.to_dict() == cards_configs.get_config(arg).to_dict()
  if arg in ("cpu", "gpu"):  # a per-game value the config sets can be overridden
    _, config = run.resolve_config(_load(f"{cards_configs.__file__}:{arg}",
                                         "--config.per_game.points24.ppo.learning_rate=3e-5"))
    assert cards.game_config(config, "points24").ppo.learning_rate == 3e-5


def test_separate_jobs_run_every_stage_in_each_games_folder_then_one_report(tmp_path,
                                                                            monkeypatch):
  """Each game's job runs the stages in workdir/<game> with its own config (written
  there); the report runs once more over all of them in the workdir."""
  config = cards_configs.get_config("smoke")
  config.games, config.warm_start = "numberline,points24", "separate"
  config.per_game.points24 = dict(ppo=dict(learning_rate=3e-5))
  calls = []
  for name in cards.STAGES:
    monkeypatch.setitem(cards.STAGES, name, lambda c, w, name=name: calls.append(
        (name, c.games, c.warm_start, c.ppo.learning_rate, os.path.relpath(w, tmp_path)))
        or {f"{name}/x": 1.0})
  metrics = cards_job.run(config, str(tmp_path))
  lr = config.ppo.learning_rate
  assert calls == (
      [(name, "numberline", "shared", lr, "numberline") for name in cards.STAGES]
      + [(name, "points24", "shared", 3e-5, "points24") for name in cards.STAGES]
      + [("report", "numberline,points24", "separate", lr, ".")])
  assert metrics["numberline/sft/x"] == metrics["points24/report/x"] == 1.0
  written = json.load(open(tmp_path / "points24" / "config.json"))
  assert written["games"] == "points24" and written["per_game"] == {}
  assert written["ppo"]["learning_rate"] == 3e-5


@pytest.mark.parametrize("module, name, args", [(cards_latent_fit, "measure", (8, 16)),
                                                (cards_grounding, "measure_workdir", (8, 4))])
def test_the_card_experiments_measure_separate_jobs_each_in_its_folder(module, name, args,
                                                                      monkeypatch):
  config = cards_configs.get_config("cpu")
  config.games = "ezpoints,blackjack"
  monkeypatch.setattr(module, "_measure_job", lambda c, w, *rest: {
      c.games: (c.warm_start, c.latent_bc.num_steps, w, rest)})
  assert getattr(module, name)(config, "W", *args) == {
      "ezpoints": ("shared", 200, os.path.join("W", "ezpoints"), args),
      "blackjack": ("shared", 200, os.path.join("W", "blackjack"), args)}
  config.warm_start = "shared"
  assert getattr(module, name)(config, "W", *args) == {
      "ezpoints,blackjack": ("shared", 200, "W", args)}


def test_the_report_of_separate_jobs_reads_each_games_folder(tmp_path):
  config = cards_configs.get_config("smoke")
  config.games, config.warm_start = "numberline,blackjack", "separate"
  for game, rate in (("numberline", 91.5), ("blackjack", 41.25)):
    folder = tmp_path / game / game
    os.makedirs(folder)
    (folder / "eval_sft.json").write_text(json.dumps(
        {"success_rate": rate, "episodes": 200, "counted": cards.COUNTED}))
  cards.report(config, str(tmp_path))
  text = open(tmp_path / "cards_results.md").read()
  assert "| ours: SFT only | 91.5 (200 ep.) | 41.2 (200 ep.) |" in text
  assert "each game a job of its own" in text


def test_restored_results_make_the_same_report_beside_a_game_run_again(tmp_path):
  """A game's results restored from a saved table (its workdir gone) are reported as they
  were, beside another game's results written since."""
  config = cards_configs.get_config("smoke")
  config.games, config.warm_start = "numberline,blackjack", "separate"
  first, second = tmp_path / "first", tmp_path / "second"
  for (label, rel, _), rate in zip(cards.ROWS, (91.5, 92.0, 93.25, 94.0, 95.5, 96.0)):
    for game, workdir in (("numberline", first), ("blackjack", first), ("blackjack", second)):
      path = workdir / game / game / rel
      os.makedirs(path.parent, exist_ok=True)
      path.write_text(json.dumps({"success_rate": rate - (game == "blackjack") * 50,
                                  "episodes": 200, "counted": cards.COUNTED,
                                  "made_from": {"sft": "sft/600@1"}, "label": label}))
  cards.report(config, str(first))
  table = str(first / "cards_results.json")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.cards_restore_results",
       f"--config={cards_configs.__file__}:smoke", "--config.games=numberline,blackjack",
       "--config.warm_start=separate", f"--workdir={second}", f"--results={table}",
       "--games=numberline"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.startswith(f"restored {len(cards.ROWS)} result files from {table}")
  for _, rel, _ in cards.ROWS:
    assert str(second / "numberline" / "numberline" / rel) in out
  cards.report(config, str(second))
  assert (second / "cards_results.md").read_text() == (first / "cards_results.md").read_text()
  assert "| ours: token PPO | 93.2 (200 ep.) | 43.2 (200 ep.) |" in (
      second / "cards_results.md").read_text()
  # again: the same files are kept; a differing one is an error that changes nothing
  assert cards.restore_results(config, table, str(second), ["numberline"]) == []
  changed = second / "numberline" / "numberline" / "eval_sft.json"
  changed.write_text(json.dumps({"success_rate": 1.0, "episodes": 200}))
  with pytest.raises(FileExistsError, match="eval_sft.json is there and differs"):
    cards.restore_results(config, table, str(second), ["numberline"])
  assert json.loads(changed.read_text())["success_rate"] == 1.0
  with pytest.raises(ValueError, match="holds no results for 'points24'"):
    cards.restore_results(config, table, str(tmp_path / "third"), ["points24"])
  with pytest.raises(FileNotFoundError, match="no such results table"):
    cards.restore_results(config, str(tmp_path / "none.json"), str(second), ["numberline"])


def _flat(tree: dict) -> dict:
  """`cards.flat_fields`, tuples as the lists a config.json holds."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in cards.flat_fields(tree).items()}


def test_the_points24_config_is_the_recorded_warm_start_that_wins_above_the_reference():
  """configs/cards.py:points24 is the config recorded with the 4000-step warm start of
  results/points24_plans (4.5% of the last 200 episodes), but for what one command now
  says otherwise: that run's reading stage had short formulas (run before it) and its SFT
  reading rows 0..15 symbols, now sft.reading_formula_symbols; PPO at lr 1e-5, as its
  ppo_token_lr1e-5 run; 1000 latent BC steps; the options added since at their defaults.
  The run made with it in one command (points24_config) recorded it, but for the latent
  BC steps, which its latent_bc1000 run recorded."""
  run = os.path.join(os.path.dirname(__file__), "..", "results", "points24_plans",
                     "vlm_reading_cpu", "formula15_visual_4k")
  recorded = _flat(json.load(open(os.path.join(run, "config.json"))))
  config = _flat(cards_configs.get_config("points24").to_dict())
  differ = {k: (recorded.get(k), config.get(k)) for k in set(recorded) | set(config)
            if recorded.get(k) != config.get(k)}
  assert differ == {
      "reading.formula_symbols": (15, 0), "sft.reading_formula_symbols": (None, 15),
      "ppo.learning_rate": (1e-4, 1e-5), "expert.noise": (None, 0.0),
      "latent_bc.num_steps": (200, 1000),
      "stages": ("sft", cards_job.default_config().stages)}
  # the one-command run, then its latent stage again with 1000 BC steps (latent_bc1000)
  one_command = os.path.join(run, "..", "points24_config")
  for folder, differ in ((one_command, {"stages", "latent_bc.num_steps"}),
                         (os.path.join(one_command, "latent_bc1000"), {"stages"})):
    recorded = _flat(json.load(open(os.path.join(folder, "config.json"))))
    assert {k for k in set(recorded) | set(config)
            if recorded.get(k) != config.get(k)} == differ, folder
  lr_run = json.load(open(os.path.join(run, "ppo_token_lr1e-5", "config.json")))
  assert lr_run["ppo"] == cards_configs.get_config("points24").ppo.to_dict() | {
      "trainable": [""]}
  # EZPoints takes the defaults; NumberLine's and Blackjack's recipes below
  assert _flat(cards_configs.get_config("ezpoints").to_dict()) == _flat(
      cards_configs.get_config("all").to_dict()) | {"games": "ezpoints"}


def _changed_from_the_defaults(game: str) -> dict:
  """{field: (the default, configs/cards.py:<game>'s)} where they differ."""
  config = _flat(cards_configs.get_config(game).to_dict())
  default = _flat(cards_configs.get_config("all").to_dict()) | {"games": game}
  return {k: (default[k], config[k]) for k in config if config[k] != default[k]}


def test_the_numberline_config_gives_its_job_the_reading_stage_of_a_game_alone():
  """configs/cards.py:numberline is the defaults with Blackjack's reading stage (1000 glyph
  and 4000 reading steps: the defaults' warm start restated NumberLine's numbers on 45% of
  deals and won 85.0%, results/cards_cpu_separate/numberline_defaults/)."""
  assert _changed_from_the_defaults("numberline") == {
      "reading.glyph_steps": (300, 1000), "reading.steps": (1200, 4000)}
  blackjack = cards_configs.get_config("blackjack").reading
  assert cards_configs.get_config("numberline").reading == blackjack


def test_the_blackjack_config_gives_its_job_the_winning_warm_starts_budget():
  """configs/cards.py:blackjack is the defaults with 4096 expert transitions, 2000 SFT
  steps at batch 16 (as the Blackjack-alone warm start of results/cards_gpu_h100/
  blackjack_alone_cpu, which won 39.4% and token PPO from it 41.7%) and a reading stage of
  its own with 1000 glyph and 4000 reading steps at 16 (that run's H100 reading stage:
  1000 + 8000 at 32 over four games, about as many Blackjack frames), and 16 PPO updates,
  the learning rate decaying over all 16: the settings of the run saved in
  results/cards_cpu_separate/blackjack_ppo16/ (latent PPO 40.8, above the reference)."""
  config = _flat(cards_configs.get_config("blackjack").to_dict())
  assert _changed_from_the_defaults("blackjack") == {
      "expert.transitions": (2048, 4096), "reading.glyph_steps": (300, 1000),
      "reading.steps": (1200, 4000), "sft.num_steps": (600, 2000),
      "ppo.num_updates": (4, 16), "ppo.lr_decay_updates": (4, 16)}
  ppo16 = _flat(json.load(open(os.path.join(
      ROOT, "results", "cards_cpu_separate", "blackjack_ppo16", "config.json"))))
  assert {k: v for k, v in ppo16.items() if k != "stages"} == {
      k: v for k, v in config.items() if k != "stages"}
  winner = _flat(json.load(open(os.path.join(
      os.path.dirname(__file__), "..", "results", "cards_gpu_h100", "blackjack_alone_cpu",
      "config.json"))))
  for key in ("expert.transitions", "sft.num_steps", "sft.batch_size", "reading.glyph_steps"):
    assert config[key] == winner[key], key
  assert config["reading.steps"] * config["reading.batch_size"] == (
      winner["reading.steps"] * winner["reading.batch_size"] // 4)


def test_a_stage_without_its_inputs_names_them(tmp_path):
  config = cards_configs.get_config("smoke")
  config.games = "numberline"
  with pytest.raises(CheckpointNotFoundError, match="tokenizer"):
    cards.sft(config, str(tmp_path))


def _copy_run(smoke_run, tmp_path, space: str, remove: str):
  """(config, a copy of the smoke workdir, its blackjack ppo_<space> folder, the json
  `remove` deleted there)."""
  config, workdir, _ = smoke_run
  copy = str(tmp_path / "cards")
  shutil.copytree(workdir, copy)
  run_dir = os.path.join(copy, "blackjack", f"ppo_{space}")
  removed = json.load(open(os.path.join(run_dir, remove)))
  os.remove(os.path.join(run_dir, remove))
  return config, copy, run_dir, removed


@pytest.mark.slow
def test_a_longer_ppo_run_resumes_with_its_episodes(smoke_run, tmp_path):
  config, copy, run_dir, before = _copy_run(smoke_run, tmp_path, "token", "result.json")
  longer = config.copy_and_resolve_references()
  longer.ppo.num_updates = 3
  result, evaluation = cards._ppo_run(longer, copy, "blackjack", "token")
  lines = open(os.path.join(run_dir, "metrics.jsonl")).readlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # resumed at update 2
  assert result["counted"] == cards.COUNTED and result["env_steps"] == 24
  # the episodes counted by update 2 are kept (update 3 may add to them)
  assert result["episodes"] >= before["episodes"]
  # the policy of update 3 is evaluated again, not the stale evaluation of update 2
  assert evaluation["updates"] == 3
  assert json.load(open(os.path.join(run_dir, "eval.json")))["updates"] == 3


@pytest.mark.slow
def test_a_trained_run_without_its_evaluation_is_evaluated_from_its_checkpoint(smoke_run,
                                                                                tmp_path):
  config, copy, run_dir, before = _copy_run(smoke_run, tmp_path, "latent", "eval.json")
  trained, evaluation = cards._ppo_run(config, copy, "blackjack", "latent")
  assert evaluation == before  # the same policy, the same keys: the same episodes
  lines = open(os.path.join(run_dir, "metrics.jsonl")).readlines()
  assert len(lines) == 2  # not trained again
  # a result whose checkpoint is gone cannot be evaluated: said by name, nothing deleted
  os.remove(os.path.join(run_dir, "eval.json"))
  shutil.rmtree(os.path.join(run_dir, "checkpoints"))
  with pytest.raises(ValueError, match="ppo_latent/result.json reports 2 updates"):
    cards._ppo_run(config, copy, "blackjack", "latent")
  assert json.load(open(os.path.join(run_dir, "result.json"))) == trained


@pytest.mark.slow
def test_what_was_made_from_a_warm_start_trained_again_is_made_again(smoke_run, tmp_path):
  """SFT trained on: its evaluation, the latent model, the latent policy's evaluation and
  both PPO runs are moved aside and made again from the new checkpoints; nothing is lost."""
  config, workdir, _ = smoke_run
  copy = str(tmp_path / "cards")
  shutil.copytree(workdir, copy)
  longer = config.copy_and_resolve_references()
  longer.sft.num_steps += 2
  cards_job.run(longer, copy)
  game = os.path.join(copy, "blackjack")
  for stale in ("latent_idm.stale1", "latent_bc.stale1", "blackjack/eval_sft.stale1.json",
                "blackjack/eval_latent.stale1.json", "blackjack/ppo_token.stale1/result.json",
                "blackjack/ppo_latent.stale1/eval.json"):
    assert os.path.exists(os.path.join(copy, stale)), stale
  sft, bc = (checkpoint.final_id(os.path.join(copy, s)) for s in ("sft", "latent_bc"))
  assert sft.startswith(f"sft/{longer.sft.num_steps}@")
  assert json.load(open(os.path.join(copy, "latent_idm", "made_from.json"))) == {"sft": sft}
  for rel, made_from in (("eval_sft.json", {"sft": sft}), ("eval_latent.json", {"latent_bc": bc}),
                         ("ppo_token/result.json", {"sft": sft}),
                         ("ppo_latent/eval.json", {"latent_bc": bc})):
    assert json.load(open(os.path.join(game, rel)))["made_from"] == made_from, rel
  assert "‡" not in open(os.path.join(copy, "cards_results.md")).read()


@pytest.mark.slow
def test_the_grounding_experiment_measures_each_policy_in_chunks(smoke_run, tmp_path):
  from experiments import cards_grounding

  config, workdir, _ = smoke_run
  rows = cards_grounding.measure_workdir(config, workdir, envs=5, chunk_size=2)
  assert set(rows) == {"blackjack/sft", "blackjack/latent_bc", "blackjack/ppo_token",
                       "blackjack/ppo_latent"}
  for row in rows.values():
    assert row["deals"] == 5  # chunks of 2, 2 and 1
    for key in ("correct", "parsed", "reads_decided_on", "expert_action",
                "expert_action_for_read"):
      share = row[key] * 5  # of 5 deals
      assert 0 <= share <= 5 and abs(share - round(share)) < 1e-9, (key, row)
    assert "plan_solves_deal" not in row
    examples = row["examples"]  # the first deals' responses, beside their true states
    assert len(examples) == 4 and all(isinstance(e["response"], str) for e in examples)
  # a workdir without the latent model or PPO: the warm start alone
  bare = str(tmp_path / "bare")
  shutil.copytree(workdir, bare, ignore=shutil.ignore_patterns("latent_*", "ppo_*"))
  assert set(cards_grounding.measure_workdir(config, bare, envs=2, chunk_size=2)) == {
      "blackjack/sft"}


def test_a_bad_warm_start_is_a_config_error(tmp_path):
  config = cards_configs.get_config("smoke")
  config.warm_start = "each"
  with pytest.raises(ConfigError,
                     match="config.warm_start: 'each'; choose shared, per_game or separate"):
    cards_job.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_results_of_the_other_warm_start_are_not_reused(tmp_path):
  """A result written before the option (no warm_start field) came from the shared warm
  start: a per-game run names it instead of reporting it as its own."""
  config = cards_configs.get_config("smoke")
  config.games = "blackjack"
  path = tmp_path / "blackjack" / "eval_sft.json"
  os.makedirs(path.parent)
  path.write_text(json.dumps({"success_rate": 38.2, "episodes": 1072}))
  assert cards.eval_sft(config, str(tmp_path)) == {"blackjack/sft/success_rate": 38.2}
  config.warm_start = "per_game"
  with pytest.raises(ConfigError, match="eval_sft.json was made from the 'shared' warm start.*"
                                        "--config.warm_start=shared"):
    cards.eval_sft(config, str(tmp_path))
  run_dir = tmp_path / "blackjack" / "ppo_token"
  os.makedirs(run_dir)
  (run_dir / "result.json").write_text(json.dumps({"updates": 4, "warm_start": "shared"}))
  with pytest.raises(ConfigError, match="result.json was made from the 'shared' warm start"):
    cards.ppo_token(config, str(tmp_path))


def test_the_latent_policy_is_evaluated_again_after_other_bc_steps(tmp_path, monkeypatch):
  """eval_latent reuses a result made after the config's BC steps; one made after other
  steps is kept aside (eval_latent.bc<steps>.json) and the policy evaluated again."""
  config = cards_configs.get_config("smoke")
  config.games = "blackjack"
  evaluated = []

  class FakeActor:
    def __init__(self, config, workdir, game, space):
      assert (game, space) == ("blackjack", "latent")

    def start_variables(self, workdir, rng):
      return "params", "extra"

  def fake_evaluate(actor, params, extra, path, label, **fields):
    evaluated.append(fields)
    backbone_lib.write_json(path, {"success_rate": 41.0, "episodes": 1003, **fields})

  monkeypatch.setattr(cards, "Actor", FakeActor)
  monkeypatch.setattr(cards, "evaluate", fake_evaluate)
  folder = tmp_path / "blackjack"
  os.makedirs(folder)
  steps = config.latent_bc.num_steps
  (folder / "eval_latent.json").write_text(json.dumps(
      {"success_rate": 39.0, "episodes": 1001, "warm_start": "shared", "bc_steps": steps}))
  assert cards.eval_latent(config, str(tmp_path)) == {"blackjack/latent_bc/success_rate": 39.0}
  assert evaluated == []
  config.latent_bc.num_steps = steps + 3
  assert cards.eval_latent(config, str(tmp_path)) == {"blackjack/latent_bc/success_rate": 41.0}
  assert evaluated == [{"warm_start": "shared", "made_from": {"latent_bc": None},
                        "bc_steps": steps + 3}]
  assert json.loads((folder / f"eval_latent.bc{steps}.json").read_text())["success_rate"] == 39.0
  assert cards.eval_latent(config, str(tmp_path)) == {"blackjack/latent_bc/success_rate": 41.0}
  assert len(evaluated) == 1


@pytest.mark.slow
def test_per_game_warm_starts_run_every_stage_in_each_games_folder(tmp_path):
  config = cards_configs.get_config("smoke")
  config.games, config.warm_start = "numberline,blackjack", "per_game"
  metrics = cards_job.run(config, str(tmp_path))
  for game in ("numberline", "blackjack"):
    for path in ("sft/metrics.jsonl", "latent_idm/metrics.jsonl", "latent_bc/metrics.jsonl",
                 "eval_sft.json", "eval_latent.json", "ppo_token/eval.json",
                 "ppo_latent/eval.json"):
      assert os.path.isfile(os.path.join(tmp_path, game, path)), (game, path)
    assert f"sft/{game}/loss" in metrics and f"latent_bc/{game}/loss" in metrics
    result = json.load(open(os.path.join(tmp_path, game, "ppo_latent", "result.json")))
    assert result["warm_start"] == "per_game"
  assert not os.path.exists(os.path.join(tmp_path, "sft"))
  assert "one warm start per game" in open(os.path.join(tmp_path, "cards_results.md")).read()


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_counterfactual_share_outside_0_1_is_a_config_error(tmp_path, share):
  config = cards_configs.get_config("smoke")
  assert config.sft.counterfactual_cards == 0.0  # off by default
  config.sft.counterfactual_cards = share
  with pytest.raises(ConfigError, match=f"config.sft.counterfactual_cards .* got {share}"):
    cards_job.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
