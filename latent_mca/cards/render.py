"""The card games' 300x300 screens, drawn in JAX so frames never leave the device.

The reference (RL4VLM) draws each frame with PIL: text in DejaVu Sans and card
images pasted on a canvas, one Python call per environment. Here a frame is a
function of the game state that `jit`s and `vmap`s, built from numpy constants
made once (cached) on the first trace:

  backgrounds   the whole static screen of a game: colour and labels
                ("Target: ", "Formula:", "Dealer", ...), uint8 [300, 300, 3];
  atlases       every image a variable part can show, uint8 [K, height, width, 3]:
                the 52 card faces and a back per card size, and the digits and
                formula symbols with their text already blended over the
                background they sit on. Nothing needs alpha at run time: the
                cards' rounded corners are baked in over the table, and again
                over the edge of a card for a card lying on another one.

A frame is the background with pieces of atlas images written at *static*
positions (`lax.dynamic_slice` of the atlas by a traced index, then a static
`.at[].set`). Under `vmap` the slices become gathers of whole contiguous blocks
and the writes stay in place, so a frame costs little more than writing its
bytes (on CPU about 1.5x a bare copy of the background; see
`experiments/bench_card_envs.py`); writes at traced positions would become
scatters, so the traced layouts are reduced to static ones:

  cards         a table's cards sit in fixed slots. A blackjack hand is cut
                into 14 fixed pieces of 20 columns; a card starts every 4, 3,
                2 or 1 pieces (spread out, then overlapping as the hand grows
                up to 11 cards), so each piece shows one card's columns, or
                the bare table: which card and which columns is a small integer
                computation on the hand's size.
  text          a formula's symbols have different widths, so their positions
                are a cumulative sum: a formula line (about 20 x 280 pixels) is
                gathered pixel by pixel, each column taking the symbol that
                covers it, at the matching column of the symbol's image.

Card faces follow the reference's look: white cards with rounded corners, the
rank and suit in the top-left corner and again rotated in the bottom-right,
pips in the usual layouts for 2..10, one large suit for an ace, and a framed
letter for J/Q/K (the reference shows court pictures); the back is a blue
lattice. Hearts and diamonds are red, spades and clubs black.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import chex
import jax.numpy as jnp
import numpy as np
from jax import lax

from latent_mca.cards import glyphs

SIZE = 300
SYMBOLS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "+", "-", "*", "/", "(", ")", "=")
GREEN = (0x35, 0x65, 0x4d)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
RED = (210, 20, 30)
FORMULA_INK = (232, 232, 232)  # the reference's light formula text
BACK = 52  # `card_atlas` entries: faces suit * 13 + rank - 1, the back,
OVERLAP = 53  # the same 53 cards lying on another card,
BLANK = 2 * 53  # and the bare table
MARGIN = 10  # free pixels left and right of the card rows and formula lines

# NumberLine: two lines of large bold text on white.
NUMBER_TEXT = 40
NUMBER_X = 30
NUMBER_Y = (70, 180)  # tops of the "Target: k" and "Current: k" line boxes
DIGITS = tuple(str(d) for d in range(10))

# Card tables (EZPoints, Points24): a row of cards, then the formula.
CARD_GAP = 8  # pixels between a table's cards
FORMULA_TEXT = 18
FORMULA_LINE = 24  # pixels from one formula line's top to the next

# Blackjack: two labelled hands, cut into pieces (see the module docstring).
LABEL_TEXT = 15
DEALER_Y, PLAYER_Y = 16, 156  # tops of the label line boxes
LABEL_GAP = 22  # label top to card top
PIECE = 20  # columns of one piece of a hand
PIECES = (SIZE - 2 * MARGIN) // PIECE  # pieces across a hand
PIECES_PER_CARD = (4, 3, 2, 1)  # widest spacing that fits first


@dataclasses.dataclass(frozen=True)
class CardSize:
  """One size of card and of the text and pips on it, in pixels."""
  width: int
  height: int
  radius: int  # corner rounding
  index_text: int  # the corner rank
  index_suit: int  # the corner suit
  pip: int  # the suits of 2..10 and of the court frame
  ace: int  # the ace's single suit
  face_text: int  # J, Q, K
  pip_columns: tuple[float, float]  # x of the left and right pip columns / width
  pip_rows: tuple[float, float]  # y of the top and bottom pip rows / height


LARGE = CardSize(width=120, height=172, radius=8, index_text=19, index_suit=17, pip=26, ace=64,
                 face_text=48, pip_columns=(0.36, 0.64), pip_rows=(0.2, 0.8))  # EZPoints
# Points24's four cards and the blackjack hands: pips kept clear of the corner index.
SMALL = CardSize(width=64, height=90, radius=5, index_text=12, index_suit=11, pip=13, ace=34,
                 face_text=26, pip_columns=(0.37, 0.63), pip_rows=(0.22, 0.78))

# Pip centres of ranks 2..10 as (column, row): column 0 / 0.5 / 1 is the left / centre / right
# pip column, row 0 / 1 the top / bottom pip row; pips below the middle are upside down.
_L, _C, _R = 0.0, 0.5, 1.0
PIPS = {
    2: ((_C, 0.0), (_C, 1.0)),
    3: ((_C, 0.0), (_C, 0.5), (_C, 1.0)),
    4: ((_L, 0.0), (_R, 0.0), (_L, 1.0), (_R, 1.0)),
    5: ((_L, 0.0), (_R, 0.0), (_C, 0.5), (_L, 1.0), (_R, 1.0)),
    6: ((_L, 0.0), (_R, 0.0), (_L, 0.5), (_R, 0.5), (_L, 1.0), (_R, 1.0)),
    7: ((_L, 0.0), (_R, 0.0), (_C, 0.25), (_L, 0.5), (_R, 0.5), (_L, 1.0), (_R, 1.0)),
    8: ((_L, 0.0), (_R, 0.0), (_C, 0.25), (_L, 0.5), (_R, 0.5), (_C, 0.75), (_L, 1.0),
        (_R, 1.0)),
    9: ((_L, 0.0), (_R, 0.0), (_L, 1 / 3), (_R, 1 / 3), (_C, 0.5), (_L, 2 / 3), (_R, 2 / 3),
        (_L, 1.0), (_R, 1.0)),
    10: ((_L, 0.0), (_R, 0.0), (_C, 1 / 6), (_L, 1 / 3), (_R, 1 / 3), (_L, 2 / 3), (_R, 2 / 3),
         (_C, 5 / 6), (_L, 1.0), (_R, 1.0)),
}


# --- numpy: static layers, made once --------------------------------------------------------


def _rounded_rect(height: int, width: int, radius: float) -> np.ndarray:
  """bool [height, width]: a rectangle with corners rounded to `radius`."""
  y, x = np.mgrid[:height, :width] + 0.5
  dx = np.maximum(np.maximum(radius - x, x - (width - radius)), 0)
  dy = np.maximum(np.maximum(radius - y, y - (height - radius)), 0)
  return dx ** 2 + dy ** 2 <= radius ** 2


def _stamp(layer: np.ndarray, mask: np.ndarray, top: int, left: int) -> None:
  """Adds ink `mask` onto the float alpha `layer` with its top-left at (top, left), clipped."""
  h, w = mask.shape
  y0, x0 = max(top, 0), max(left, 0)
  y1, x1 = min(top + h, layer.shape[0]), min(left + w, layer.shape[1])
  if y1 > y0 and x1 > x0:
    part = mask[y0 - top:y1 - top, x0 - left:x1 - left]
    layer[y0:y1, x0:x1] = np.maximum(layer[y0:y1, x0:x1], part)


def _stamp_centred(layer: np.ndarray, mask: np.ndarray, cy: float, cx: float) -> None:
  _stamp(layer, mask, round(cy - mask.shape[0] / 2), round(cx - mask.shape[1] / 2))


def _paint(rgb: np.ndarray, alpha: np.ndarray, colour) -> None:
  """Blends `colour` into float `rgb` [h, w, 3] with coverage `alpha` [h, w], in place."""
  rgb += (np.asarray(colour, np.float32) - rgb) * alpha[..., None]


def _ink(suit: int):
  return RED if suit in (1, 2) else BLACK


def _card_body(size: CardSize) -> np.ndarray:
  """float32 RGB [h, w, 3] of a blank card: white with a grey rim (corners left white)."""
  h, w = size.height, size.width
  shape = _rounded_rect(h, w, size.radius)
  inner = np.zeros_like(shape)
  inner[1:-1, 1:-1] = _rounded_rect(h - 2, w - 2, size.radius - 1)
  rgb = np.full((h, w, 3), 255.0, np.float32)
  rgb[shape & ~inner] = (140, 140, 140)
  return rgb


def _card_face(rank: int, suit: int, size: CardSize) -> np.ndarray:
  """float32 RGB [height, width, 3] of the card `rank` (1..13) of `suit` (0..3)."""
  h, w = size.height, size.width
  rgb = _card_body(size)
  colour, suit_char = _ink(suit), glyphs.SUIT_CHARS[suit]
  ink = np.zeros((h, w), np.float32)
  # Corner index: rank over suit, centred in a column as wide as "10", then rotated 180.
  pad = max(2, size.width // 30)
  column = glyphs.ink_mask("10", size.index_text, True).shape[1]
  rank_mask = glyphs.ink_mask(glyphs.RANK_NAMES[rank - 1], size.index_text, True)
  suit_mask = glyphs.ink_mask(suit_char, size.index_suit)
  top = pad + 1
  _stamp(ink, rank_mask, top, pad + (column - rank_mask.shape[1]) // 2)
  _stamp(ink, suit_mask, top + rank_mask.shape[0] + max(1, size.index_text // 8),
         pad + (column - suit_mask.shape[1]) // 2)
  ink = np.maximum(ink, ink[::-1, ::-1])
  if rank == 1:
    _stamp_centred(ink, glyphs.ink_mask(suit_char, size.ace), h / 2, w / 2)
  elif rank <= 10:
    pip = glyphs.ink_mask(suit_char, size.pip)
    (left, right), (first, last) = size.pip_columns, size.pip_rows
    for col, row in PIPS[rank]:
      _stamp_centred(ink, pip if row <= 0.5 else pip[::-1, ::-1],
                     h * (first + (last - first) * row), w * (left + (right - left) * col))
  else:  # court card: a gold frame holding the letter and the suit
    y0, y1 = round(0.15 * h), round(0.85 * h)
    x0, x1 = round(0.24 * w), round(0.76 * w)
    frame = np.zeros((h, w), np.float32)
    frame[y0:y1, x0:x1] = 1.0
    _paint(rgb, frame, (246, 226, 150))
    frame[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = 0.0
    ink = np.maximum(ink, frame)
    _stamp_centred(ink, glyphs.ink_mask(glyphs.RANK_NAMES[rank - 1], size.face_text, True),
                   0.42 * h, w / 2)
    _stamp_centred(ink, glyphs.ink_mask(suit_char, size.pip), 0.66 * h, w / 2)
  _paint(rgb, ink, colour)
  return rgb


def _card_back(size: CardSize) -> np.ndarray:
  """float32 RGB [height, width, 3]: a white-rimmed blue card with a lattice."""
  h, w = size.height, size.width
  rgb = _card_body(size)
  y, x = np.mgrid[:h, :w]
  inset = max(3, w // 14)
  inside = np.zeros((h, w), bool)
  inside[inset:h - inset, inset:w - inset] = True
  period = max(5, w // 10)
  lattice = ((x + y) % period == 0) | ((x - y) % period == 0)
  rgb[inside] = (36, 56, 140)
  rgb[inside & lattice] = (110, 135, 215)
  return rgb


def _images(images: list[np.ndarray]) -> np.ndarray:
  """float [h, w, 3] images -> one read-only uint8 atlas [n, h, w, 3]."""
  atlas = np.round(np.stack(images)).astype(np.uint8)
  atlas.flags.writeable = False
  return atlas


@functools.cache
def card_atlas(size: CardSize) -> np.ndarray:
  """uint8 [2 * 53 + 1, height, width + PIECE, 3]: every card, twice, then the bare table.

  Entries 0..52 are the faces (suit * 13 + rank - 1) then the back, with the
  rounded corners over the green table; entries `OVERLAP` + i are the same cards
  with the left corners over the edge of a card (grey rim, white), for a card
  lying on the one before it, which only ever shows its plain top and bottom
  edge there; `BLANK` is all green. Every image has `PIECE` green columns on its
  right, so a piece of a hand may start anywhere on a card.
  """
  h, w = size.height, size.width
  shape = _rounded_rect(h, w, size.radius)[..., None]
  left = (np.arange(w) < w // 2)[None, :, None]
  edge = np.broadcast_to(_card_body(size)[:, w // 2:w // 2 + 1], (h, w, 3))
  green = np.broadcast_to(np.asarray(GREEN, np.float32), (h, w + PIECE, 3))
  cards = [_card_face(rank, suit, size) for suit in range(4) for rank in range(1, 14)]
  cards.append(_card_back(size))
  on_table = [np.where(shape, card, green[:, :w]) for card in cards]
  on_card = [np.where(shape | ~left, card, edge) for card in on_table]
  return _images([np.concatenate([card, green[:, w:]], 1) for card in on_table + on_card]
                 + [green])


@functools.cache
def text_atlas(strings: tuple[str, ...], size: int, bold: bool, ink, background
               ) -> tuple[np.ndarray, np.ndarray]:
  """Strings blended over their background colour.

  Returns (uint8 [n + 1, line height, max width, 3], the last entry blank;
  int32 [n] advance widths).
  """
  masks, widths = glyphs.glyph_atlas(strings, size, bold)
  masks = np.concatenate([masks, np.zeros_like(masks[:1])])
  background = np.asarray(background, np.float32)
  return _images(list(background + masks[..., None] * (np.asarray(ink, np.float32)
                                                       - background))), widths


def _formula_atlas():
  return text_atlas(tuple(s + " " for s in SYMBOLS), FORMULA_TEXT, False, FORMULA_INK, GREEN)


def _digit_atlas():
  return text_atlas(DIGITS, NUMBER_TEXT, True, BLACK, WHITE)


def _draw_text(canvas: np.ndarray, text: str, size: int, bold: bool, ink, top: int,
               left: int) -> int:
  """Blends `text` into uint8 `canvas` in place; returns the x just after its advance."""
  mask = glyphs.text_mask(text, size, bold)
  h, w = mask.shape
  region = canvas[top:top + h, left:left + w].astype(np.float32)
  _paint(region, mask, ink)
  canvas[top:top + h, left:left + w] = np.round(region).astype(np.uint8)
  return left + w


def _canvas(colour) -> np.ndarray:
  return np.tile(np.asarray(colour, np.uint8), (SIZE, SIZE, 1))


@functools.cache
def numberline_background() -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 [300, 300, 3] with "Target: " and "Current: ", the x of each line's digit)."""
  canvas = _canvas(WHITE)
  xs = tuple(_draw_text(canvas, text, NUMBER_TEXT, True, BLACK, y, NUMBER_X)
             for text, y in zip(("Target: ", "Current: "), NUMBER_Y))
  canvas.flags.writeable = False
  return canvas, xs


@dataclasses.dataclass(frozen=True)
class TableLayout:
  """Where the cards and formula symbols of a table go.

  `lines` holds (top, left, first symbol, number of symbols) per formula line;
  each line takes as many symbols as fit at the widest symbol's width.
  """
  card: CardSize
  card_top: int
  card_lefts: tuple[int, ...]
  lines: tuple[tuple[int, int, int, int], ...]


@functools.cache
def table_layout(num_cards: int, num_symbols: int) -> tuple[TableLayout, np.ndarray]:
  """(layout, uint8 [300, 300, 3] background with "Formula:") of a card table.

  One or two cards (EZPoints) are large, with the formula after "Formula: " under
  them; three or four (Points24) are small, with the formula on the lines below.
  """
  if not 1 <= num_cards <= 4:
    raise ValueError(f"a table shows 1..4 cards, got {num_cards}")
  large = num_cards <= 2
  card = LARGE if large else SMALL
  card_top = 36 if large else 72
  row_left = (SIZE - num_cards * card.width - (num_cards - 1) * CARD_GAP) // 2
  formula_top = card_top + card.height + (20 if large else 18)
  canvas = _canvas(GREEN)
  label_end = _draw_text(canvas, "Formula: " if large else "Formula:", FORMULA_TEXT, False,
                         FORMULA_INK, formula_top, 12)
  widest = int(_formula_atlas()[1].max())
  lines, first = [], 0
  top, left = (formula_top, label_end) if large else (formula_top + FORMULA_LINE, 12)
  while first < num_symbols:
    count = min((SIZE - MARGIN - left) // widest, num_symbols - first)
    lines.append((top, left, first, count))
    first, top, left = first + count, top + FORMULA_LINE, 12
  if lines and lines[-1][0] + glyphs.line_height(FORMULA_TEXT) > SIZE:
    raise ValueError(f"{num_symbols} formula symbols do not fit under {num_cards} cards")
  canvas.flags.writeable = False
  lefts = tuple(row_left + i * (card.width + CARD_GAP) for i in range(num_cards))
  return TableLayout(card, card_top, lefts, tuple(lines)), canvas


@functools.cache
def blackjack_background() -> np.ndarray:
  """uint8 [300, 300, 3]: green with the "Dealer" and "Player" labels."""
  canvas = _canvas(GREEN)
  for text, top in (("Dealer", DEALER_Y), ("Player", PLAYER_Y)):
    _draw_text(canvas, text, LABEL_TEXT, True, WHITE, top, MARGIN)
  canvas.flags.writeable = False
  return canvas


# --- JAX: the variable parts ----------------------------------------------------------------


def _paste_pieces(frame, atlas, sources, offsets, width: int, top: int, lefts):
  """Writes columns [offset, offset + width) of atlas images into `frame`.

  Args:
    frame: uint8 [300, 300, 3].
    atlas: uint8 [K, h, W, 3].
    sources, offsets: int32 [n] atlas entry and first column of each piece.
    width: static columns per piece.
    top, lefts: static row of all pieces and column of each.
  """
  atlas = jnp.asarray(atlas)
  h = atlas.shape[1]
  for i, left in enumerate(lefts):
    piece = lax.dynamic_slice(atlas, (sources[i], 0, offsets[i], 0), (1, h, width, 3))[0]
    frame = frame.at[top:top + h, left:left + width].set(piece)
  return frame


def _text_line(atlas, widths, ids, count, num_columns: int):
  """The first `count` of strings `ids` typeset left to right: uint8 [h, num_columns, 3].

  Each column shows the string whose advance covers it, at the matching column,
  else the atlas' blank last entry.
  """
  atlas, widths = jnp.asarray(atlas), jnp.asarray(widths)[ids]
  ends = jnp.cumsum(widths)
  x = jnp.arange(num_columns)
  item = jnp.sum(ends[None, :] <= x[:, None], axis=-1)  # [num_columns] first not yet ended
  safe = jnp.minimum(item, ids.shape[0] - 1)
  source = jnp.where(item < count, ids[safe], atlas.shape[0] - 1)
  col = jnp.clip(x - (ends[safe] - widths[safe]), 0, atlas.shape[2] - 1)
  rows = jnp.arange(atlas.shape[1])[:, None]
  return atlas[source[None, :], rows, col[None, :]]


def _card_ids(ranks, suits):
  return jnp.clip(suits, 0, 3) * 13 + jnp.clip(ranks, 1, 13) - 1


def _hand(frame, ids, count, top: int):
  """Draws a blackjack hand: cards every 4, 3, 2 or 1 pieces, the widest that fits."""
  count = jnp.asarray(count, jnp.int32)
  last = jnp.maximum(count - 1, 0)
  per_card = 1
  for k in PIECES_PER_CARD[::-1]:  # the last that fits wins
    per_card = jnp.where(last * k * PIECE + SMALL.width <= PIECES * PIECE, k, per_card)
  piece = jnp.arange(PIECES)
  card = jnp.minimum(piece // per_card, last)  # the card on top in each piece
  offset = (piece - card * per_card) * PIECE
  overlapping = (card > 0) & (per_card * PIECE < SMALL.width)
  source = ids[card] + jnp.where(overlapping, OVERLAP, 0)
  source = jnp.where((offset < SMALL.width) & (card < count), source, BLANK)
  return _paste_pieces(frame, card_atlas(SMALL), source, offset, PIECE, top,
                       [MARGIN + PIECE * i for i in range(PIECES)])


def render_numberline(target, current):
  """NumberLine: "Target: k" over "Current: k", black bold on white.

  Args:
    target, current: int32 scalars in 0..9 (the game uses 0..5).

  Returns:
    uint8 [300, 300, 3].
  """
  background, lefts = numberline_background()
  atlas, _ = _digit_atlas()
  digits = jnp.clip(jnp.stack([jnp.asarray(target), jnp.asarray(current)]), 0, 9)
  frame = jnp.asarray(background)
  for i, (top, left) in enumerate(zip(NUMBER_Y, lefts)):
    frame = _paste_pieces(frame, atlas, digits[i:i + 1], jnp.zeros(1, jnp.int32),
                          atlas.shape[2], top, [left])
  return frame


def render_table(ranks, suits, formula, formula_len):
  """EZPoints (2 cards) / Points24 (4 cards): cards in a row, the formula typed so far below.

  Args:
    ranks: int32 [n] 1..13, n static (1 or 2: large cards, 3 or 4: small ones).
    suits: int32 [n] 0..3 (spades, hearts, diamonds, clubs).
    formula: int32 [L] indices into `SYMBOLS`, L static.
    formula_len: int32 scalar, how many of `formula` are typed.

  Returns:
    uint8 [300, 300, 3].
  """
  chex.assert_rank([ranks, suits, formula], 1)
  chex.assert_equal_shape([ranks, suits])
  layout, background = table_layout(ranks.shape[0], formula.shape[0])
  faces = card_atlas(layout.card)[:BACK, :, :layout.card.width]  # a smaller constant
  frame = _paste_pieces(jnp.asarray(background), faces, _card_ids(ranks, suits),
                        jnp.zeros_like(ranks), layout.card.width, layout.card_top,
                        layout.card_lefts)
  atlas, widths = _formula_atlas()
  symbols = jnp.clip(formula, 0, len(SYMBOLS) - 1)
  for top, left, first, count in layout.lines:
    line = _text_line(atlas, widths, symbols[first:first + count],
                      jnp.clip(formula_len - first, 0, count), SIZE - MARGIN - left)
    frame = frame.at[top:top + line.shape[0], left:SIZE - MARGIN].set(line)
  return frame


def render_blackjack(dealer_ranks, dealer_suits, dealer_n, player_ranks, player_suits, player_n,
                     hide_hole):
  """Blackjack: the dealer's hand over the player's; the hole card face down while `hide_hole`.

  Args:
    dealer_ranks, dealer_suits: int32 [D] (static D), the first `dealer_n` dealt.
    dealer_n: int32 scalar.
    player_ranks, player_suits: int32 [P] (static P), the first `player_n` dealt.
    player_n: int32 scalar.
    hide_hole: bool scalar: draw the dealer's second card as the back.

  Returns:
    uint8 [300, 300, 3]. Hands of up to 11 cards fit, overlapping; a longer one (only
    an infinite deck's run of aces makes one) is cut at the right edge.
  """
  chex.assert_rank([dealer_ranks, dealer_suits, player_ranks, player_suits], 1)
  dealer = _card_ids(dealer_ranks, dealer_suits)
  dealer = jnp.where((jnp.arange(dealer.shape[0]) == 1) & hide_hole, BACK, dealer)
  frame = jnp.asarray(blackjack_background())
  frame = _hand(frame, dealer, dealer_n, DEALER_Y + LABEL_GAP)
  return _hand(frame, _card_ids(player_ranks, player_suits), player_n, PLAYER_Y + LABEL_GAP)


def fingerprint() -> str:
  """sha256 of the host-side drawing every frame is assembled from: the card faces and
  backs, the digit and formula atlases, the NumberLine and Blackjack backgrounds.

  The glyphs are rasterised by the Pillow installed (its FreeType), so two machines can
  draw the same state differently; a policy that learned to read small glyphs on one may
  not read the other's. Equal fingerprints: the same pixels to start from.
  """
  digest = hashlib.sha256()
  parts = [card_atlas(LARGE), card_atlas(SMALL), *_formula_atlas(), *_digit_atlas(),
           numberline_background()[0], blackjack_background()]
  for part in parts:
    array = np.ascontiguousarray(part)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()
