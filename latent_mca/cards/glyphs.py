"""Glyph bitmaps for the card games, rasterised once from the DejaVu fonts matplotlib ships.

The reference draws its screens with PIL text in DejaVu Sans; the JAX renderer
(`render.py`) cannot call a font rasteriser inside `jit`, so every string it
may need is rasterised here once, with Pillow's FreeType binding, into numpy
alpha masks in [0, 1]. All masks of one (size, bold) share a line box: the
height is the font's ascent + descent and the baseline sits at the ascent, so
masks of different strings drawn at the same y line up. Widths are the
advance widths (rounded up), so strings placed one after another are spaced
as the font intends.

Two shapes of output serve the renderer: `text_mask` for one static string
(labels, card indices) and `glyph_atlas` for a set of strings one of which is
picked at run time by index (digits, formula symbols). `ink_mask` crops a
mask to its ink, for symbols that are centred rather than typeset (pips).
Everything is cached: the first call per (string, size, weight) costs a
fraction of a millisecond.
"""

from __future__ import annotations

import functools
import math
import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
SUIT_CHARS = ("\u2660", "\u2665", "\u2666", "\u2663")  # spades, hearts, diamonds, clubs
RANK_NAMES = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # ranks 1..13


@functools.cache
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
  """DejaVu Sans (Bold) at `size` pixels, laid out by Pillow's basic engine.

  Pillow lays text out with libraqm where its build has it, else with its basic engine,
  and the two space a string differently ("Target: " at size 40 advances 173.7 pixels
  with raqm, 178.9 without), which moves NumberLine's digits. A policy trained on one
  machine's frames then misreads the other's (results/cards_gpu_h100/README.md), so the
  engine is fixed to the one every build has.
  """
  name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
  return ImageFont.truetype(os.path.join(FONT_DIR, name), size,
                            layout_engine=ImageFont.Layout.BASIC)


def line_height(size: int, bold: bool = False) -> int:
  """Height of every mask of this font: ascent + descent."""
  ascent, descent = font(size, bold).getmetrics()
  return ascent + descent


def _frozen(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False  # cached results are shared between callers
  return array


@functools.cache
def text_mask(text: str, size: int, bold: bool = False) -> np.ndarray:
  """Alpha mask of `text` in its line box: float32 [line_height, advance width], in [0, 1]."""
  face = font(size, bold)
  width = max(1, math.ceil(face.getlength(text)))
  image = Image.new("L", (width, line_height(size, bold)), 0)
  ImageDraw.Draw(image).text((0, 0), text, font=face, fill=255)
  return _frozen(np.asarray(image, np.float32) / 255.0)


@functools.cache
def ink_mask(text: str, size: int, bold: bool = False) -> np.ndarray:
  """`text_mask` cropped to the bounding box of its ink: float32 [h, w]."""
  mask = text_mask(text, size, bold)
  rows, cols = np.nonzero(mask > 0)
  if rows.size == 0:
    raise ValueError(f"{text!r} has no ink")
  return _frozen(mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].copy())


@functools.cache
def glyph_atlas(strings: tuple[str, ...], size: int,
                bold: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Masks of `strings` stacked for look-up by index.

  Returns (masks float32 [n, line_height, max width], each left-aligned and zero
  to the right of its own width; widths int32 [n], the advance widths).
  """
  masks = [text_mask(s, size, bold) for s in strings]
  widths = np.array([m.shape[1] for m in masks], np.int32)
  atlas = np.zeros((len(strings), line_height(size, bold), int(widths.max())), np.float32)
  for i, mask in enumerate(masks):
    atlas[i, :, :mask.shape[1]] = mask
  return _frozen(atlas), _frozen(widths)
