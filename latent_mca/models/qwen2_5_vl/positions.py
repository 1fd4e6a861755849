"""Index bookkeeping of Qwen2.5-VL, written in jnp so that it jits.

Everything here depends on `image_grid_thw` *values* (not just shapes), which the
reference computes with Python loops on the host. We compute the same integers
with cumsums, searchsorted and argsort over arrays of static size, so a jitted
step accepts a traced `image_grid_thw` and recompiles only when the number of
patches or images changes.

Glossary: a *patch* is one 14x14x2 `pixel_values` row; a *merged token* is a
2x2 group of patches (one LLM token); a *frame* is one temporal slice of one
image; a *window* is a `window_merged` x `window_merged` tile of merged tokens
inside a frame.
"""

from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp

from latent_mca.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig


def _locate(index, sizes):
  """For each entry of `index` (a flat position), which group of `sizes` holds it and its offset."""
  ends = jnp.cumsum(sizes)
  group = jnp.searchsorted(ends, index, side="right")
  group = jnp.minimum(group, sizes.shape[0] - 1)
  start = ends[group] - sizes[group]
  return group, index - start


@flax.struct.dataclass
class VisionLayout:
  """Per-patch indices the vision tower needs; all int32, computed by `vision_layout`.

  window_perm: [M] merged-token order that makes every window contiguous.
  window_segment: [N] window id of each patch, in window order (attention mask key).
  frame_segment: [N] frame id of each patch, in window order (full-attention blocks).
  rotary_hw: [N, 2] (row, col) patch coordinates, in window order.
  """

  window_perm: jax.Array
  window_segment: jax.Array
  frame_segment: jax.Array
  rotary_hw: jax.Array


def vision_layout(image_grid_thw, num_patches: int, vision: VisionConfig) -> VisionLayout:
  """Window partition, attention segments and 2-D rotary coordinates of a batch of images.

  Equivalent to the reference's `get_vision_window_index`, `get_vision_cu_seqlens`
  and `get_vision_position_ids`, expressed as segment ids instead of cu_seqlens.

  Args:
    image_grid_thw: [num_images, 3] int (t, h, w) in patches, as from the processor.
    num_patches: total patches N (static; equals pixel_values.shape[0]).
    vision: the vision config.
  """
  s = vision.spatial_merge_size
  unit = s * s
  ws = vision.window_merged
  thw = jnp.asarray(image_grid_thw, jnp.int32)
  t, hm, wm = thw[:, 0], thw[:, 1] // s, thw[:, 2] // s  # merged grid per image
  num_merged = num_patches // unit

  m = jnp.arange(num_merged, dtype=jnp.int32)
  img, local = _locate(m, t * hm * wm)
  frame_in_img = local // (hm[img] * wm[img])
  row = (local // wm[img]) % hm[img]
  col = local % wm[img]
  frame = (jnp.cumsum(t) - t)[img] + frame_in_img  # global frame id

  windows_w = -(-wm // ws)  # ceil
  windows_per_frame = -(-hm // ws) * windows_w
  window_in_frame = (row // ws) * windows_w[img] + col // ws
  # Global window id, increasing in (frame, window row, window col) order.
  window = (jnp.cumsum(t * windows_per_frame) - t * windows_per_frame)[img] \
      + frame_in_img * windows_per_frame[img] + window_in_frame
  # Window order: by window, then row-major inside it (keys are unique).
  key = window * (ws * ws) + (row % ws) * ws + col % ws
  window_perm = jnp.argsort(key).astype(jnp.int32)

  # Patch p belongs to merged token p // unit at offset (p % unit) inside the s x s block.
  in_block = jnp.arange(unit, dtype=jnp.int32)
  rows = (row[:, None] * s + in_block[None, :] // s).reshape(-1)
  cols = (col[:, None] * s + in_block[None, :] % s).reshape(-1)

  def patches_in_window_order(x_m):  # [M] per merged token -> [N] per patch, window order
    return jnp.repeat(x_m[window_perm], unit)

  perm_patches = (window_perm[:, None] * unit + in_block[None, :]).reshape(-1)
  return VisionLayout(
      window_perm=window_perm,
      window_segment=patches_in_window_order(window),
      frame_segment=patches_in_window_order(frame),
      rotary_hw=jnp.stack([rows[perm_patches], cols[perm_patches]], axis=-1),
  )


def mrope_positions(input_ids, attention_mask, image_grid_thw, config: Qwen2_5_VLConfig):
  """3-D M-RoPE positions, equal to the reference `get_rope_index` for image inputs.

  Text tokens get equal (t, h, w) positions counting up by one; the k-th image's
  tokens get (start + t, start + row, start + col) on the merged grid, and text
  after an image continues from start + max(h, w) / merge. Padding (mask 0) gets
  position 0, as in the reference. Images are assigned to `<|image_pad|>` tokens in
  row-major (batch, time) order, like the reference's masked scatter.

  Args:
    input_ids: [B, T] int.
    attention_mask: [B, T] {0, 1}, or None for all ones.
    image_grid_thw: [num_images, 3] int, or None for a text-only batch.
  Returns:
    positions [3, B, T] int32 and next_position [B] int32, the position of the first
    generated token (the reference's rope_deltas + sequence length).
  """
  input_ids = jnp.asarray(input_ids)
  b, n = input_ids.shape
  mask = (jnp.ones((b, n), bool) if attention_mask is None
          else jnp.asarray(attention_mask).astype(bool))
  s = config.vision.spatial_merge_size
  if image_grid_thw is None or jnp.shape(image_grid_thw)[0] == 0:
    is_image = jnp.zeros((b, n), bool)
    thw = jnp.ones((1, 3), jnp.int32) * s
  else:
    is_image = (input_ids == config.image_token_id) & mask
    thw = jnp.asarray(image_grid_thw, jnp.int32)
  t, hm, wm = thw[:, 0], thw[:, 1] // s, thw[:, 2] // s

  # Which image (and which token of it) every image token is, counting over the batch.
  flat_image = is_image.reshape(-1)
  ordinal = jnp.cumsum(flat_image) - 1
  img, j = _locate(jnp.maximum(ordinal, 0), t * hm * wm)
  img, j = img.reshape(b, n), j.reshape(b, n)
  hw = hm[img] * wm[img]
  last_of_image = is_image & (j == t[img] * hw - 1)

  # Each text token advances the running position by 1, each image by max(h, w).
  step = jnp.where(is_image, jnp.where(last_of_image, jnp.maximum(hm[img], wm[img]), 0),
                   mask.astype(jnp.int32))
  start = jnp.cumsum(step, axis=1) - step  # exclusive cumsum: position before this token
  pos_t = start + jnp.where(is_image, j // hw, 0)
  pos_h = start + jnp.where(is_image, (j // wm[img]) % hm[img], 0)
  pos_w = start + jnp.where(is_image, j % wm[img], 0)
  positions = jnp.stack([pos_t, pos_h, pos_w]).astype(jnp.int32)
  positions = jnp.where(mask[None], positions, 0)
  next_position = jnp.max(jnp.where(mask[None], positions, -1), axis=(0, 2)) + 1
  return positions, next_position.astype(jnp.int32)


def text_positions(next_position, length: int):
  """M-RoPE positions of `length` new text tokens appended after a prefix: [3, B, length]."""
  pos = next_position[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
  return jnp.broadcast_to(pos[None], (3,) + pos.shape)


__all__ = ["VisionLayout", "vision_layout", "mrope_positions", "text_positions"]
