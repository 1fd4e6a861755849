"""Rendered frames -> the vision tower's input, on device (the card games' image path).

The environments render uint8 frames [B, 300, 300, 3] in JAX; `frames_to_pixels` resizes
them to `size` x `size` (antialiased cubic, `jax.image.resize`), normalises them with
the reference's per-level table (`image_processing._normalise_table`: uint8 -> /255 ->
(x - mean) / std in float32) and cuts the patches in the reference's order
(`image_processing._patchify`), so the frames never leave the device between the
environment step and the rollout. At `size` equal to the frame's side there is no
resize and the result equals `preprocess_images` (`Qwen2VLImageProcessor`) exactly; at
other sizes the resampling kernel differs from PIL's bicubic by rounding, which is why
supervised data and RL both go through this one function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from latent_mca.data.image_processing import ImageProcessorConfig, _normalise_table


def check_size(size: int, config: ImageProcessorConfig = ImageProcessorConfig()) -> None:
  """Raises ValueError unless `size` is a positive multiple of patch_size * merge_size."""
  if size <= 0 or size % config.factor:
    raise ValueError(f"image size {size} must be a positive multiple of patch_size * "
                     f"merge_size = {config.factor}")


def grid(size: int, config: ImageProcessorConfig = ImageProcessorConfig()) -> np.ndarray:
  """The (t, h, w) patch grid of one frame at `size`: int32 [3]."""
  check_size(size, config)
  side = size // config.patch_size
  return np.array([1, side, side], np.int32)


def tokens_per_frame(size: int, config: ImageProcessorConfig = ImageProcessorConfig()) -> int:
  """`<|image_pad|>` tokens one frame takes in the prompt."""
  return int(np.prod(grid(size, config)) // config.merge_size ** 2)


@functools.partial(jax.jit, static_argnames=("size", "config"))
def frames_to_pixels(frames, size: int, config: ImageProcessorConfig = ImageProcessorConfig()):
  """uint8 [B, H, W, 3] -> (pixel_values float32 [B * P, patch_dim], image_grid_thw int32 [B, 3]).

  Frame b owns rows [b * P, (b + 1) * P) (P = (size / patch_size) ** 2), as
  `preprocess_images` lays out a list of images.
  """
  check_size(size, config)
  b, height, width, _ = frames.shape
  if (height, width) != (size, size):
    resized = jax.image.resize(frames.astype(jnp.float32), (b, size, size, 3), method="cubic",
                               antialias=True)
    frames = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
  table = jnp.asarray(_normalise_table(config.image_mean, config.image_std))  # [256, 3]
  x = table[frames.astype(jnp.int32), jnp.arange(3)]  # [B, S, S, 3] float32
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  g = size // p
  x = x.reshape(b, g // m, m, p, g // m, m, p, 3)  # [B, GH, mh, ph, GW, mw, pw, C]
  x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # [B, GH, GW, mh, mw, C, ph, pw]
  x = jnp.repeat(x[:, :, :, :, :, :, None], t, axis=6)  # [B, GH, GW, mh, mw, C, T, ph, pw]
  pixels = x.reshape(b * g * g, 3 * t * p * p)
  grids = jnp.broadcast_to(jnp.asarray(grid(size, config)), (b, 3))
  return pixels, grids
