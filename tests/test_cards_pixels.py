"""The on-device frame -> patches path against the reference image processor."""

import numpy as np
import pytest

from latent_mca.cards import pixels
from latent_mca.data.image_processing import ImageProcessorConfig, preprocess_images


def test_frames_at_model_size_equal_the_reference_processor():
  frames = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
  values, grid = pixels.frames_to_pixels(frames, 56)
  ref_values, ref_grid = preprocess_images(list(frames))
  np.testing.assert_array_equal(np.asarray(values), ref_values)
  np.testing.assert_array_equal(np.asarray(grid), ref_grid)
  assert pixels.tokens_per_frame(56) == 4


def test_resized_frames_follow_the_reference_within_resampling_error():
  # A smooth image: the two bicubic kernels (PIL's, JAX's) agree up to rounding there.
  y, x = np.mgrid[0:300, 0:300]
  frame = np.stack([x * 255 // 299, y * 255 // 299, (x + y) * 255 // 598], -1).astype(np.uint8)
  values, grid = pixels.frames_to_pixels(frame[None], 168)
  size = ImageProcessorConfig(min_pixels=168 * 168, max_pixels=168 * 168)
  ref_values, ref_grid = preprocess_images([frame], size)
  np.testing.assert_array_equal(np.asarray(grid), ref_grid)
  # One uint8 level is 1/255/std ~ 0.015-0.017 after normalisation.
  assert np.abs(np.asarray(values) - ref_values).max() < 0.05


def test_sizes_that_are_not_whole_merge_blocks_are_refused():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    pixels.grid(100)
