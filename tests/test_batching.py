"""latent_mca.data.batching: collate's padding and images, DataLoader's order, shards and resume."""

import functools
import json

import jax
import numpy as np
import pytest

from latent_mca.data.batching import DataLoader, collate
from latent_mca.models import qwen2_5_vl

PAD = 0


def image_example(ids, grids, fill):
  """An example whose images' pixel rows all equal `fill` (grids: (t, h, w) per image)."""
  grids = np.asarray(grids, np.int32)
  rows = int(grids.prod(axis=1).sum())
  return {"input_ids": np.asarray(ids), "pixel_values": np.full((rows, 1176), fill, np.float32),
          "image_grid_thw": grids}


def numbered_source(n):
  """Example i holds the single token i + 1, so a batch tells which examples it holds."""
  return [{"input_ids": [i + 1]} for i in range(n)]


def served(batch):
  """Source indices of a batch of `numbered_source` examples, in batch order."""
  return (batch["input_ids"][:, -1] - 1).tolist()


def loader(source, batch_size, **kwargs):
  return DataLoader(source, batch_size, collate_fn=functools.partial(collate, pad_id=PAD), **kwargs)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, key
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


# --- collate: tokens --------------------------------------------------------


def test_left_padding_by_hand():
  batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8], "loss_mask": [1]},
                   {"input_ids": [9, 10], "loss_mask": [0, 1]}], pad_id=PAD)
  np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7], [0, 0, 8], [0, 9, 10]])
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1], [0, 0, 1], [0, 1, 1]])
  np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1], [0, 0, 1], [0, 0, 1]])
  assert all(batch[k].dtype == np.int32 for k in ("input_ids", "attention_mask", "loss_mask"))
  assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}


def test_right_padding_by_hand():
  batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [9, 10], "loss_mask": [0, 1]}],
                  pad_id=-1, padding_side="right")
  np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7], [9, 10, -1]])
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1], [1, 1, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1], [0, 1, 0]])


def test_pad_to_fixes_length():
  batch = collate([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_id=PAD, pad_to=4)
  np.testing.assert_array_equal(batch["input_ids"], [[0, 0, 5, 6], [0, 0, 0, 7]])
  np.testing.assert_array_equal(batch["attention_mask"], [[0, 0, 1, 1], [0, 0, 0, 1]])
  exact = collate([{"input_ids": [1, 2, 3, 4]}], pad_id=PAD, pad_to=4)  # fits exactly
  np.testing.assert_array_equal(exact["input_ids"], [[1, 2, 3, 4]])


def test_pad_to_error_names_example_and_length():
  examples = [{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3, 4, 5]}]
  with pytest.raises(ValueError, match=r"example 1 has 5 tokens, more than pad_to=4"):
    collate(examples, pad_id=PAD, pad_to=4)


@pytest.mark.parametrize("longest, expected", [(1, 4), (4, 4), (5, 8), (9, 12)])
def test_pad_to_multiple_of(longest, expected):
  batch = collate([{"input_ids": [3] * longest}, {"input_ids": [4]}], pad_id=PAD,
                  pad_to_multiple_of=4)
  assert batch["input_ids"].shape == (2, expected)
  assert batch["attention_mask"].sum() == longest + 1
  np.testing.assert_array_equal(batch["input_ids"][0, -longest:], [3] * longest)


# --- collate: images --------------------------------------------------------


def test_images_concatenate_in_batch_order():
  examples = [image_example([1, 2], [[1, 2, 2], [1, 2, 4]], fill=0.0),
              {"input_ids": [3]},
              image_example([4], [[1, 4, 2]], fill=2.0),
              image_example([5], np.zeros((0, 3), np.int32), fill=9.0)]  # no images
  examples[0]["pixel_values"][4:] = 1.0  # second image of example 0
  batch = collate(examples, pad_id=PAD)
  np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 2, 2], [1, 2, 4], [1, 4, 2]])
  assert batch["image_grid_thw"].dtype == np.int32
  assert batch["pixel_values"].shape == (4 + 8 + 8, 1176)
  np.testing.assert_array_equal(batch["pixel_values"][:, 0], [0] * 4 + [1] * 8 + [2] * 8)


def test_text_only_batch_has_no_image_keys():
  no_images = image_example([2, 3], np.zeros((0, 3), np.int32), fill=0.0)  # [0, 1176] pixels
  batch = collate([{"input_ids": [1]}, no_images], pad_id=PAD)
  assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}


def test_pad_images_to_appends_dummy_images():
  examples = [image_example([1], [[1, 2, 4]], fill=1.0), {"input_ids": [2]},
              image_example([3], [[1, 2, 2]], fill=2.0)]
  batch = collate(examples, pad_id=PAD, pad_images_to=(32, 5))
  pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
  assert pixels.shape == (32, 1176) and grid.shape == (5, 3)
  # Real images first, unchanged; then dummies that describe exactly the zero rows.
  np.testing.assert_array_equal(grid[:2], [[1, 2, 4], [1, 2, 2]])
  np.testing.assert_array_equal(pixels[:12, 0], [1] * 8 + [2] * 4)
  assert not pixels[12:].any()
  assert grid.prod(axis=1).sum() == 32
  assert (grid[2:, 0] == 1).all() and (grid[2:, 1:] % 2 == 0).all() and (grid[2:, 1:] > 0).all()


def test_pad_images_to_text_only_batch():
  batch = collate([{"input_ids": [1]}], pad_id=PAD, pad_images_to=(16, 2))
  assert batch["pixel_values"].shape == (16, 1176) and batch["pixel_values"].dtype == np.float32
  assert not batch["pixel_values"].any()
  assert batch["image_grid_thw"].shape == (2, 3)
  assert batch["image_grid_thw"].prod(axis=1).sum() == 16


@pytest.mark.parametrize("budget, match", [
    ((8, 2), "too small"),  # 12 real patches
    ((12, 3), "cannot be filled"),  # a spare slot but no spare patches
    ((16, 2), "cannot be filled"),  # spare patches but no spare slot
    ((16, 4), "cannot be filled"),  # 4 spare patches for 2 dummies
    ((14, 2), "pad_images_to"),  # not a multiple of 4
    ((16,), "max_patches, max_images"),
])
def test_pad_images_to_errors(budget, match):
  examples = [image_example([1], [[1, 2, 4]], fill=1.0), image_example([2], [[1, 2, 2]], fill=1.0)]
  assert collate(examples, pad_id=PAD, pad_images_to=(12, 2))["pixel_values"].shape == (12, 1176)
  with pytest.raises(ValueError, match=match):
    collate(examples, pad_id=PAD, pad_images_to=budget)


def test_pad_images_to_matches_model_layout_and_positions():
  """The model isolates dummy images: the real patches' layout and all positions are unchanged."""
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.tiny()
  image = cfg.image_token_id
  examples = [image_example([7] + [image] * 6 + [8], [[1, 4, 6]], fill=1.0),
              {"input_ids": [9, 10]},
              image_example([11] + [image] * 16, [[1, 8, 8]], fill=1.0)]
  plain = collate(examples, pad_id=PAD)
  padded = collate(examples, pad_id=PAD, pad_images_to=(200, 5))
  n, m = plain["pixel_values"].shape[0], plain["pixel_values"].shape[0] // 4
  # Jitted: op by op, these take several times longer to compile.
  layout = jax.jit(qwen2_5_vl.vision_layout, static_argnums=(1, 2))
  positions = jax.jit(qwen2_5_vl.mrope_positions, static_argnums=(3,))
  a = layout(plain["image_grid_thw"], n, cfg.vision)
  b = layout(padded["image_grid_thw"], 200, cfg.vision)
  np.testing.assert_array_equal(b.window_perm[:m], a.window_perm)
  for field in ("window_segment", "frame_segment", "rotary_hw"):
    np.testing.assert_array_equal(getattr(b, field)[:n], getattr(a, field))
  # Attention runs within equal segment ids: no real patch shares one with a dummy patch.
  assert b.window_segment[n:].min() > a.window_segment.max()
  assert b.frame_segment[n:].min() > a.frame_segment.max()
  pos_a, next_a = positions(plain["input_ids"], plain["attention_mask"], plain["image_grid_thw"],
                            cfg)
  pos_b, next_b = positions(padded["input_ids"], padded["attention_mask"],
                            padded["image_grid_thw"], cfg)
  np.testing.assert_array_equal(pos_b, pos_a)
  np.testing.assert_array_equal(next_b, next_a)
  # As documented: the eager host check counts the dummies' patches too.
  check = lambda batch: qwen2_5_vl.check_image_inputs(
      cfg, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
  check(plain)
  with pytest.raises(ValueError, match="image tokens"):
    check(padded)


# --- collate: errors --------------------------------------------------------


@pytest.mark.parametrize("examples, kwargs, match", [
    ([], {}, "at least one example"),
    ([{"input_ids": [1]}], {"padding_side": "middle"}, "padding_side"),
    ([{"input_ids": [1]}], {"pad_to": 4, "pad_to_multiple_of": 2}, "not both"),
    ([{"input_ids": [1]}], {"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ([{"input_ids": [1]}, {"input_ids": []}], {}, "example 1: input_ids must be a non-empty"),
    ([{"input_ids": [1.5]}], {}, "example 0: input_ids must be integers"),
    ([{"input_ids": [1], "loss_masks": [1]}], {}, r"example 0 has unknown keys \['loss_masks'\]"),
    ([{"input_ids": [1, 2], "loss_mask": [1]}], {}, "example 0: loss_mask has shape"),
    ([{"input_ids": [1], "loss_mask": [2]}], {}, "only 0 and 1"),
    ([{"input_ids": [1], "pixel_values": np.zeros((4, 1176))}], {}, "given together"),
    ([{"input_ids": [1]}, {"input_ids": [1], "pixel_values": np.zeros((5, 1176)),
                           "image_grid_thw": [[1, 2, 2]]}], {},
     "example 1: image_grid_thw describes 4 patches but pixel_values has 5 rows"),
    ([image_example([1], [[1, 2, 2]], 0.0),
      {"input_ids": [1], "pixel_values": np.zeros((4, 10)), "image_grid_thw": [[1, 2, 2]]}], {},
     "example 1: pixel_values rows have 10 values"),
])
def test_collate_errors(examples, kwargs, match):
  with pytest.raises(ValueError, match=match):
    collate(examples, pad_id=PAD, **kwargs)


def test_collate_rejects_non_dict():
  with pytest.raises(TypeError, match="example 0 is a list"):
    collate([[1, 2]], pad_id=PAD)


# --- DataLoader: order ------------------------------------------------------


def epoch_indices(data_loader):
  return [i for batch in take(data_loader, data_loader.steps_per_epoch) for i in served(batch)]


def test_shuffle_deterministic_per_seed_and_epoch():
  source = numbered_source(40)
  first = loader(source, 8, seed=3)
  epoch0, epoch1 = epoch_indices(first), epoch_indices(first)
  again = loader(source, 8, seed=3)
  assert epoch_indices(again) == epoch0 and epoch_indices(again) == epoch1
  assert epoch0 != epoch1  # a new permutation every epoch
  assert epoch0 != list(range(40))  # shuffled at all
  assert epoch_indices(loader(source, 8, seed=4)) != epoch0


def test_shuffle_pinned():
  """The order is part of every saved state: a numpy change to the stream must not go unnoticed."""
  data_loader = loader(numbered_source(10), 5, seed=0)
  assert epoch_indices(data_loader) == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]


def test_no_shuffle_serves_in_order():
  data_loader = loader(numbered_source(6), 2, shuffle=False)
  assert epoch_indices(data_loader) == epoch_indices(data_loader) == list(range(6))


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_every_example_once_per_epoch(drop_remainder):
  data_loader = loader(numbered_source(23), 5, drop_remainder=drop_remainder, seed=1)
  for _ in range(3):
    seen = epoch_indices(data_loader)
    if drop_remainder:
      assert len(seen) == 20 and len(set(seen)) == 20  # 3 examples left out, none twice
    else:
      assert sorted(seen) == list(range(23))
  assert data_loader.state()["epoch"] == 3


def test_last_partial_batch_without_drop_remainder():
  data_loader = loader(numbered_source(7), 3, drop_remainder=False, num_epochs=1)
  assert [len(served(b)) for b in data_loader] == [3, 3, 1]


def test_num_epochs_stops_and_none_runs_on():
  assert len(list(loader(numbered_source(6), 2, num_epochs=3))) == 9
  endless = loader(numbered_source(6), 2)
  take(endless, 50)
  assert endless.state()["epoch"] == 16 and endless.state()["step"] == 2


def test_transform_applies_per_example():
  data_loader = loader(numbered_source(4), 4, shuffle=False,
                       transform=lambda ex: {"input_ids": [ex["input_ids"][0], 100]})
  np.testing.assert_array_equal(next(data_loader)["input_ids"], [[1, 100], [2, 100], [3, 100],
                                                                 [4, 100]])


# --- DataLoader: processes --------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_processes_share_the_global_batch(process_count):
  source = numbered_source(37)
  single = loader(source, 8, seed=5)
  shards = [loader(source, 8, seed=5, process_index=p, process_count=process_count)
            for p in range(process_count)]
  for _ in range(2 * single.steps_per_epoch + 1):  # across epochs
    parts = [served(next(shard)) for shard in shards]
    assert all(len(part) == 8 // process_count for part in parts)
    assert [i for part in parts for i in part] == served(next(single))


def test_processes_share_a_divisible_last_batch():
  source = numbered_source(10)  # batches of 4, 4, 2
  single = loader(source, 4, drop_remainder=False, num_epochs=1)
  shards = [loader(source, 4, drop_remainder=False, num_epochs=1, process_index=p,
                   process_count=2) for p in range(2)]
  for want in single:
    assert served(next(shards[0])) + served(next(shards[1])) == served(want)


# --- DataLoader: resume -----------------------------------------------------


def image_source(n):
  """Examples of varied length, half with images, so resumed batches compare every field."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    ids = rng.integers(1, 100, size=1 + i % 5)
    out.append(image_example(ids, [[1, 2, 2 * (1 + i % 3)]], fill=float(i)) if i % 2
               else {"input_ids": ids, "loss_mask": (ids % 2).astype(np.int32)})
  return out


@pytest.mark.parametrize("stop_after", [2, 5, 6, 11])  # mid-epoch, epoch end, next epoch
def test_resume_is_bit_identical(stop_after):
  source = image_source(19)  # 5 steps an epoch with batch 3 ... and drop_remainder
  make = lambda seed=7, **kw: DataLoader(source, 3, seed=seed, **kw,
                                         collate_fn=functools.partial(collate, pad_id=PAD))
  uninterrupted = take(make(), stop_after + 8)
  interrupted = make()
  assert interrupted.steps_per_epoch == 6
  take(interrupted, stop_after)
  state = json.loads(json.dumps(interrupted.state()))
  assert_batches_equal(take(make(state=state), 8), uninterrupted[stop_after:])
  restored = make(seed=99)
  restored.restore(state)
  assert_batches_equal(take(restored, 8), uninterrupted[stop_after:])


def test_resume_with_another_process_count():
  source = numbered_source(30)
  run = loader(source, 4, seed=2)
  take(run, 9)
  state = run.state()
  want = served(next(run))
  shards = [loader(source, 4, process_index=p, process_count=2, state=state) for p in range(2)]
  assert served(next(shards[0])) + served(next(shards[1])) == want


def test_state_json_round_trip():
  data_loader = loader(numbered_source(10), 3, seed=11)
  take(data_loader, 4)
  state = data_loader.state()
  assert state == {"seed": 11, "epoch": 1, "step": 1, "batch_size": 3, "num_examples": 10}
  assert json.loads(json.dumps(state)) == state
  assert loader(numbered_source(10), 3, state=json.loads(json.dumps(state))).state() == state


@pytest.mark.parametrize("fail_in", ["transform", "collate"])
def test_failed_batch_does_not_advance(fail_in):
  calls = []

  def flaky(value):  # fails on its first use for the second batch
    calls.append(1)
    if len(calls) == (2 if fail_in == "collate" else 3):
      raise OSError("read failed")
    return value

  def collate_fn(examples):
    return collate(flaky(examples) if fail_in == "collate" else examples, pad_id=PAD)

  data_loader = DataLoader(numbered_source(8), 2, seed=0, collate_fn=collate_fn,
                           transform=flaky if fail_in == "transform" else None)
  next(data_loader)
  with pytest.raises(OSError):
    next(data_loader)
  assert data_loader.state()["step"] == 1
  want = take(loader(numbered_source(8), 2, seed=0), 2)[1]
  assert served(next(data_loader)) == served(want)


# --- DataLoader: errors -----------------------------------------------------


@pytest.mark.parametrize("source, batch_size, kwargs, match", [
    ([], 2, {}, "source is empty"),
    (numbered_source(8), 6, {"process_count": 4},
     "batch_size=6 is not divisible by process_count=4"),
    (numbered_source(8), 0, {}, "batch_size must be a positive int"),
    (numbered_source(8), 4, {"process_index": 2, "process_count": 2}, "process_index"),
    (numbered_source(3), 4, {}, "fewer than one batch"),
    (numbered_source(9), 4, {"drop_remainder": False, "process_count": 2},
     "holds 1 examples, which 2 processes cannot share"),
    (numbered_source(8), 4, {"seed": -1}, "seed"),
    (numbered_source(8), 4, {"num_epochs": 0}, "num_epochs"),
])
def test_loader_errors(source, batch_size, kwargs, match):
  with pytest.raises(ValueError, match=match):
    loader(source, batch_size, **kwargs)


@pytest.mark.parametrize("change, match", [
    ({"batch_size": 2}, "batch_size=2, this loader has 4"),
    ({"num_examples": 9}, "num_examples=9, this loader has 8"),
    ({"step": 2}, "past the end"),
    ({"epoch": "1"}, r"\['epoch'\] must be non-negative ints"),
    ({"step": None}, r"\['step'\]"),
])
def test_restore_errors(change, match):
  state = {"seed": 0, "epoch": 1, "step": 1, "batch_size": 4, "num_examples": 8}
  with pytest.raises(ValueError, match=match):
    loader(numbered_source(8), 4, state={**state, **change})


def test_restore_missing_field():
  with pytest.raises(ValueError, match=r"lacks \['step'\]"):
    loader(numbered_source(8), 4).restore({"seed": 0, "epoch": 0, "batch_size": 4,
                                           "num_examples": 8})
