"""Flax Qwen2.5-VL against the PyTorch `transformers` reference, in fp32 on tiny random models."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latent_mca.models import qwen2_5_vl
from tests.conftest import IMAGE, image_prompt, left_pad, random_pixels

TOL = 1e-4

# Grids in patches. (1, 20, 12) is 10x6 merged tokens: six 4x4 windows, four of them partial.
BIG, SMALL, SQUARE = (1, 20, 12), (1, 8, 8), (1, 16, 16)


def _tokens(grid) -> int:
  return int(np.prod(grid)) // 4


def _mixed_batch():
  """Left-padded batch: two images of different sizes in one sample, a text-only sample,
  and a one-image sample; images concatenated in batch order."""
  rows = [
      image_prompt(_tokens(BIG), after=(7, 8)) + image_prompt(_tokens(SMALL), before=(9,)),
      [11, 12, 13, 14, 15, 16, 17],
      image_prompt(_tokens(SQUARE), before=(20, 21, 22), after=(23,)),
  ]
  ids, mask = left_pad(rows)
  grid = np.array([BIG, SMALL, SQUARE])
  return ids, mask, random_pixels(grid), grid


def _torch_forward(ref, ids, mask, pixels=None, grid=None):
  kw = {}
  if pixels is not None:
    kw = dict(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
              mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


@pytest.fixture(scope="module")
def ours(reference):
  _, folder = reference
  return qwen2_5_vl.from_pretrained(folder, dtype=jnp.float32)


def test_config_is_read_from_the_checkpoint(reference, ours):
  ref, _ = reference
  model, params = ours
  t = ref.config.text_config
  assert model.config.text.num_key_value_heads == t.num_key_value_heads
  assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
  assert ("lm_head" in params) != model.config.tie_word_embeddings
  assert model.config.vision.fullatt_block_indexes == tuple(
      ref.config.vision_config.fullatt_block_indexes)


def test_vision_tower_matches(reference, ours):
  ref, _ = reference
  model, params = ours
  grid = np.array([BIG, SMALL])
  pixels = random_pixels(grid, seed=1)
  with torch.no_grad():
    want = ref.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output
  got = model.apply({"params": params}, pixels, grid, method=model.encode_images)
  assert got.shape == tuple(want.shape)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)


def test_rope_positions_match_get_rope_index(reference, ours):
  ref, _ = reference
  model, _ = ours
  ids, mask, _, grid = _mixed_batch()
  want, deltas = ref.model.get_rope_index(
      torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
      image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
  got, next_position = qwen2_5_vl.mrope_positions(ids, mask, grid, model.config)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  # The reference's rope delta is relative to the unpadded length.
  np.testing.assert_array_equal(np.asarray(next_position),
                                deltas.numpy().ravel() + mask.sum(1))


def test_logits_match_mixed_left_padded_batch(reference, ours):
  ref, _ = reference
  model, params = ours
  ids, mask, pixels, grid = _mixed_batch()
  want = _torch_forward(ref, ids, mask, pixels, grid)
  got = model.apply({"params": params}, ids, attention_mask=mask, pixel_values=pixels,
                    image_grid_thw=grid)
  real = mask.astype(bool)
  assert np.abs(np.asarray(got.logits) - want)[real].max() <= TOL
  assert np.abs(want[real]).max() > 0.5  # the comparison is not between two near-zero tensors


def test_logits_match_text_only(reference, ours):
  ref, _ = reference
  model, params = ours
  ids = np.array([[3, 4, 5, 6, 7, 8, 9, 10], [30, 31, 32, 33, 34, 35, 36, 37]])
  mask = np.ones_like(ids)
  want = _torch_forward(ref, ids, mask)
  got = model.apply({"params": params}, ids, attention_mask=mask).logits
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_image_token_count_mismatch_is_named(ours):
  model, params = ours
  ids = np.array([image_prompt(_tokens(SMALL) - 1)])
  with pytest.raises(ValueError, match="image tokens"):
    model.apply({"params": params}, ids, pixel_values=random_pixels([SMALL]),
                image_grid_thw=np.array([SMALL]))


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_match(reference, ours, remat):
  """Next-token cross-entropy and its gradients, through the vision tower too."""
  import jax
  import optax

  ref, _ = reference
  model, params = ours
  model = qwen2_5_vl.Qwen2_5_VL(model.config.replace(remat=remat))
  ids, mask, pixels, grid = _mixed_batch()
  # Predict token t+1 from a real token t; image tokens are inputs, not targets.
  targets, weights = ids[:, 1:], mask[:, :-1] * mask[:, 1:] * (ids[:, 1:] != IMAGE)

  def loss_fn(p):
    logits = model.apply({"params": p}, ids, attention_mask=mask, pixel_values=pixels,
                         image_grid_thw=grid).logits[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * weights).sum() / weights.sum()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

  ref.zero_grad()
  logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
               mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64))).logits[:, :-1]
  ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         torch.tensor(targets).reshape(-1), reduction="none")
  w = torch.tensor(weights, dtype=torch.float32).reshape(-1)
  ref_loss = (ce * w).sum() / w.sum()
  ref_loss.backward()
  np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
  named = dict(ref.named_parameters())
  pairs = [  # (ours, reference [out, in] or [dim]) for one weight of each kind
      (grads["visual"]["blocks"]["qkv"]["kernel"][0].T, "visual.blocks.0.attn.qkv.weight"),
      (grads["visual"]["merger"]["mlp_0"]["kernel"].T, "visual.merger.mlp.0.weight"),
      (grads["decoder"]["layers"]["q_proj"]["bias"][1], "layers.1.self_attn.q_proj.bias"),
      (grads["decoder"]["layers"]["mlp"]["down_proj"]["kernel"][0].T, "layers.0.mlp.down_proj.weight"),
      (grads["embed_tokens"]["embedding"], "embed_tokens.weight"),
  ]
  for ours_grad, suffix in pairs:
    (name,) = [n for n in named if n.endswith(suffix)]
    want = named[name].grad.numpy()
    scale = np.abs(want).max()
    assert scale > 0, name
    np.testing.assert_allclose(np.asarray(ours_grad), want, atol=1e-4 * scale, rtol=0,
                               err_msg=name)
