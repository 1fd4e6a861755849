"""Batches for training: `collate` pads examples into model inputs, `DataLoader` serves them.

Pure numpy; the model takes what `collate` returns (see `latent_mca.models.qwen2_5_vl`).

An example is a dict:

  input_ids:      [L] int, the token ids (L >= 1).
  loss_mask:      [L] {0, 1}, optional: which tokens the loss counts (default all of them).
  pixel_values:   [n, D] float, optional: the example's image patches, from
                  `image_processing.preprocess_images` (D = 1176).
  image_grid_thw: [k, 3] int, with pixel_values: (t, h, w) in patches per image;
                  the k images own sum(t * h * w) = n rows of pixel_values, in order.

A batch of B examples is:

  input_ids, attention_mask, loss_mask: [B, T] int32, padded (left by default, as the
      model and `generate` expect) with pad_id / 0 / 0.
  pixel_values [N, D], image_grid_thw [K, 3] int32: the images of all examples
      concatenated in batch order; absent when no example has images.

Static shapes (jit compiles once per shape): `pad_to` fixes T, `pad_to_multiple_of`
limits the number of distinct T, and `pad_images_to=(max_patches, max_images)` fixes
N and K. The image budget is filled with *dummy images* of all-zero pixels, appended
after the real ones, rather than with bare zero rows, because the model reads both
shapes: the number of images is a shape too (K), and `image_grid_thw` must describe
every row of `pixel_values`, else the vision tower's layout has no image for the extra
rows (and a text-only batch would have no grid at all). With dummy images the model
needs no extra masking:

  - it gives images to `<|image_pad|>` tokens in order, and the prompt holds tokens
    for the real images only, so dummy images get no tokens and their embeddings are
    never used (nor do they receive gradients);
  - each dummy image is its own frame and its own windows, so no real patch attends
    to a dummy patch: logits equal those of the unpadded batch, up to float rounding;
  - the vision tower does run over the dummy patches: the budget costs compute.

The model's host-side check (`check_image_inputs`, run by an eager `model.apply` and
by `generate`) counts every image's tokens and so rejects a padded batch; pad images
for jitted steps, where that check does not run. A dummy image needs at least
2 x 2 patches, so unless a batch fills the budget exactly it needs a spare image slot
and 4 spare patches per slot: e.g. (B * P + 4, B + 1) fits every batch of B examples
with at most one image of at most P patches each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from latent_mca.data.image_processing import ImageProcessorConfig

# Qwen2.5-VL merges 2 x 2 patches into one token: image sides are multiples of 2 patches.
_MERGE = ImageProcessorConfig().merge_size
# Row width of pixel_values when a batch has no image to take it from.
_PATCH_DIM = ImageProcessorConfig().patch_dim
_KEYS = ("input_ids", "loss_mask", "pixel_values", "image_grid_thw")
_INT32 = np.iinfo(np.int32)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_example(index: int, example) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray],
                                                 Optional[np.ndarray]]:
  """Validates one example; returns input_ids [L], loss_mask [L], pixel_values, image_grid_thw."""
  if not isinstance(example, Mapping):
    raise TypeError(f"example {index} is a {type(example).__name__}, expected a dict")
  unknown = sorted(set(example) - set(_KEYS))
  if unknown:
    # A misspelt optional key would otherwise be dropped silently (e.g. a default loss mask).
    raise ValueError(f"example {index} has unknown keys {unknown}; collate takes {list(_KEYS)}")
  if "input_ids" not in example:
    raise ValueError(f"example {index} has no input_ids")
  ids = np.asarray(example["input_ids"])
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"example {index}: input_ids must be a non-empty 1-D sequence, "
                     f"got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"example {index}: input_ids must be integers, got dtype {ids.dtype}")
  if ids.min() < _INT32.min or ids.max() > _INT32.max:
    raise ValueError(f"example {index}: input_ids do not fit in int32")

  if example.get("loss_mask") is None:
    loss = np.ones(ids.shape, np.int32)
  else:
    loss = np.asarray(example["loss_mask"])
    if loss.shape != ids.shape:
      raise ValueError(f"example {index}: loss_mask has shape {loss.shape}, input_ids {ids.shape}")
    if not np.isin(loss, (0, 1)).all():
      raise ValueError(f"example {index}: loss_mask must hold only 0 and 1")
    loss = loss.astype(np.int32)

  pixels, grid = example.get("pixel_values"), example.get("image_grid_thw")
  if (pixels is None) != (grid is None):
    raise ValueError(f"example {index}: pixel_values and image_grid_thw must be given together")
  if pixels is None:
    return ids, loss, None, None
  pixels, grid = np.asarray(pixels), np.asarray(grid)
  if pixels.ndim != 2:
    raise ValueError(f"example {index}: pixel_values must be [num_patches, patch_dim], "
                     f"got shape {pixels.shape}")
  if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f"example {index}: image_grid_thw must be int [num_images, 3], "
                     f"got {grid.dtype} {grid.shape}")
  patches = int(grid.prod(axis=1).sum())
  if patches != pixels.shape[0]:
    raise ValueError(f"example {index}: image_grid_thw describes {patches} patches but "
                     f"pixel_values has {pixels.shape[0]} rows")
  return ids, loss, pixels, grid.astype(np.int32)


def _pad_images(pixels: np.ndarray, grid: np.ndarray,
                pad_images_to: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Appends all-zero dummy images up to [max_patches, D] pixels and [max_images, 3] grids."""
  max_patches, max_images = pad_images_to
  spare_patches = max_patches - pixels.shape[0]
  spare_images = max_images - grid.shape[0]
  unit = _MERGE * _MERGE
  have = f"the batch has {pixels.shape[0]} patches in {grid.shape[0]} images"
  if spare_patches < 0 or spare_images < 0:
    raise ValueError(f"pad_images_to={pad_images_to} is too small: {have}")
  if spare_images == 0 and spare_patches == 0:
    return pixels, grid
  if spare_images == 0 or spare_patches < unit * spare_images or spare_patches % unit:
    raise ValueError(f"pad_images_to={pad_images_to} cannot be filled: {have}, and each of the "
                     f"{spare_images} spare image slots needs a dummy image of a multiple of "
                     f"{unit} patches (at least {unit}) from the {spare_patches} spare patches; "
                     f"budget one image and {unit} patches more than the largest batch")
  # Dummies of (1, 2, 2) patches; the last one, (1, 2, w), takes the remaining patches.
  dummies = np.tile(np.array([[1, _MERGE, _MERGE]], np.int32), (spare_images, 1))  # [S, 3]
  dummies[-1, 2] = (spare_patches - unit * (spare_images - 1)) // _MERGE
  zeros = np.zeros((spare_patches, pixels.shape[1]), pixels.dtype)  # [spare_patches, D]
  return np.concatenate([pixels, zeros]), np.concatenate([grid, dummies])


def collate(examples: Sequence[Mapping[str, Any]],
            pad_id: int,
            pad_to: Optional[int] = None,
            padding_side: str = "left",
            pad_to_multiple_of: Optional[int] = None,
            pad_images_to: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
  """Pads a list of examples into one batch of model inputs (see the module docstring).

  Args:
    examples: B dicts with input_ids [L_i] and optionally loss_mask [L_i],
      pixel_values [n_i, D] with image_grid_thw [k_i, 3].
    pad_id: the token id put in padded positions of input_ids.
    pad_to: pad every sequence to exactly this length T.
    padding_side: "left" (what the model and `generate` expect) or "right".
    pad_to_multiple_of: pad to the longest length rounded up to a multiple of this
      (fewer distinct shapes under jit); not together with pad_to.
    pad_images_to: (max_patches, max_images): fill the images up to pixel_values
      [max_patches, D] and image_grid_thw [max_images, 3] with dummy images, also for
      a text-only batch; see the module docstring for how the model treats them.

  Returns:
    input_ids, attention_mask (1 on real tokens), loss_mask (0 on padding): [B, T]
    int32; pixel_values [N, D] and image_grid_thw [K, 3] int32, in batch order, when
    any example has images or pad_images_to is given.

  Raises:
    ValueError: no examples, a malformed example (named by its index), an example
      longer than pad_to, or an image budget the batch does not fit.
    TypeError: an example is not a dict.
  """
  examples = list(examples)
  if not examples:
    raise ValueError("collate needs at least one example, got none")
  if not _is_int(pad_id) or not _INT32.min <= pad_id <= _INT32.max:
    raise ValueError(f"pad_id must be an int32 token id, got {pad_id!r}")
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
  if pad_to is not None and pad_to_multiple_of is not None:
    raise ValueError("give pad_to or pad_to_multiple_of, not both")
  for name, value in (("pad_to", pad_to), ("pad_to_multiple_of", pad_to_multiple_of)):
    if value is not None and (not _is_int(value) or value <= 0):
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if pad_images_to is not None:
    if (not isinstance(pad_images_to, (tuple, list)) or len(pad_images_to) != 2
        or not all(_is_int(v) and v > 0 for v in pad_images_to)):
      raise ValueError(f"pad_images_to must be (max_patches, max_images), two positive ints, "
                       f"got {pad_images_to!r}")
    pad_images_to = (int(pad_images_to[0]), int(pad_images_to[1]))

  checked = [_check_example(i, example) for i, example in enumerate(examples)]
  lengths = [len(ids) for ids, _, _, _ in checked]
  if pad_to is not None:
    for i, n in enumerate(lengths):
      if n > pad_to:
        raise ValueError(f"example {i} has {n} tokens, more than pad_to={pad_to}")
    length = pad_to
  elif pad_to_multiple_of is not None:
    length = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
  else:
    length = max(lengths)

  batch = len(examples)
  input_ids = np.full((batch, length), pad_id, np.int32)  # [B, T]
  attention_mask = np.zeros((batch, length), np.int32)  # [B, T]
  loss_mask = np.zeros((batch, length), np.int32)  # [B, T]
  pixels, grids = [], []
  for b, (ids, loss, example_pixels, example_grid) in enumerate(checked):
    span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
    input_ids[b, span] = ids
    attention_mask[b, span] = 1
    loss_mask[b, span] = loss
    if example_grid is not None and len(example_grid):
      if pixels and example_pixels.shape[1] != pixels[0].shape[1]:
        raise ValueError(f"example {b}: pixel_values rows have {example_pixels.shape[1]} values, "
                         f"earlier examples' {pixels[0].shape[1]}")
      pixels.append(example_pixels)
      grids.append(example_grid)

  out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
  if pixels or pad_images_to is not None:
    pixel_values = (np.concatenate(pixels) if pixels
                    else np.zeros((0, _PATCH_DIM), np.float32))  # [N, D]
    image_grid_thw = (np.concatenate(grids) if grids
                      else np.zeros((0, 3), np.int32))  # [K, 3]
    if pad_images_to is not None:
      pixel_values, image_grid_thw = _pad_images(pixel_values, image_grid_thw, pad_images_to)
    out["pixel_values"], out["image_grid_thw"] = pixel_values, image_grid_thw
  return out


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a batch of `batch_size` that process `process_index` of `process_count` holds.

  Process p of P holds rows [p * b / P, (p + 1) * b / P), so the processes' rows,
  concatenated in process order, are the batch in order.

  Raises:
    ValueError: a batch the processes cannot share equally, or a bad process index.
  """
  if not _is_int(process_count) or process_count <= 0:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}")
  if not _is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
  if not _is_int(batch_size) or batch_size < 0 or batch_size % process_count:
    raise ValueError(f"a batch of {batch_size!r} rows cannot be shared equally by "
                     f"{process_count} processes")
  share = batch_size // process_count
  return slice(process_index * share, (process_index + 1) * share)


class DataLoader:
  """Shuffled, sharded, resumable batches over a random-access source.

  Order: epoch e visits the source in the order `permutation(seed, e)` (a fresh
  permutation of range(len(source)) per epoch from numpy's default_rng([seed, e]);
  range(len(source)) itself with shuffle=False). Global batch s of epoch e is
  positions [s * batch_size, (s + 1) * batch_size) of that order; with
  drop_remainder=False the last one is shorter. Neither depends on the number of
  processes.

  Sharding: process p of P gets rows `process_rows(b, p, P)` = [p * b / P,
  (p + 1) * b / P) of each global batch of b examples, so concatenating the processes'
  batches in process order gives the global batch's examples in order
  (`latent_mca.parallel.distributed.global_batch` does, on the devices). Each process
  collates its own share: with P > 1 pad to a fixed length (pad_to) so every process's
  arrays agree. Image inputs do not concatenate that way: each process's pixel_values
  end in its own dummy images (see the module docstring).

  Position: iterating yields batches and advances (epoch, step), the next global batch
  to serve. `state()` is that position; a loader built with `state=` or `restore()`d
  from it yields exactly the batches an uninterrupted run would have yielded next, for
  any process count that divides batch_size. Batches are bit-identical as long as
  `transform` and `collate_fn` are deterministic functions of their input.

  The loader is its own iterator: a second `for` loop continues where the first
  stopped. Only the current epoch's permutation ([len(source)] int64) is kept;
  examples are read one by one, when their batch is served.
  """

  def __init__(self,
               source,
               batch_size: int,
               *,
               collate_fn: Callable[[list], dict],
               seed: int = 0,
               shuffle: bool = True,
               num_epochs: Optional[int] = None,
               drop_remainder: bool = True,
               process_index: int = 0,
               process_count: int = 1,
               transform: Optional[Callable[[Any], Any]] = None,
               state: Optional[Mapping[str, int]] = None):
    """Builds a loader positioned at the start of epoch 0, or at `state`.

    Args:
      source: anything with __len__ and __getitem__(int): a list, a tfds / ArrayRecord
        data source, ...; the same on every process.
      batch_size: examples per global batch, over all processes.
      collate_fn: list of examples -> batch, e.g.
        functools.partial(collate, pad_id=pad_id, pad_to=1024).
      seed: seeds the shuffle (a non-negative int).
      shuffle: False serves the source in order, every epoch.
      num_epochs: stop after this many epochs; None never stops.
      drop_remainder: drop each epoch's last, partial global batch.
      process_index, process_count: this process's place among the processes sharing
        each global batch (jax.process_index(), jax.process_count()).
      transform: applied to each example read from the source, before collate_fn.
      state: a `state()` to continue from.

    Raises:
      ValueError: an empty source, a bad argument (named), batch_size not divisible
        by process_count, no full batch per epoch, or a final partial batch that the
        processes cannot share equally.
    """
    num_examples = len(source)
    if num_examples == 0:
      raise ValueError("DataLoader source is empty")
    for name, value in (("batch_size", batch_size), ("process_count", process_count)):
      if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by "
                       f"process_count={process_count}")
    if num_epochs is not None and (not _is_int(num_epochs) or num_epochs <= 0):
      raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    if not _is_int(seed) or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    remainder = num_examples % batch_size
    if drop_remainder:
      steps = num_examples // batch_size
      if steps == 0:
        raise ValueError(f"source has {num_examples} examples, fewer than one batch of "
                         f"{batch_size}, and drop_remainder=True leaves no batch")
    else:
      steps = -(-num_examples // batch_size)
      if remainder % process_count:
        raise ValueError(f"the last batch of each epoch holds {remainder} examples, which "
                         f"{process_count} processes cannot share equally; "
                         f"use drop_remainder=True")

    self._source = source
    self._num_examples = num_examples
    self._batch_size = int(batch_size)
    self._collate_fn = collate_fn
    self._shuffle = shuffle
    self._num_epochs = num_epochs
    self._process_index = int(process_index)
    self._process_count = int(process_count)
    self._transform = transform
    self.steps_per_epoch = steps
    self._seed, self._epoch, self._step = int(seed), 0, 0
    self._order = None  # (seed, epoch, [num_examples] permutation) of the last epoch used
    if state is not None:
      self.restore(state)

  def state(self) -> dict[str, int]:
    """The position as a JSON-serialisable dict.

    Holds seed, epoch and step (the next global batch to serve), and the batch_size and
    num_examples it is valid for.
    """
    return {"seed": self._seed, "epoch": self._epoch, "step": self._step,
            "batch_size": self._batch_size, "num_examples": self._num_examples}

  def restore(self, state: Mapping[str, int]) -> None:
    """Moves to a position from `state()`; its seed replaces the constructor's.

    Raises:
      ValueError: a missing or ill-typed field, a step past the epoch's end, or a
        batch_size / num_examples other than this loader's (the batches would differ).
    """
    fields = ("seed", "epoch", "step", "batch_size", "num_examples")
    missing = [f for f in fields if f not in state]
    if missing:
      raise ValueError(f"DataLoader state lacks {missing}: got {dict(state)}")
    bad = [f for f in fields if not _is_int(state[f]) or state[f] < 0]
    if bad:
      raise ValueError(f"DataLoader state fields {bad} must be non-negative ints: "
                       f"got {dict(state)}")
    for name, mine in (("batch_size", self._batch_size), ("num_examples", self._num_examples)):
      if state[name] != mine:
        raise ValueError(f"DataLoader state is for {name}={state[name]}, this loader has {mine}")
    if state["step"] >= self.steps_per_epoch:
      raise ValueError(f"DataLoader state step={state['step']} is past the end of an epoch of "
                       f"{self.steps_per_epoch} steps")
    self._seed = int(state["seed"])
    self._epoch, self._step = int(state["epoch"]), int(state["step"])

  def batch_indices(self, epoch: int, step: int) -> np.ndarray:
    """Source indices of this process's share of global batch `step` of `epoch`: [b / P]."""
    if not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
    start = step * self._batch_size
    stop = min(start + self._batch_size, self._num_examples)
    rows = process_rows(stop - start, self._process_index, self._process_count)
    start, stop = start + rows.start, start + rows.stop
    if not self._shuffle:
      return np.arange(start, stop)
    if self._order is None or self._order[:2] != (self._seed, epoch):
      rng = np.random.default_rng([self._seed, epoch])
      self._order = (self._seed, epoch, rng.permutation(self._num_examples))
    return self._order[2][start:stop]

  def __iter__(self) -> "DataLoader":
    return self

  def __next__(self) -> dict:
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    examples = []
    for index in self.batch_indices(self._epoch, self._step):
      example = self._source[int(index)]
      examples.append(example if self._transform is None else self._transform(example))
    batch = self._collate_fn(examples)
    # Advance only once the batch exists, so a failed read can be retried from state().
    self._step += 1
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch


class ZipLoader:
  """Several loaders advanced together: each batch is {name: that loader's batch}.

  For steps that read several datasets at once (e.g. half paired, half text-only data).
  `state()` / `restore()` hold every loader's position, so the zip resumes exactly.
  Iteration stops when any loader stops.
  """

  def __init__(self, loaders: Mapping[str, Any]):
    if not loaders:
      raise ValueError("ZipLoader needs at least one loader")
    self._loaders = dict(loaders)

  def __iter__(self) -> "ZipLoader":
    return self

  def __next__(self) -> dict:
    return {name: next(loader) for name, loader in self._loaders.items()}

  def state(self) -> dict:
    return {name: loader.state() for name, loader in self._loaders.items()}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Restores every loader; raises ValueError if the names differ from this zip's."""
    if set(state) != set(self._loaders):
      raise ValueError(f"ZipLoader state is for loaders {sorted(state)}, this one has "
                       f"{sorted(self._loaders)}")
    for name, loader in self._loaders.items():
      loader.restore(state[name])
