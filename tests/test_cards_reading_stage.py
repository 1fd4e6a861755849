"""The cards job's reading stage (latent_mca.stages.cards.reading) at smoke sizes, and how
sft starts from it."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import cards as cards_configs
from latent_mca.cards import grounding
from latent_mca.config_schema import ConfigError
from latent_mca.data.tokenizers import IM_END
from latent_mca.jobs import cards as cards_job
from latent_mca.models import qwen2_5_vl
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import cards
from latent_mca.training import checkpoint
from latent_mca.training.checkpoint import CheckpointNotFoundError

GAMES = "numberline,blackjack"


def _config():
  config = cards_configs.get_config("smoke")
  config.games = GAMES
  return config


@pytest.fixture(scope="module")
def read(tmp_path_factory):
  """(config, workdir, metrics): expert, tokenizer and reading (2 glyph + 2 reading steps)."""
  workdir = str(tmp_path_factory.mktemp("cards_reading"))
  config = _config()
  cards.expert(config, workdir)
  cards.tokenizer(config, workdir)
  return config, workdir, cards.reading(config, workdir)


def _model_cfg(config, workdir):
  return backbone_lib.model_config(config, cards.load_processor(config, workdir))


def _equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_stage_sits_between_tokenizer_and_sft():
  order = list(cards.STAGES)
  assert order.index("tokenizer") < order.index("reading") == order.index("sft") - 1


def test_the_stage_writes_its_checkpoint_metrics_and_accuracies(read):
  config, workdir, metrics = read
  stage = os.path.join(workdir, "reading")
  steps = [json.loads(line)["step"] for line in open(os.path.join(stage, "metrics.jsonl"))]
  assert steps == [2, 4]  # log_every 2 over 2 glyph + 2 reading steps
  with checkpoint.Checkpointer(stage) as ckpt:
    assert ckpt.latest_step() == 4
  for game in GAMES.split(","):
    for key in (f"reading/{game}/value_accuracy", f"reading/{game}/value_accuracy/shuffled"):
      assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["reading/step"] == 4 and np.isfinite(metrics["reading/loss"])
  result = json.load(open(os.path.join(stage, "result.json")))
  assert result["metrics"] == metrics and result["num_steps"] == 4
  assert result["formula_symbols"] == 0


def test_a_stage_read_with_other_formulas_is_a_config_error_and_kept(read):
  config, workdir, _ = read
  result = os.path.join(workdir, "reading", "result.json")
  before = open(result).read()
  longer = _with(config)
  longer.reading.formula_symbols = 15
  with pytest.raises(ConfigError, match="formula_symbols=0, the config asks for 15"):
    cards.reading(longer, workdir)
  assert open(result).read() == before


def test_long_formula_readings_fit_their_width_uncut(read):
  config, workdir, _ = read
  processor = cards.load_processor(config, workdir)
  config = _with(config, games="points24")
  config.reading.formula_symbols = 15
  loader = cards._ReadingLoader(config, processor, ["points24"], glyph_steps=1)
  glyphs, first = next(loader), next(loader)
  assert loader.width > cards.reading_lib.MAX_READING
  assert glyphs["input_ids"].shape == first["input_ids"].shape
  frames = loader.frames[0]
  batch = frames.batch(jax.random.key(1), 256)
  formulas = []
  for ids, mask in zip(batch["input_ids"], batch["loss_mask"]):
    text = processor.tokenizer.decode(ids[mask == 1])
    assert text.endswith('", ') and mask[-1] == 0, text  # whole, with room to spare
    formulas.append(json.loads(text[:-2] + "}")["current formula"])
  assert max(map(len, formulas)) > 12 and min(map(len, formulas)) == 0
  others = [cards.make_env(config, g) for g in ("numberline", "blackjack")]
  assert cards.reading_lib.reading_width(processor.tokenizer, others, 15) == 32  # MAX_READING


def test_the_batches_share_one_shape_and_replay_by_step(read):
  config, workdir, _ = read
  processor = cards.load_processor(config, workdir)
  names = cards.games(config)
  loader = cards._ReadingLoader(config, processor, names)
  batches = [next(loader) for _ in range(4)]  # 2 glyph steps, then numberline, blackjack
  shapes = {k: v.shape for k, v in batches[0].items()}
  assert all({k: v.shape for k, v in b.items()} == shapes for b in batches)
  assert "value_mask" not in batches[0]
  decode = processor.tokenizer.decode
  glyph = decode(batches[0]["input_ids"][0][batches[0]["loss_mask"][0] == 1])
  assert glyph.strip() in cards.reading_lib.SYMBOLS
  assert "Dealer has" in decode(batches[3]["input_ids"][0][batches[3]["loss_mask"][0] == 1])
  again = cards._ReadingLoader(config, processor, names)
  again.restore({"step": 3})
  assert _equal(next(again), batches[3])


def test_target_batch_pads_and_cuts_its_targets_to_the_width(read):
  config, workdir, _ = read
  processor = cards.load_processor(config, workdir)
  ids = cards.reading_lib.prompt_ids(processor, config.image_size, None)
  prompt = (ids, np.ones(len(ids), np.int32))
  frames = np.stack([cards.reading_lib.glyph_frame(s, 40) for s in ("7", "10")])
  texts = ["7", "10 A 10 A 10 A"]
  full = [processor.tokenizer(t)["input_ids"] for t in texts]
  width = len(full[0]) + 1
  assert len(full[1]) > width  # the second one is cut
  batch = cards.reading_lib.target_batch(processor, prompt, texts, frames, config.image_size,
                                         width)
  targets, mask = batch["input_ids"][:, -width:], batch["loss_mask"][:, -width:]
  assert targets.shape == (2, width)
  assert list(targets[0][mask[0] == 1]) == full[0]
  assert targets[0, -1] == processor.pad_token_id and mask[0, -1] == 0
  assert list(targets[1]) == full[1][:width] and mask[1].all()


def test_sft_starts_from_the_readings_final_params(read, monkeypatch, tmp_path):
  config, workdir, _ = read
  model_cfg = _model_cfg(config, workdir)
  start = cards.sft_start_params(config, workdir, model_cfg)
  abstract = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
  final = checkpoint.load_params(os.path.join(workdir, "reading"), abstract)
  fresh = nn.meta.unbox(qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed)))
  assert _equal(start, final) and not _equal(start, fresh)

  class Started(Exception):
    pass

  def train(stage, workdir, state, *args, **kwargs):  # sft's first state, then stop
    raise Started(stage, state.params)

  monkeypatch.setattr(cards.loop, "train", train)
  copy = str(tmp_path / "cards")  # sft readies its folder: not in the shared workdir
  shutil.copytree(workdir, copy)
  with pytest.raises(Started) as started:
    cards.sft(config, copy)
  assert started.value.args[0] == "sft" and _equal(nn.meta.unbox(started.value.args[1]), final)


def test_sft_records_the_reading_it_starts_from_and_starts_again_after_another(read,
                                                                              monkeypatch,
                                                                              tmp_path):
  """sft/made_from.json names the reading stage's final checkpoint; an sft made from
  another one (the reading stage trained again since) is moved aside, not resumed."""
  config, workdir, _ = read
  copy = str(tmp_path / "cards")
  shutil.copytree(workdir, copy)

  class Started(Exception):
    pass

  def train(*args, **kwargs):
    raise Started

  monkeypatch.setattr(cards.loop, "train", train)
  with pytest.raises(Started):
    cards.sft(config, copy)
  made_from = os.path.join(copy, "sft", "made_from.json")
  reading = checkpoint.final_id(os.path.join(copy, "reading"))
  assert reading.startswith("reading/4@")  # 2 glyph + 2 reading steps
  assert json.load(open(made_from)) == {"reading": reading}
  with open(made_from, "w") as f:
    json.dump({"reading": "reading/4@1"}, f)  # as if made before the reading was redone
  with pytest.raises(Started):
    cards.sft(config, copy)
  assert json.load(open(os.path.join(copy, "sft.stale1", "made_from.json"))) == {
      "reading": "reading/4@1"}
  assert json.load(open(made_from)) == {"reading": reading}


@pytest.mark.parametrize("spec", ["visual", "visual, embed_tokens", "decoder,lm_head",
                                  "visual,decoder:1"])
def test_sft_takes_the_groups_from_reading_asks_for_and_starts_the_rest_fresh(read, spec):
  config, workdir, _ = read
  model_cfg = _model_cfg(config, workdir)
  abstract = nn.meta.unbox(qwen2_5_vl.abstract_params(model_cfg))
  final = checkpoint.load_params(os.path.join(workdir, "reading"), abstract)
  fresh = nn.meta.unbox(qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed)))
  start = cards.sft_start_params(_with(config, sft=dict(from_reading=spec)), workdir, model_cfg)
  taken = {name.strip() for name in spec.split(",")}
  assert set(start) == set(final) and "visual" in start  # lm_head only where untied
  for group in start:
    assert not _equal(final[group], fresh[group]), group  # reading moved every group
    if group == "decoder" and "decoder:1" in taken:  # layer 0 read, layer 1 and norm fresh
      layers = start[group]["layers"]
      assert _equal(jax.tree.map(lambda x: x[:1], layers),
                    jax.tree.map(lambda x: x[:1], final[group]["layers"]))
      assert _equal(jax.tree.map(lambda x: x[1:], layers),
                    jax.tree.map(lambda x: x[1:], fresh[group]["layers"]))
      assert _equal(start[group]["norm"], fresh[group]["norm"])
    else:
      assert _equal(start[group], (final if group in taken else fresh)[group]), group


@pytest.mark.parametrize("spec", ["", "vision", "visual,head", "decoder:0", "visual:1",
                                  "decoder:x", "decoder:"])
def test_an_unknown_group_from_reading_is_a_config_error(read, tmp_path, spec):
  config, _, _ = read
  with pytest.raises(ConfigError, match="config.sft.from_reading"):
    cards_job.run(_with(config, sft=dict(from_reading=spec)), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_more_decoder_layers_from_reading_than_the_model_has_is_a_config_error(read):
  config, workdir, _ = read
  with pytest.raises(ConfigError, match="decoder:3, but the decoder has 2 layers"):
    cards.sft_start_params(_with(config, sft=dict(from_reading="decoder:3")), workdir,
                           _model_cfg(config, workdir))


def test_a_second_run_reuses_the_finished_stage(read, monkeypatch):
  config, workdir, metrics = read
  log = os.path.join(workdir, "reading", "metrics.jsonl")
  before = open(log).read()
  monkeypatch.setattr(cards.loop, "train", lambda *a, **k: pytest.fail("trained again"))
  assert cards.reading(config, workdir) == metrics
  assert cards_job.run(_with(config, stages="reading"), workdir) == metrics
  assert open(log).read() == before


def _with(config, **fields):
  config = config.copy_and_resolve_references()
  config.update(fields)
  return config


def test_zero_steps_are_a_noop_and_sft_then_starts_fresh(read, tmp_path):
  config, workdir, _ = read
  off = _with(config)
  off.reading.update(dict(glyph_steps=0, steps=0))
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  assert cards.reading(off, empty) == {}  # no tokenizer needed, nothing written
  assert os.listdir(empty) == []
  own = str(tmp_path / "own")
  shutil.copytree(cards.tokenizer_dir(workdir), cards.tokenizer_dir(own))
  assert cards.reading(off, own) == {}
  assert os.listdir(own) == ["tokenizer"]
  model_cfg = _model_cfg(config, workdir)
  fresh = nn.meta.unbox(qwen2_5_vl.init_params(model_cfg, jax.random.key(config.seed)))
  assert _equal(nn.meta.unbox(cards.sft_start_params(off, own, model_cfg)), fresh)
  # Reading asked for but not run: sft names the stage instead of starting from scratch.
  with pytest.raises(CheckpointNotFoundError, match="reading"):
    cards.sft_start_params(config, own, model_cfg)


def test_a_missing_tokenizer_names_the_stage_to_run(tmp_path):
  with pytest.raises(CheckpointNotFoundError, match="tokenizer"):
    cards.reading(_config(), str(tmp_path))


@pytest.mark.parametrize("field, value", [("glyph_steps", -1), ("steps", -5),
                                          ("glyph_scale", 0.5), ("batch_size", 0),
                                          ("formula_symbols", -1)])
def test_bad_reading_values_are_config_errors_naming_the_field(tmp_path, field, value):
  config = _config()
  config.reading[field] = value
  with pytest.raises(ConfigError, match=f"config.reading.{field}"):
    cards_job.run(config, str(tmp_path))
  with pytest.raises(ConfigError, match=f"config.reading.{field}"):
    cards.reading(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_a_warmup_longer_than_the_stage_is_a_config_error(tmp_path):
  config = _config()
  config.reading.optimizer.warmup_steps = 10
  with pytest.raises(ConfigError, match="warmup_steps"):
    cards.reading(config, str(tmp_path))


def test_the_report_says_the_warm_start_read_first(read, tmp_path):
  config, workdir, _ = read
  cards.report(config, workdir)
  header = open(os.path.join(workdir, "cards_results.md")).read().split("\n")[2]
  assert "reading pretraining first (2 glyph steps, 2 reading steps)" in header
  config = _config()
  config.reading.glyph_steps = config.reading.steps = 0
  cards.report(config, str(tmp_path))
  assert "reading" not in open(os.path.join(tmp_path, "cards_results.md")).read().split("\n")[2]


def test_per_game_warm_starts_train_each_game_alone_in_its_folder(read, tmp_path):
  """warm_start=per_game trains workdir/<game>/sft on that game alone: the same params as a
  shared warm start of that game alone, and the game's actor starts from it."""
  config, workdir, _ = read
  per_game, alone = str(tmp_path / "per_game"), str(tmp_path / "alone")
  for copy in (per_game, alone):
    shutil.copytree(workdir, copy)
  config = _with(config, warm_start="per_game")
  metrics = cards.sft(config, per_game)
  assert not os.path.exists(os.path.join(per_game, "sft"))
  assert set(cards.games(config)) == {k.split("/")[1] for k in metrics if k.endswith("/loss")}
  cards.sft(_with(config, warm_start="shared", games="blackjack"), alone)
  model_cfg = _model_cfg(config, workdir)
  load = lambda folder: cards._sft_backbone(folder, model_cfg)
  games = {g: load(os.path.join(per_game, g)) for g in ("numberline", "blackjack")}
  assert _equal(games["blackjack"], load(alone))
  assert not _equal(games["blackjack"], games["numberline"])
  actor = cards.Actor(config, per_game, "numberline", cards.rollout_lib.TOKEN)
  params, _ = actor.start_variables(per_game, jax.random.key(0))
  assert _equal(params[cards.steps_lib.BACKBONE], games["numberline"])


def test_counterfactual_cards_swap_points24_first_steps_out_of_the_loss(read, tmp_path):
  """sft.counterfactual_cards: a Points24 first-step row becomes the expert's response to
  another solvable deal; its restated cards weigh 0 in the loss, the rest of it 1."""
  config, workdir, _ = read
  copy = str(tmp_path / "points24")
  shutil.copytree(workdir, copy)
  config = _with(config, games="points24", max_new_tokens=72)  # whole responses
  cards.expert(config, copy)
  data = cards.ExpertData(config, copy, "points24")
  processor = cards.load_processor(config, copy)
  layout = cards.Layout(config, processor, cards.envs_lib.GAMES)
  first = [i for i, t in enumerate(data.texts) if '"current formula": "",' in t]
  later = [i for i, t in enumerate(data.texts) if i not in first]
  assert first and later
  rng = np.random.default_rng(0)
  swapped = [cards.counterfactual_cards(data.texts[first[0]], "points24", "canonical", rng)
             for _ in range(8)]
  assert len({text for text, _ in swapped}) > 1  # other deals, drawn by rng
  for text, (a, b) in swapped:
    response = json.loads(text)
    assert text[a:b] == ", ".join(map(str, response["cards"]))
    assert response["current formula"] == ""
    plan = grounding.planned(text)
    assert grounding.plan_solves(plan, response["cards"], 24), text
    ids, weights = layout.response_ids(text, (a, b))
    decode = processor.tokenizer.decode
    assert decode(ids[weights == 0]) == text[a:b]
    assert decode(ids[weights == 1]) == text[:a] + text[b:] + IM_END
  for text in (data.texts[later[0]], '{"thoughts": "...", "action": "stand"}'):
    game = "points24" if "cards" in text else "blackjack"
    assert cards.counterfactual_cards(text, game, "canonical", rng) == (text, None)
  # The loader: 0 leaves every row as it was; 1 swaps every first-step row.
  plain = cards._ExpertLoader(layout, [data], 16, seed=3)
  off = cards._ExpertLoader(layout, [data], 16, seed=3, counterfactual=0.0)
  on = cards._ExpertLoader(layout, [data], 16, seed=3, counterfactual=1.0)
  for _ in range(3):
    a_batch, b_batch, c_batch = next(plain), next(off), next(on)
    for key in a_batch:
      np.testing.assert_array_equal(a_batch[key], b_batch[key])
    np.testing.assert_array_equal(a_batch["pixel_values"], c_batch["pixel_values"])
    response = slice(layout.prompt_length, None)
    for ids, attention, loss in zip(*(c_batch[k][:, response] for k in (
        "input_ids", "attention_mask", "loss_mask"))):
      text = processor.tokenizer.decode(ids[attention == 1], skip_special_tokens=True)
      left_out = processor.tokenizer.decode(ids[(attention == 1) & (loss == 0)])
      if '"current formula": "",' in text:
        assert left_out == text[text.index("[") + 1:text.index("]")]
      else:
        assert left_out == "" and (loss == attention).all()


def test_reading_every_mixes_reading_batches_into_sft_in_order_and_resumes(read):
  """sft.reading_every=3: batches 3, 6, ... are the games' readings (fresh frames, no glyphs,
  marked), the others the expert loader's own sequence; a restored loader goes on alike."""
  config, workdir, _ = read
  processor = cards.load_processor(config, workdir)
  names = cards.games(config)
  layout = cards.Layout(config, processor, cards.envs_lib.GAMES)
  data = [cards.ExpertData(config, workdir, g) for g in names]
  make = lambda: cards._MixedLoader(
      cards._ExpertLoader(layout, data, 4, seed=0),
      cards._ReadingLoader(config, processor, names, glyph_steps=0, seed=7), 3)
  mixed = make()
  batches = [next(mixed) for _ in range(6)]
  experts = cards._ExpertLoader(layout, data, 4, seed=0)
  for i in (0, 1, 3, 4):
    assert cards._READING_ROWS not in batches[i]
    assert _equal(batches[i], next(experts)), i
  reading = cards._ReadingLoader(config, processor, names, glyph_steps=0, seed=7)
  decode = processor.tokenizer.decode
  for i in (2, 5):
    batch = dict(batches[i])
    assert batch.pop(cards._READING_ROWS) == 1
    assert _equal(batch, next(reading)), i
  # no glyph curriculum: the first is numberline's reading, the second blackjack's
  second = batches[5]
  assert "Dealer has" in decode(second["input_ids"][0][second["loss_mask"][0] == 1])
  assert not _equal(batches[2], next(cards._ReadingLoader(config, processor, names,
                                                          glyph_steps=0)))  # own frames
  mixed_again = make()
  for _ in range(4):
    next(mixed_again)
  resumed = make()
  resumed.restore(mixed_again.state())
  for _ in range(3):
    assert _equal(next(resumed), next(mixed_again))


def test_sft_with_reading_every_logs_both_losses_and_trains_on_readings(read, tmp_path):
  config, workdir, _ = read
  copy = str(tmp_path / "mixed")
  shutil.copytree(workdir, copy)
  config = _with(config, sft=dict(num_steps=4, log_every=1, checkpoint_every=2,
                                  reading_every=2))
  metrics = cards.sft(config, copy)
  records = [json.loads(line) for line in open(os.path.join(copy, "sft", "metrics.jsonl"))]
  assert [("loss" in r, "reading/loss" in r) for r in records] == [(True, False),
                                                                  (False, True)] * 2
  assert {"sft/loss", "sft/reading/loss"} <= set(metrics)
  assert os.path.isfile(os.path.join(copy, "sft", "curves.png"))


@pytest.mark.parametrize("symbols,expected", [(-1, 0), (15, 15), (0, 0)])
def test_sft_reading_rows_take_their_formula_length_from_sft_or_the_stage(
    read, tmp_path, monkeypatch, symbols, expected):
  """sft.reading_formula_symbols sets the SFT reading rows' formulas (-1: the reading
  stage's), and the stage that read short formulas (0) is still what SFT starts from."""
  config, workdir, _ = read
  copy = str(tmp_path / "mixed")
  shutil.copytree(workdir, copy)
  made = []

  class Spy(cards._ReadingLoader):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(cards, "_ReadingLoader", Spy)
  config = _with(config, games="points24,blackjack",
                 sft=dict(num_steps=2, log_every=1, checkpoint_every=2, reading_every=2,
                          reading_formula_symbols=symbols))
  cards.check_reading_config(config)
  assert cards.sft_formula_symbols(config) == expected
  cards.expert(config, copy)  # points24's data beside the fixture's games
  cards.sft(config, copy)
  assert (len(made), made[0].frames[0].game) == (1, "points24")
  long = cards.reading_lib.reading_width(
      cards.load_processor(config, copy).tokenizer, [cards.make_env(config, "points24")], 15)
  assert (made[0].width == long) == (expected == 15)
  assert json.load(open(os.path.join(copy, "reading", "result.json")))["formula_symbols"] == 0


def test_a_bad_sft_reading_formula_length_is_a_config_error(read, tmp_path):
  config, _, _ = read
  with pytest.raises(ConfigError, match="config.sft.reading_formula_symbols must be >= 0"):
    cards_job.run(_with(config, sft=dict(reading_formula_symbols=-2)), str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("every", [1, -2])
def test_a_bad_reading_every_is_a_config_error(read, tmp_path, every):
  config, _, _ = read
  with pytest.raises(ConfigError, match="config.sft.reading_every"):
    cards_job.run(_with(config, sft=dict(reading_every=every)), str(tmp_path))
  assert os.listdir(tmp_path) == []
