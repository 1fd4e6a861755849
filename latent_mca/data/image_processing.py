"""Image preprocessing for Qwen2-VL / Qwen2.5-VL, in numpy and PIL.

A port of `transformers`' `Qwen2VLImageProcessorPil` (the PIL backend of
`Qwen2VLImageProcessor`, which Qwen2.5-VL also uses) that gives the same
float32 `pixel_values` and the same `image_grid_thw`, without importing
`transformers`. Per image:

  1. convert to RGB (transparency is composited onto white, as the reference
     does for in-memory images);
  2. bicubic resize (PIL) to `smart_resize`'s size: both sides a multiple of
     patch_size * merge_size = 28, area within [min_pixels, max_pixels],
     aspect ratio kept as well as that allows;
  3. rescale by 1/255, normalise with the OpenAI CLIP mean / std;
  4. repeat the frame temporal_patch_size = 2 times and cut it into
     14x14 patches, ordered so that each 2x2 block of patches that the vision
     tower later merges into one token is contiguous.

The patches of all images are concatenated: `pixel_values` [N, 3*2*14*14] and
`image_grid_thw` [num_images, 3] = (t, h, w) in patches, t = 1.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps

# From `transformers.utils.constants`: the CLIP statistics Qwen2-VL was trained with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference class defaults, `size = {"shortest_edge": 56 * 56,
# "longest_edge": 28 * 28 * 1280}`. The released checkpoints' own
# preprocessor_config.json may set a larger max_pixels; pass it explicitly.
DEFAULT_MIN_PIXELS = 56 * 56  # 3136: 4 patches = 1 merged token
DEFAULT_MAX_PIXELS = 28 * 28 * 1280  # 1003520: 1280 merged tokens
# The reference refuses images whose long side is more than 200x the short one.
MAX_ASPECT_RATIO = 200

_RESCALE_FACTOR = 1 / 255

ImageInput = Union[PIL.Image.Image, np.ndarray]


class ImageError(ValueError):
  """An image that cannot be decoded or processed: corrupt, missing, wrong type or shape."""


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """Settings of the Qwen2-VL image processor; the defaults are the reference class defaults.

  Attributes:
    patch_size: side of a square ViT patch, in pixels.
    temporal_patch_size: frames per patch; a still image is repeated this often.
    merge_size: side of the block of patches the vision tower merges into one token.
    min_pixels: smallest area (height * width) an image is resized to.
    max_pixels: largest area an image is resized to.
    image_mean: per-channel (RGB) mean, applied after rescaling to [0, 1].
    image_std: per-channel (RGB) standard deviation.
  """

  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = DEFAULT_MIN_PIXELS
  max_pixels: int = DEFAULT_MAX_PIXELS
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD

  def __post_init__(self):
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ImageProcessorConfig.{name} must be a positive int, got {value!r}")
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"ImageProcessorConfig.min_pixels ({self.min_pixels}) exceeds "
                       f"max_pixels ({self.max_pixels})")
    # Tuples keep the frozen dataclass hashable when a caller passes lists.
    object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
    object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError("ImageProcessorConfig.image_mean and image_std need 3 (RGB) values, got "
                       f"{self.image_mean} and {self.image_std}")
    if any(s == 0 for s in self.image_std):
      raise ValueError(f"ImageProcessorConfig.image_std must be non-zero, got {self.image_std}")

  @property
  def factor(self) -> int:
    """Both resized sides are multiples of this: patch_size * merge_size."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Length of one row of `pixel_values`: 3 * temporal_patch_size * patch_size**2."""
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(height: int,
                 width: int,
                 factor: int = 28,
                 min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """The (height, width) the reference resizes an image of this size to.

  Both sides become multiples of `factor`, the area lands in
  [min_pixels, max_pixels] (up to one `factor` step) and the aspect ratio is
  kept as closely as that allows. Same arithmetic as the reference, including
  Python's round-half-to-even in the first rounding.

  Raises:
    ImageError: a side is not positive, or the aspect ratio exceeds 200.
  """
  if height <= 0 or width <= 0:
    raise ImageError(f"image size must be positive, got height={height}, width={width}")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ImageError(f"aspect ratio {ratio:.1f} (height={height}, width={width}) exceeds the "
                     f"maximum of {MAX_ASPECT_RATIO}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def square_size(side: int, config: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[int, int]:
  """The (height, width) the processor resizes a side x side image to."""
  return smart_resize(side, side, config.factor, config.min_pixels, config.max_pixels)


def fitted_size(height: int, width: int, side: int,
                config: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[int, int]:
  """A size to store a height x width image at so that the processor keeps it as it is and
  it has no more patches than a side x side image (`square_size`).

  It is `smart_resize` with the square's area as max_pixels (sides multiples of 28, aspect
  ratio kept); where that size would still not do (below min_pixels, so the processor would
  enlarge it again, or above the area for a very elongated image), the square's size.

  Raises:
    ImageError: a side is not positive, or the aspect ratio exceeds 200.
  """
  square = square_size(side, config)
  area = square[0] * square[1]
  size = smart_resize(height, width, config.factor, config.min_pixels, area)
  kept = smart_resize(*size, config.factor, config.min_pixels, config.max_pixels) == size
  return size if kept and size[0] * size[1] <= area else square


def load_image(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> PIL.Image.Image:
  """Decodes an image file (a path, or its encoded bytes) into an RGB PIL image.

  Does what `transformers.image_utils.load_image` does for a local file, which
  is what the reference processor runs on a path: apply the EXIF orientation,
  then `convert("RGB")`. Note that this drops an alpha channel rather than
  compositing onto white (the reference does the latter only for images
  handed to it in memory).

  Raises:
    ImageError: the file is missing, unreadable, not an image, truncated or
      corrupt; the message names the file and the cause.
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    name = f"<{len(path_or_bytes)} bytes>"
    source = io.BytesIO(bytes(path_or_bytes))
  elif isinstance(path_or_bytes, (str, os.PathLike)):
    name = os.fspath(path_or_bytes)
    if not os.path.exists(name):
      raise ImageError(f"cannot load image {name!r}: file not found")
    if not os.path.isfile(name):
      raise ImageError(f"cannot load image {name!r}: not a regular file")
    source = name
  else:
    raise ImageError(f"load_image takes a path or encoded bytes, got {type(path_or_bytes).__name__}")
  try:
    with PIL.Image.open(source) as image:
      # Decode now: `open` only reads the header, truncation shows up here.
      image.load()
      image = PIL.ImageOps.exif_transpose(image)
      return image.convert("RGB")
  except PIL.Image.DecompressionBombError as e:
    raise ImageError(f"cannot load image {name!r}: too large ({e})") from e
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    # PIL reports bad data as UnidentifiedImageError / OSError ("image file is
    # truncated"), and some decoders as SyntaxError ("broken PNG file").
    raise ImageError(f"cannot load image {name!r}: {type(e).__name__}: {e}") from e


def _to_rgb(image: ImageInput, index: int) -> PIL.Image.Image:
  """One input image as an RGB PIL image, converted the way the reference converts it."""
  if isinstance(image, PIL.Image.Image):
    try:
      if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Reference: composite any transparency onto an opaque white background.
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
      else:
        rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
      # A lazily opened PIL image decodes here.
      raise ImageError(f"image {index}: cannot decode PIL image: {type(e).__name__}: {e}") from e
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      # Float arrays are ambiguous ([0, 1] or [0, 255]); the reference guesses, we refuse.
      raise ImageError(f"image {index}: array must be uint8 (H, W, C), got dtype {image.dtype}")
    if image.ndim == 2:
      image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
      raise ImageError(f"image {index}: array must be (H, W), or (H, W, C) with C in 1, 3, 4 "
                       f"(channels last), got shape {image.shape}")
    if image.shape[2] == 1:
      image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
      # Reference's array path: blend onto white in float64, round half to even.
      alpha = image[..., 3:4] / 255
      image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    if image.shape[0] == 0 or image.shape[1] == 0:
      raise ImageError(f"image {index}: empty array of shape {image.shape}")
    rgb = PIL.Image.fromarray(np.ascontiguousarray(image))
  else:
    raise ImageError(f"image {index}: expected a PIL image or a uint8 numpy array, "
                     f"got {type(image).__name__}")
  if rgb.width == 0 or rgb.height == 0:
    raise ImageError(f"image {index}: empty image of size {rgb.width}x{rgb.height}")
  return rgb


def _normalise_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """float32 [256, 3]: the normalised value of each uint8 level in each channel.

  Built with the reference's exact arithmetic (uint8 -> float64 * (1/255) ->
  float32, then (x - mean) / std in float32), so a table lookup is bit-equal
  to computing it per pixel.
  """
  levels = (np.arange(256).astype(np.float64) * _RESCALE_FACTOR).astype(np.float32)  # [256]
  mean32 = np.asarray(mean, dtype=np.float32)  # [3]
  std32 = np.asarray(std, dtype=np.float32)  # [3]
  return (levels[:, None] - mean32) / std32  # [256, 3]


def _patchify(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
  """Normalised [C, H, W] float32 -> [gh * gw, C * T * p * p] in the reference's order.

  Rows go block by block over the (gh / m, gw / m) grid of merge blocks, and
  inside a block row-major over its m x m patches; each row is laid out
  (channel, frame, y, x).
  """
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  channels, height, width = image.shape
  gh, gw = height // p, width // p
  x = image.reshape(channels, gh // m, m, p, gw // m, m, p)  # [C, GH, mh, ph, GW, mw, pw]
  # One contiguous copy here makes the repeat below a run of block copies.
  x = np.ascontiguousarray(x.transpose(1, 4, 2, 5, 0, 3, 6))  # [GH, GW, mh, mw, C, ph, pw]
  # A still image is its own second frame: repeat it along a new time axis.
  x = np.repeat(x[:, :, :, :, :, None], t, axis=5)  # [GH, GW, mh, mw, C, T, ph, pw]
  return x.reshape(gh * gw, channels * t * p * p)


def preprocess_images(
    images: Union[ImageInput, Sequence[ImageInput]],
    config: ImageProcessorConfig = ImageProcessorConfig(),
) -> tuple[np.ndarray, np.ndarray]:
  """Turns images into the vision tower's input, equal to `Qwen2VLImageProcessor`'s.

  Args:
    images: a list of PIL images (any mode; converted to RGB) or uint8 arrays
      (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), channels last. A single
      image, or a [B, H, W, C] array, is also accepted.
    config: patch / merge sizes, pixel budget and normalisation.

  Returns:
    pixel_values: float32 [N, 3 * T * p * p] ([N, 1176] by default), the
      patches of all images concatenated in input order.
    image_grid_thw: int32 [num_images, 3], (t, h, w) per image in patches;
      image i owns t * h * w consecutive rows of pixel_values.

  Raises:
    ImageError: an image is of an unsupported type / dtype / shape, cannot be
      decoded, or has an aspect ratio above 200; names the image's index.
    ValueError: `images` is empty.
  """
  if isinstance(images, PIL.Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
    images = [images]
  images = list(images)
  if not images:
    raise ValueError("preprocess_images needs at least one image, got none")

  table = _normalise_table(config.image_mean, config.image_std).T  # [3, 256]
  all_patches, grids = [], []
  for index, image in enumerate(images):
    rgb = _to_rgb(image, index)
    try:
      height, width = smart_resize(rgb.height, rgb.width, factor=config.factor,
                                   min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    except ImageError as e:
      raise ImageError(f"image {index}: {e}") from e
    # The reference's exact call: PIL bicubic on uint8 RGB, even when the size
    # is unchanged (PIL then returns a copy).
    resized = np.asarray(rgb.resize((width, height), resample=PIL.Image.Resampling.BICUBIC))  # [H, W, 3] uint8
    planes = resized.transpose(2, 0, 1)  # [3, H, W] uint8, channels first like the reference
    normalised = np.stack([table[c][planes[c]] for c in range(3)])  # [3, H, W] float32
    all_patches.append(_patchify(normalised, config))
    grids.append((1, height // config.patch_size, width // config.patch_size))

  pixel_values = np.concatenate(all_patches, axis=0)  # [N, patch_dim] float32
  image_grid_thw = np.asarray(grids, dtype=np.int32)  # [num_images, 3]
  return pixel_values, image_grid_thw


def num_image_tokens(grid_thw_row, merge_size: int = 2) -> int:
  """How many `<|image_pad|>` tokens an image takes in the prompt: t * h * w // merge_size**2.

  Args:
    grid_thw_row: one row of `image_grid_thw`, (t, h, w) in patches.
    merge_size: side of the block of patches merged into one token.

  Raises:
    ValueError: the row is not 3 values, or h / w is not a multiple of merge_size.
  """
  values = [int(v) for v in np.asarray(grid_thw_row).reshape(-1)]
  if len(values) != 3:
    raise ValueError(f"grid_thw_row must hold (t, h, w), got {grid_thw_row!r}")
  t, h, w = values
  if h % merge_size or w % merge_size:
    raise ValueError(f"grid (h={h}, w={w}) is not a multiple of merge_size={merge_size}")
  return t * h * w // (merge_size * merge_size)
