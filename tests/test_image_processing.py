"""latent_mca.data.image_processing against transformers' Qwen2VLImageProcessorPil.

The reference is constructed directly (no hub access). Images are seeded
random noise, which exercises bicubic overshoot and clipping.
"""

import io

import numpy as np
import PIL.Image
import pytest
from transformers.image_utils import load_image as hf_load_image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl
from transformers.utils import constants as hf_constants

from latent_mca.data import image_processing as ip

TOL = 1e-5  # max abs difference allowed on float32 pixel_values

_REF_CACHE = {}


def reference(min_pixels=None, max_pixels=None):
  """A (cached) reference processor; None keeps the reference's own default."""
  key = (min_pixels, max_pixels)
  if key not in _REF_CACHE:
    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    _REF_CACHE[key] = hf_qwen2_vl.Qwen2VLImageProcessorPil(**kwargs)
  return _REF_CACHE[key]


def noise(height, width, channels=3, seed=0):
  """uint8 [height, width, channels] (or [height, width] for channels=0) seeded noise."""
  shape = (height, width) if channels == 0 else (height, width, channels)
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def assert_matches_reference(images, config=ip.ImageProcessorConfig(), ref_images=None):
  """Ours on `images` vs the reference on `ref_images` (default: the same objects)."""
  pixel_values, grid_thw = ip.preprocess_images(images, config)
  ref = reference(config.min_pixels, config.max_pixels)(
      images=images if ref_images is None else ref_images, return_tensors="np")
  assert pixel_values.dtype == np.float32
  assert grid_thw.dtype == np.int32
  np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"])
  assert pixel_values.shape == ref["pixel_values"].shape
  diff = float(np.max(np.abs(pixel_values - ref["pixel_values"])))
  assert diff <= TOL, f"max abs diff {diff}"
  return pixel_values, grid_thw


# --- defaults ---------------------------------------------------------------


def test_defaults_match_reference():
  ref = reference()
  config = ip.ImageProcessorConfig()
  assert config.min_pixels == ref.size.shortest_edge == 56 * 56
  assert config.max_pixels == ref.size.longest_edge == 28 * 28 * 1280
  assert (config.patch_size, config.temporal_patch_size, config.merge_size) == (
      ref.patch_size, ref.temporal_patch_size, ref.merge_size)
  assert config.image_mean == tuple(ref.image_mean) == tuple(hf_constants.OPENAI_CLIP_MEAN)
  assert config.image_std == tuple(ref.image_std) == tuple(hf_constants.OPENAI_CLIP_STD)
  assert ip.OPENAI_CLIP_MEAN == tuple(hf_constants.OPENAI_CLIP_MEAN)
  assert ip.OPENAI_CLIP_STD == tuple(hf_constants.OPENAI_CLIP_STD)
  assert int(ref.resample) == int(PIL.Image.Resampling.BICUBIC)
  assert ref.rescale_factor == 1 / 255
  assert config.patch_dim == 1176


def test_config_validation():
  with pytest.raises(ValueError, match="min_pixels"):
    ip.ImageProcessorConfig(min_pixels=5000, max_pixels=4000)
  with pytest.raises(ValueError, match="patch_size"):
    ip.ImageProcessorConfig(patch_size=0)
  with pytest.raises(ValueError, match="image_std"):
    ip.ImageProcessorConfig(image_std=(0.5, 0.0, 0.5))
  # Lists become tuples, so the config stays hashable.
  hash(ip.ImageProcessorConfig(image_mean=[0.5, 0.5, 0.5]))


# --- smart_resize -------------------------------------------------------------

_SIZES = [(1, 1), (14, 14), (20, 30), (42, 42), (70, 98), (97, 350), (224, 224), (300, 300),
          (350, 97), (900, 1200), (1200, 900), (5, 1000), (10, 2000), (4000, 3000), (1080, 1920)]
_BUDGETS = [(None, None), (28 * 28 * 4, 28 * 28 * 64), (256 * 28 * 28, 512 * 28 * 28), (3136, 3136)]


@pytest.mark.parametrize("min_pixels,max_pixels", _BUDGETS)
def test_smart_resize_matches_reference(min_pixels, max_pixels):
  kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
  for height, width in _SIZES:
    ours = ip.smart_resize(height, width, 28, **kwargs)
    assert ours == tuple(hf_qwen2_vl.smart_resize(height, width, 28, **kwargs)), (height, width)
    assert ours[0] % 28 == 0 and ours[1] % 28 == 0


def test_smart_resize_known_values():
  assert ip.smart_resize(224, 224) == (224, 224)
  assert ip.smart_resize(20, 30) == (56, 84)  # upscaled to reach 56*56
  assert ip.smart_resize(42, 70) == (56, 56)  # round half to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2
  assert ip.smart_resize(97, 350) == (84, 336)  # 350/28 = 12.5 -> 12
  assert ip.smart_resize(1200, 900) == (1148, 840)  # downscaled under 28*28*1280


def test_extreme_aspect_ratio_raises():
  assert ip.smart_resize(10, 2000)  # exactly 200: allowed, like the reference
  with pytest.raises(ip.ImageError, match="aspect ratio 201.0"):
    ip.smart_resize(10, 2010)
  with pytest.raises(ValueError, match="aspect ratio"):  # the reference refuses it too
    hf_qwen2_vl.smart_resize(10, 2010)
  with pytest.raises(ip.ImageError, match=r"image 1: .*aspect ratio 250.0"):
    ip.preprocess_images([noise(56, 56), noise(2, 500)])
  with pytest.raises(ip.ImageError, match="positive"):
    ip.smart_resize(0, 10)


# --- pixel_values vs the reference ---------------------------------------------


@pytest.mark.parametrize("height,width,grid", [
    (224, 224, (1, 16, 16)),
    (300, 300, (1, 22, 22)),
    (97, 350, (1, 6, 24)),
    (20, 30, (1, 4, 6)),  # upscaled to 56x84
    (1200, 900, (1, 82, 60)),  # downscaled by the default max_pixels
])
def test_single_image_matches_reference(height, width, grid):
  image = PIL.Image.fromarray(noise(height, width, seed=height * 7 + width))
  _, grid_thw = assert_matches_reference([image])
  assert tuple(grid_thw[0]) == grid


def test_large_image_small_max_pixels():
  config = ip.ImageProcessorConfig(max_pixels=28 * 28 * 64)
  image = PIL.Image.fromarray(noise(1200, 900, seed=3))
  pixel_values, grid_thw = assert_matches_reference([image], config)
  assert tuple(grid_thw[0]) == (1, 18, 12)
  assert pixel_values.shape == (18 * 12, 1176)


@pytest.mark.parametrize("min_pixels,max_pixels,size", [
    (256 * 28 * 28, 512 * 28 * 28, (224, 224)),  # upscaled by min_pixels
    (256 * 28 * 28, 512 * 28 * 28, (900, 700)),  # downscaled by max_pixels
    (28 * 28 * 4, 28 * 28 * 16, (300, 300)),
    (28 * 28, 28 * 28, (97, 350)),  # a budget of exactly one merged token
])
def test_custom_pixel_budget_matches_reference(min_pixels, max_pixels, size):
  config = ip.ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  image = PIL.Image.fromarray(noise(*size, seed=11))
  _, grid_thw = assert_matches_reference([image], config)
  area = int(grid_thw[0, 1] * grid_thw[0, 2]) * 14 * 14
  assert min_pixels <= area <= max_pixels


def test_rgba_and_palette_transparency_match_reference():
  rgba = noise(90, 130, channels=4, seed=5)
  rgba[:10, :, 3] = 0  # fully transparent rows: must become white
  rgba[10:20, :, 3] = 255
  pil_rgba = PIL.Image.fromarray(rgba, mode="RGBA")
  pil_la = PIL.Image.fromarray(noise(90, 130, channels=0, seed=6), mode="L").convert("LA")
  pil_la.putalpha(PIL.Image.fromarray(noise(90, 130, channels=0, seed=7), mode="L"))
  palette = PIL.Image.fromarray(noise(64, 80, seed=8)).convert("P", palette=PIL.Image.Palette.ADAPTIVE)
  palette.info["transparency"] = 3
  for image in (pil_rgba, pil_la, palette):
    assert_matches_reference([image])
  # Transparent pixels are composited onto white, not dropped: a fully
  # transparent image equals a white one.
  clear = np.zeros((56, 56, 4), np.uint8)
  white = np.full((56, 56, 3), 255, np.uint8)
  np.testing.assert_array_equal(ip.preprocess_images([PIL.Image.fromarray(clear, mode="RGBA")])[0],
                                ip.preprocess_images([white])[0])


def test_grayscale_and_array_inputs_match_reference():
  gray = noise(77, 120, channels=0, seed=9)
  assert_matches_reference([PIL.Image.fromarray(gray, mode="L")])
  # (H, W) arrays are grayscale; the reference wants PIL for that, so compare to PIL "L".
  assert_matches_reference([gray], ref_images=[PIL.Image.fromarray(gray, mode="L")])
  assert_matches_reference([gray[:, :, None]])  # (H, W, 1)
  assert_matches_reference([noise(77, 120, channels=3, seed=10)])  # (H, W, 3)
  rgba = noise(77, 120, channels=4, seed=12)  # (H, W, 4): the reference's numpy blend
  assert_matches_reference([rgba])
  # Binary images ("1" mode) too.
  assert_matches_reference([PIL.Image.fromarray(gray > 128)])


def test_several_images_in_one_call():
  images = [
      PIL.Image.fromarray(noise(224, 224, seed=1)),
      noise(97, 350, seed=2),
      PIL.Image.fromarray(noise(20, 30, channels=0, seed=3), mode="L"),
      PIL.Image.fromarray(noise(60, 200, channels=4, seed=4), mode="RGBA"),
  ]
  pixel_values, grid_thw = assert_matches_reference(images)
  np.testing.assert_array_equal(grid_thw, [[1, 16, 16], [1, 6, 24], [1, 4, 6], [1, 4, 14]])
  # Concatenated in input order: each image's rows equal a call on it alone.
  offsets = np.concatenate([[0], np.cumsum(np.prod(grid_thw, axis=1))])
  assert offsets[-1] == pixel_values.shape[0]
  for i, image in enumerate(images):
    alone, _ = ip.preprocess_images([image])
    np.testing.assert_array_equal(pixel_values[offsets[i]:offsets[i + 1]], alone)


def test_patch_layout_independent_of_reference():
  """Rows: merge block by block, row-major patches inside; row = (channel, frame, y, x)."""
  image = noise(56, 84, seed=21)  # already a multiple of 28 and >= min_pixels: no resampling
  pixel_values, grid_thw = ip.preprocess_images([image])
  assert tuple(grid_thw[0]) == (1, 4, 6)
  mean, std = np.array(ip.OPENAI_CLIP_MEAN), np.array(ip.OPENAI_CLIP_STD)
  normalised = (image / 255.0 - mean) / std  # [56, 84, 3] float64
  rows = []
  for block_y in range(2):
    for block_x in range(3):
      for y in range(2):
        for x in range(2):
          py, px = 2 * block_y + y, 2 * block_x + x
          patch = normalised[14 * py:14 * (py + 1), 14 * px:14 * (px + 1)].transpose(2, 0, 1)  # [C, 14, 14]
          rows.append(np.stack([patch, patch], axis=1).reshape(-1))  # [C, T, 14, 14] -> 1176
  np.testing.assert_allclose(pixel_values, np.stack(rows), rtol=0, atol=1e-5)


def test_num_image_tokens():
  ref = reference()
  for height, width in [(224, 224), (97, 350), (20, 30)]:
    pixel_values, grid_thw = ip.preprocess_images([noise(height, width, seed=0)])
    tokens = ip.num_image_tokens(grid_thw[0])
    assert tokens == ref.get_number_of_image_patches(height, width) // 4
    assert tokens * 4 == pixel_values.shape[0]  # one token per 2x2 block of patch rows
  assert ip.num_image_tokens([1, 16, 16]) == 64
  assert ip.num_image_tokens(np.array([2, 4, 6], np.int32)) == 12
  assert ip.num_image_tokens((1, 6, 6), merge_size=3) == 4
  with pytest.raises(ValueError, match="multiple of merge_size"):
    ip.num_image_tokens((1, 5, 6))
  with pytest.raises(ValueError, match=r"\(t, h, w\)"):
    ip.num_image_tokens((16, 16))


def test_bad_inputs_raise_image_error():
  with pytest.raises(ip.ImageError, match=r"image 0: .*uint8.*float32"):
    ip.preprocess_images([np.zeros((56, 56, 3), np.float32)])
  with pytest.raises(ip.ImageError, match=r"image 1: .*shape \(56, 56, 2\)"):
    ip.preprocess_images([noise(56, 56), np.zeros((56, 56, 2), np.uint8)])
  with pytest.raises(ip.ImageError, match="image 0: expected a PIL image"):
    ip.preprocess_images(["not an image"])
  with pytest.raises(ValueError, match="at least one image"):
    ip.preprocess_images([])


# --- load_image ---------------------------------------------------------------


def _encoded(image, fmt, **kwargs):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def test_load_image_matches_reference_loader(tmp_path):
  rgba = PIL.Image.fromarray(noise(40, 70, channels=4, seed=13), mode="RGBA")
  files = {
      "rgb.png": _encoded(PIL.Image.fromarray(noise(50, 60, seed=14)), "PNG"),
      "gray.png": _encoded(PIL.Image.fromarray(noise(50, 60, channels=0, seed=15), mode="L"), "PNG"),
      "rgba.png": _encoded(rgba, "PNG"),
      "photo.jpg": _encoded(PIL.Image.fromarray(noise(48, 64, seed=16)), "JPEG", quality=90),
  }
  for name, data in files.items():
    path = tmp_path / name
    path.write_bytes(data)
    ours = ip.load_image(path)
    assert ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))
    np.testing.assert_array_equal(np.asarray(ip.load_image(data)), np.asarray(ours))  # bytes == path
    # End to end: the reference given the path loads it itself.
    assert_matches_reference([ours], ref_images=[str(path)])
  # A file's alpha is dropped (as transformers.load_image does), not blended onto white.
  np.testing.assert_array_equal(np.asarray(ip.load_image(files["rgba.png"])), np.asarray(rgba)[..., :3])


def test_load_image_applies_exif_orientation(tmp_path):
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  path = tmp_path / "rotated.jpg"
  path.write_bytes(_encoded(PIL.Image.fromarray(noise(30, 80, seed=17)), "JPEG", exif=exif))
  ours = ip.load_image(str(path))
  assert ours.size == (30, 80)  # (width, height): stored 80 wide, shown 30 wide
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))


def test_load_image_errors(tmp_path):
  missing = tmp_path / "nope.png"
  with pytest.raises(ip.ImageError, match=r"nope\.png.*file not found"):
    ip.load_image(missing)
  garbage = b"this is not an image"
  with pytest.raises(ip.ImageError, match=rf"<{len(garbage)} bytes>.*cannot identify image file"):
    ip.load_image(garbage)
  with pytest.raises(ip.ImageError, match="not a regular file"):
    ip.load_image(tmp_path)
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
  with pytest.raises(ip.ImageError, match=r"corrupt\.png"):
    ip.load_image(corrupt)
  jpeg = _encoded(PIL.Image.fromarray(noise(64, 64, seed=18)), "JPEG")
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(jpeg[:len(jpeg) // 2])
  with pytest.raises(ip.ImageError, match=r"truncated\.jpg.*truncated"):
    ip.load_image(truncated)
  png = _encoded(PIL.Image.fromarray(noise(64, 64, seed=19)), "PNG")
  with pytest.raises(ip.ImageError, match=r"bytes>"):
    ip.load_image(png[:len(png) // 2])
  with pytest.raises(ip.ImageError, match="path or encoded bytes"):
    ip.load_image(12345)
