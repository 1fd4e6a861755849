"""The card games' JAX renderer: frames show the state, and batch as they render one by one."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.cards import glyphs, render

numberline = jax.jit(render.render_numberline)
table = jax.jit(render.render_table)
blackjack = jax.jit(render.render_blackjack)
GREEN = np.array(render.GREEN, np.uint8)


def _is_red(pixels):
  pixels = np.asarray(pixels).astype(int)
  return (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)


def _is_blue(pixels):
  pixels = np.asarray(pixels).astype(int)
  return (pixels[..., 2] > 120) & (pixels[..., 0] < 80)


def _table(ranks, suits, formula=(), formula_len=0, length=8):
  symbols = np.zeros(length, np.int32)
  symbols[:len(formula)] = formula
  return np.asarray(table(jnp.array(ranks), jnp.array(suits), jnp.array(symbols),
                          jnp.int32(formula_len)))


def _blackjack(dealer, player, hide_hole, size=(10, 11)):
  """Hands as lists of (rank, suit)."""
  arrays = []
  for hand, n in zip((dealer, player), size):
    ranks, suits = np.ones(n, np.int32), np.zeros(n, np.int32)
    for i, (rank, suit) in enumerate(hand):
      ranks[i], suits[i] = rank, suit
    arrays += [ranks, suits, np.int32(len(hand))]
  return np.asarray(blackjack(*arrays[:3], *arrays[3:], jnp.bool_(hide_hole)))


def _card_box(layout, i):
  top, left = layout.card_top, layout.card_lefts[i]
  return np.s_[top:top + layout.card.height, left:left + layout.card.width]


def test_glyphs_have_ink_where_expected():
  masks, widths = glyphs.glyph_atlas(("8", " ", "10"), 18)
  assert masks.shape[:2] == (3, glyphs.line_height(18)) and masks.dtype == np.float32
  assert masks[0].max() > 0.9 and masks[1].max() == 0.0
  assert widths[2] > widths[0] > widths[1] > 0
  assert np.all(masks[0][:, widths[0]:] == 0)  # nothing beyond a glyph's advance
  for suit in glyphs.SUIT_CHARS:  # DejaVu Sans has the four suits
    assert glyphs.ink_mask(suit, 20).sum() > 20
  assert glyphs.text_mask("Target: ", 40, True).shape[1] > glyphs.text_mask("Target:", 40,
                                                                            True).shape[1]
  with pytest.raises(ValueError):
    glyphs.ink_mask(" ", 12)


def test_static_layers_are_quick_to_build():
  for cached in (glyphs.text_mask, glyphs.ink_mask, glyphs.glyph_atlas, glyphs.font,
                 render.card_atlas, render.text_atlas, render.table_layout):
    cached.cache_clear()
  start = time.perf_counter()
  render.card_atlas(render.LARGE)
  render.card_atlas(render.SMALL)
  render.table_layout(2, 8)
  render.table_layout(4, 24)
  assert time.perf_counter() - start < 2.0
  atlas = render.card_atlas(render.SMALL)
  assert atlas.shape == (107, render.SMALL.height, render.SMALL.width + render.PIECE, 3)
  assert np.all(atlas[render.BLANK] == GREEN)


def test_frames_have_the_game_background():
  frames = {
      "numberline": np.asarray(numberline(jnp.int32(5), jnp.int32(1))),
      "ezpoints": _table([2, 13], [2, 2]),
      "points24": _table([13, 1, 4, 5], [0, 1, 1, 3], length=24),
      "blackjack": _blackjack([(13, 0), (5, 1)], [(13, 3), (11, 3)], True),
  }
  for name, frame in frames.items():
    assert frame.shape == (300, 300, 3) and frame.dtype == np.uint8, name
    background = (255, 255, 255) if name == "numberline" else GREEN
    assert np.all(frame[-3:, -3:] == background), name
  assert np.mean(np.all(frames["numberline"] == 255, -1)) > 0.8
  assert np.mean(np.all(frames["numberline"] < 60, -1)) > 0.03  # black text


def test_numberline_shows_target_and_current():
  base = np.asarray(numberline(jnp.int32(5), jnp.int32(1)))
  target = np.asarray(numberline(jnp.int32(3), jnp.int32(1)))
  current = np.asarray(numberline(jnp.int32(5), jnp.int32(4)))
  split = (render.NUMBER_Y[0] + render.NUMBER_Y[1]) // 2
  changed = np.any(base != target, -1)
  assert changed[:split].any() and not changed[split:].any()
  changed = np.any(base != current, -1)
  assert changed[split:].any() and not changed[:split].any()


@pytest.mark.parametrize("num_cards", [2, 4])
def test_table_cards_show_rank_and_suit(num_cards):
  layout, _ = render.table_layout(num_cards, 8)
  ranks, suits = [2] * num_cards, [0] * num_cards
  base = _table(ranks, suits)
  other_rank = _table([7] + ranks[1:], suits)
  box = _card_box(layout, 0)
  assert np.any(base[box] != other_rank[box])
  assert np.array_equal(base[_card_box(layout, 1)], other_rank[_card_box(layout, 1)])
  hearts = _table(ranks, [1] + suits[1:])
  assert _is_red(hearts[box]).sum() > 20
  assert not _is_red(base).any()  # spades are black
  for i in range(num_cards):  # white cards
    assert np.mean(np.all(base[_card_box(layout, i)] > 240, -1)) > 0.5


def test_faces_differ_from_numbers_and_from_each_other():
  layout, _ = render.table_layout(2, 8)
  box = _card_box(layout, 0)
  frames = [_table([rank, 1], [3, 3])[box] for rank in (1, 10, 11, 12, 13)]
  for i in range(len(frames)):
    for j in range(i):
      assert np.any(frames[i] != frames[j])


@pytest.mark.parametrize("num_cards,length", [(2, 8), (4, 24)])
def test_formula_region_grows_with_formula_len(num_cards, length):
  layout, _ = render.table_layout(num_cards, length)
  symbols = [render.SYMBOLS.index(s) for s in ("(", "10", "+", "1", ")", "*", "2")]
  symbols = (symbols * 4)[:length]
  below_cards = layout.card_top + layout.card.height
  frames = [_table([5] * num_cards, [0] * num_cards, symbols, n, length)
            for n in range(length + 1)]
  for n in range(length):
    changed = np.any(frames[n] != frames[n + 1], -1)
    assert changed.any(), n
    assert not changed[:below_cards].any()  # only the formula area changes
  assert len(layout.lines) >= (2 if length > 8 else 1)
  # Entries beyond formula_len are not drawn.
  assert np.array_equal(frames[2], _table([5] * num_cards, [0] * num_cards, symbols[:2], 2,
                                          length))
  # The formula is light text on the table.
  assert np.mean(np.all(frames[-1][below_cards:] > 200, -1)) > 0.01


def test_too_long_formula_is_refused():
  with pytest.raises(ValueError):
    render.table_layout(4, 80)


def test_hidden_hole_card_shows_the_back():
  dealer, player = [(13, 0), (5, 1)], [(9, 1), (2, 0)]
  hidden = _blackjack(dealer, player, True)
  shown = _blackjack(dealer, player, False)
  top = render.DEALER_Y + render.LABEL_GAP
  dealer_row = np.s_[top:top + render.SMALL.height]
  assert _is_blue(hidden[dealer_row]).sum() > 1000
  assert not _is_blue(shown).any()
  assert _is_red(shown[dealer_row]).sum() > _is_red(hidden[dealer_row]).sum()
  player_row = np.s_[render.PLAYER_Y:]
  assert np.array_equal(hidden[player_row], shown[player_row])


def test_blackjack_hands_grow_and_fit():
  top = render.PLAYER_Y + render.LABEL_GAP
  row = np.s_[top:top + render.SMALL.height]
  cards = [(rank, rank % 4) for rank in (1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)]
  frames = [_blackjack([(10, 0), (7, 1)], cards[:n], False) for n in range(1, 12)]
  for n in range(10):
    assert np.any(frames[n][row] != frames[n + 1][row]), n
  full = frames[-1][row]
  white = np.all(full > 240, -1).any(0)  # columns with card
  covered = np.nonzero(white)[0]
  assert covered.min() >= render.MARGIN and covered.max() < 300 - render.MARGIN
  assert covered.max() - covered.min() > 250  # 11 cards spread over the row
  # Every card's corner index shows: red suits in all the hearts / diamonds columns.
  reds = np.nonzero(_is_red(full[:25]).any(0))[0]
  assert len(np.unique(reds // render.PIECE)) >= 5
  assert np.all(frames[0][row][:, 100:] == GREEN)  # one card: the rest is table


def test_jit_vmap_matches_single_frames():
  rng = np.random.default_rng(0)
  batch = 5
  nl = (np.arange(batch), rng.integers(0, 6, batch))
  tb = (rng.integers(1, 14, (batch, 4)), rng.integers(0, 4, (batch, 4)),
        rng.integers(0, 17, (batch, 24)), rng.integers(0, 25, batch))
  bj = (rng.integers(1, 14, (batch, 10)), rng.integers(0, 4, (batch, 10)),
        rng.integers(0, 11, batch), rng.integers(1, 14, (batch, 11)),
        rng.integers(0, 4, (batch, 11)), rng.integers(0, 12, batch), rng.integers(0, 2, batch)
        .astype(bool))
  for fn, args in ((render.render_numberline, nl), (render.render_table, tb),
                   (render.render_blackjack, bj)):
    args = tuple(jnp.asarray(a) for a in args)
    frames = np.asarray(jax.jit(jax.vmap(fn))(*args))
    assert frames.shape == (batch, 300, 300, 3)
    single = jax.jit(fn)
    for b in range(batch):
      np.testing.assert_array_equal(frames[b], single(*(a[b] for a in args)))
    assert len({f.tobytes() for f in frames}) == batch  # random states give distinct frames


def test_the_fingerprint_follows_the_pixels(monkeypatch):
  before = render.fingerprint()
  assert before == render.fingerprint() and len(before) == 64
  # one glyph drawn differently (as another FreeType might) changes it
  atlas, widths = render._digit_atlas()
  other = atlas.copy()
  other[3, 10, 5] = 255 - other[3, 10, 5]
  monkeypatch.setattr(render, "_digit_atlas", lambda: (other, widths))
  assert render.fingerprint() != before


def test_text_is_laid_out_alike_with_or_without_libraqm():
  from PIL import ImageFont
  # Pillow's basic engine, which every build has: "Target: " advances 178.9 pixels
  # (with libraqm 173.7, which moved NumberLine's digit by 5 pixels between machines).
  face = glyphs.font(render.NUMBER_TEXT, True)
  assert face.layout_engine == ImageFont.Layout.BASIC
  assert glyphs.text_mask("Target: ", render.NUMBER_TEXT, True).shape[1] == 179
  _, xs = render.numberline_background()
  assert xs == (render.NUMBER_X + 179, render.NUMBER_X + 201)
