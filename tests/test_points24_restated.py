"""experiments.points24_restated: the examples it trains on and how it scores a plan."""

import numpy as np
import pytest

from experiments import points24_restated as restated
from latent_mca.cards import arith, experts
from latent_mca.data.image_processing import ImageProcessorConfig
from latent_mca.data.processor import Processor
from latent_mca.data.tokenizers import IM_END
from latent_mca.jobs import cards as cards_job
from latent_mca.stages import backbone as backbone_lib

POOL = arith.draw_solvable(np.random.default_rng(1), 24)


@pytest.fixture(scope="module")
def tokenizer():
  return restated.build_tokenizer(POOL)


def test_planned_reads_the_formula_before_equals_24():
  assert restated.planned(' (4+8)*10/5=24. Next: (", "action": "("}') == [
      "(", "4", "+", "8", ")", "*", "10", "/", "5"]
  assert restated.planned(" 10+10+10=24. Next: 10") == ["10", "+", "10", "+", "10"]
  assert restated.planned(" 10+10+10. Next: 10") is None  # no "=24"
  assert restated.planned(' Next: =", "action": "="}') is None


def test_the_experts_first_response_scores_as_a_solution():
  # What the scorer reads after the forced prefix, on the expert's own response: a plan
  # that solves the deal (a scorer that misread it would count no expert plan).
  for values in POOL:
    text = restated.responses(values)[0]
    prefix = restated.first_step_prefix(values)
    assert text.startswith(prefix) and prefix.endswith('"thoughts": "Solution:')
    assert f'"cards": [{", ".join(str(int(v)) for v in values)}]' in prefix
    symbols = restated.planned(text[len(prefix):])
    assert experts.is_solution(symbols, [int(v) for v in values], 24), (values, text)
  # One response per step: nothing typed, then each symbol of the plan, then "=".
  values = (3, 3, 8, 8)
  plan = experts.planned_solution(values, 24, "+-*/", restated.PLAN)
  steps = restated.responses(values)
  assert len(steps) == len(plan) + 1 and steps[-1].endswith('"action": "="}')


@pytest.mark.parametrize("variant", restated.VARIANTS)
def test_examples_weigh_exactly_the_response_tokens(tokenizer, variant):
  examples = restated.Examples(tokenizer, POOL, variant)
  batch = examples.batch(np.arange(len(POOL)), np.random.default_rng(0))
  im_end = tokenizer.convert_tokens_to_ids(IM_END)
  for row, values in enumerate(POOL):
    head = tokenizer(restated.prompt(values, variant, tokenizer))["input_ids"]
    weighted = np.flatnonzero(batch["weights"][row])
    targets = batch["ids"][row, weighted + 1]  # position t predicts token t + 1
    assert weighted[0] == len(head) - 1 and targets[-1] == im_end
    text = tokenizer.decode(targets, skip_special_tokens=True)
    assert text in restated.responses(values), (variant, text)
    assert batch["mask"][row].sum() == weighted[-1] + 2
  cards = ", ".join(str(int(v)) for v in POOL[0])
  assert (f"Cards: {cards}." in restated.prompt(POOL[0], variant, tokenizer)) == (
      variant == "given")


def test_an_unknown_variant_is_refused(tokenizer):
  with pytest.raises(ValueError, match="unknown variant 'frame'"):
    restated.prompt(POOL[0], "frame", tokenizer)


def test_a_short_run_trains_and_scores_every_deal(tokenizer):
  area = cards_job.default_config().image_size ** 2
  processor = Processor(tokenizer, image_config=ImageProcessorConfig(min_pixels=area,
                                                                     max_pixels=area))
  model_cfg = backbone_lib.model_config(cards_job.default_config(), processor)
  fresh = arith.draw_solvable(np.random.default_rng(2), 6)
  result = restated.run("restated", tokenizer, model_cfg, POOL, fresh, 0, steps=32,
                        batch_size=4)
  assert result["variant"] == "restated" and result["deals"] == len(POOL)
  for name in ("fresh", "train"):
    assert result[name] * 6 == pytest.approx(round(result[name] * 6))  # of 6 deals
    assert [e.split(":")[0] for e in result[f"{name}_examples"]] == [
        str(tuple(int(v) for v in d)) for d in (fresh if name == "fresh" else POOL)[:4]]
  assert np.isfinite(result["final_loss"])


def test_shrink_perturb_moves_the_language_model_toward_fresh_and_keeps_vision():
  params = {"visual": {"w": np.full(3, 4.0)}, "decoder": {"w": np.full(3, 4.0)},
            "embed_tokens": {"e": np.full((2, 2), -2.0)}}
  fresh = {"visual": {"w": np.zeros(3)}, "decoder": {"w": np.full(3, 2.0)},
           "embed_tokens": {"e": np.ones((2, 2))}}
  half = restated.shrink_perturb(params, fresh, 0.25)
  np.testing.assert_allclose(half["visual"]["w"], 4.0)
  np.testing.assert_allclose(half["decoder"]["w"], 0.25 * 4 + 0.75 * 2)
  np.testing.assert_allclose(half["embed_tokens"]["e"], 0.25 * -2 + 0.75 * 1)
  np.testing.assert_allclose(restated.shrink_perturb(params, fresh, 1.0)["decoder"]["w"], 4.0)
