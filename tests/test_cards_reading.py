"""The reading curriculum's frames and schedule (latent_mca.cards.reading, shared by the
cards job's reading stage and experiments/cards_reading.py)."""

import functools

import jax
import numpy as np
import pytest

from latent_mca.cards import envs
from latent_mca.cards import reading as cards_reading
from latent_mca.cards import render


def test_a_centred_digit_is_drawn_in_the_frame_centre_and_each_digit_differs():
  frames = [cards_reading.glyph_frame(d) for d in range(1, 7)]
  for frame in frames:
    assert frame.shape == (300, 300, 3) and frame.dtype == np.uint8
    rows, cols = np.nonzero(frame.min(-1) < 128)
    assert rows.size > 0
    assert abs((rows.min() + rows.max()) / 2 - 150) <= 2
    assert abs((cols.min() + cols.max()) / 2 - 150) <= 2
    assert frame[:40].min() == 255 and frame[-40:].min() == 255  # white away from the glyph
  for a in range(6):
    for b in range(a + 1, 6):
      assert not np.array_equal(frames[a], frames[b])


def test_a_larger_glyph_covers_more_of_the_frame():
  small = (cards_reading.glyph_frame(8) < 128).sum()
  large = (cards_reading.glyph_frame(8, 4 * render.NUMBER_TEXT) < 128).sum()
  assert large > 8 * small


def test_a_digit_anywhere_stays_inside_the_frame_and_moves():
  rng = np.random.default_rng(0)
  tops = set()
  for _ in range(20):
    frame = cards_reading.glyph_frame(3, 2 * render.NUMBER_TEXT, rng)
    rows, _ = np.nonzero(frame.min(-1) < 128)
    tops.add(int(rows.min()))
    ink = (cards_reading.glyph_frame(3, 2 * render.NUMBER_TEXT) < 128).sum()
    assert (frame < 128).sum() == ink  # the whole glyph is drawn, none cut off
  assert len(tops) > 5


@pytest.mark.parametrize("i, steps, expected", [(0, 300, 4.0), (100, 300, 2.5),
                                                (200, 300, 1.0), (299, 300, 1.0)])
def test_the_shrink_curriculum_reaches_numberline_size_at_two_thirds(i, steps, expected):
  assert cards_reading.shrink_scale(i, steps) == pytest.approx(expected)


def test_every_symbol_a_reading_holds_fits_at_four_times_and_each_differs():
  frames = {s: cards_reading.glyph_frame(s, 4 * render.NUMBER_TEXT)
            for s in cards_reading.SYMBOLS}
  assert set(cards_reading.SYMBOLS) >= {"10", "A", "J", "Q", "K"} | set("0123456789")
  inks = {s: (f.min(-1) < 128).sum() for s, f in frames.items()}
  assert min(inks.values()) > 0
  assert len({f.tobytes() for f in frames.values()}) == len(frames)
  with pytest.raises(ValueError, match="does not fit"):
    cards_reading.glyph_frame("10", 8 * render.NUMBER_TEXT)


def test_the_shrink_curriculum_starts_at_the_given_scale():
  assert cards_reading.shrink_scale(0, 30, 3.0) == pytest.approx(3.0)
  assert cards_reading.shrink_scale(20, 30, 3.0) == pytest.approx(1.0)


def _states(game, n, **kwargs):
  env = envs.make(game)
  states = jax.jit(functools.partial(cards_reading.random_states, env, **kwargs),
                   static_argnums=1)(jax.random.key(0), n)
  return env, jax.device_get(states)


@pytest.mark.parametrize("game, symbols, longest", [("points24", 12, 12), ("ezpoints", 9, 5)])
def test_formula_states_type_legal_formulas_of_every_length_up_to_the_cap(game, symbols,
                                                                          longest):
  env, states = _states(game, 512, formula_symbols=symbols)
  lengths = states.formula_len
  assert set(lengths.tolist()) == set(range(longest + 1))  # ezpoints: its limit of 5
  assert not states.done.any()
  np.testing.assert_array_equal(states.steps, lengths)  # nothing refused, no "="
  np.testing.assert_array_equal(states.length, lengths)
  first_numbers = 0
  for row in range(len(lengths)):
    view = env.describe(jax.tree.map(lambda x, r=row: x[r], states))
    numbers = [s for s in view["formula"] if s in envs.NUMBERS]
    assert "=" not in view["formula"]
    for number in set(numbers):  # each card at most once
      assert numbers.count(number) <= view["values"].count(int(number)), view
    first_numbers += bool(view["formula"]) and view["formula"][0] in envs.NUMBERS
  assert 0.4 < first_numbers / (lengths > 0).sum() < 0.6  # a number or an operator: even odds


@pytest.mark.parametrize("game", ["numberline", "blackjack"])
def test_formula_symbols_leave_the_other_games_states_as_they_were(game):
  _, plain = _states(game, 64)
  _, with_option = _states(game, 64, formula_symbols=12)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_option)):
    np.testing.assert_array_equal(a, b)


def test_the_default_points_states_hold_at_most_four_symbols():
  _, states = _states("points24", 512)
  assert states.formula_len.max() <= 4 and (states.formula_len == 0).any()
