"""`generate` against `transformers` generate, and the sampling filters against hand computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latent_mca.generation import filter_logits, generate
from latent_mca.models import qwen2_5_vl
from tests.conftest import IMAGE, PAD, image_prompt, left_pad, random_pixels

NEW = 12


@pytest.fixture(scope="module")
def ours(reference):
  return qwen2_5_vl.from_pretrained(reference[1])


def _reference_generate(ref, ids, mask, pixels=None, grid=None, stop=()):
  kw = {}
  if pixels is not None:
    kw = dict(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
              mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
  with torch.no_grad():
    out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                       eos_token_id=list(stop) or None, **kw)
  new = out[:, ids.shape[1]:].numpy()
  # transformers stops when every row is done; ours always returns NEW columns of padding.
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


def test_greedy_matches_reference_with_images_batched(reference, ours):
  ref, _ = reference
  model, params = ours
  grid = np.array([[1, 20, 12], [1, 8, 8]])
  ids, mask = left_pad([image_prompt(60, after=(7, 8, 9, 10)), image_prompt(16, before=(4,))])
  pixels = random_pixels(grid)
  want = _reference_generate(ref, ids, mask, pixels, grid)
  got = generate(model, params, ids, mask, pixels, grid, max_new_tokens=NEW, pad_token_id=PAD,
                 stop_token_ids=())
  np.testing.assert_array_equal(np.asarray(got), want)
  assert len(np.unique(want)) > 2  # a varied continuation, not one repeated token


def test_greedy_matches_reference_text_only_left_padded(reference, ours):
  ref, _ = reference
  model, params = ours
  ids, mask = left_pad([[4, 5, 6], [7, 8, 9, 10, 11, 12], [13]])
  want = _reference_generate(ref, ids, mask)
  got = generate(model, params, ids, mask, max_new_tokens=NEW, pad_token_id=PAD,
                 stop_token_ids=())
  np.testing.assert_array_equal(np.asarray(got), want)


def test_stop_tokens_pad_the_rest_like_reference(reference, ours):
  ref, _ = reference
  model, params = ours
  ids, mask = left_pad([[4, 5, 6], [7, 8, 9, 10, 11, 12]])
  free = np.asarray(generate(model, params, ids, mask, max_new_tokens=NEW, stop_token_ids=(),
                             pad_token_id=PAD))
  stop = int(free[0, 3])  # a token row 0 emits mid-way
  want = _reference_generate(ref, ids, mask, stop=(stop,))
  got = np.asarray(generate(model, params, ids, mask, max_new_tokens=NEW,
                            stop_token_ids=(stop,), pad_token_id=PAD))
  np.testing.assert_array_equal(got, want)
  first = int(np.argmax(got[0] == stop))
  assert (got[0, first + 1:] == PAD).all()


def test_sampling_is_seeded_and_differs_from_greedy(ours):
  model, params = ours
  ids, mask = left_pad([[4, 5, 6], [7, 8, 9, 10]])
  kw = dict(max_new_tokens=NEW, temperature=1.5, top_k=50, top_p=0.95, stop_token_ids=())
  a = generate(model, params, ids, mask, rng=jax.random.key(1), **kw)
  b = generate(model, params, ids, mask, rng=jax.random.key(1), **kw)
  c = generate(model, params, ids, mask, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_generate_rejects_right_padding(ours):
  model, params = ours
  ids = np.array([[4, 5, 0]])
  with pytest.raises(ValueError, match="left-padded"):
    generate(model, params, ids, (ids != 0).astype(np.int32), max_new_tokens=2)


def test_top_k_top_p_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  # top_k=3 keeps the three largest.
  kept = np.isfinite(np.asarray(filter_logits(logits, top_k=3)))
  np.testing.assert_array_equal(kept, [[True, True, True, False, False]])
  # top_p=0.6: 0.5 alone is not above 0.6, 0.5 + 0.2 is, so two tokens stay.
  kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.6)))
  np.testing.assert_array_equal(kept, [[True, True, False, False, False]])
  # Temperature divides the logits before filtering.
  np.testing.assert_allclose(np.asarray(filter_logits(logits, temperature=2.0)),
                             np.asarray(logits) / 2, rtol=1e-6)
