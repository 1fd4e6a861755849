"""RL prompts: dialogue examples rendered up to the reply, batched with per-row images.

`prompt_example` renders a role-play or personalised example's conversation before its
reply, ending with the assistant header (`add_generation_prompt`), with its image.
`collate_prompts` batches them for `rollout`: input_ids / attention_mask [B, T]
left-padded, and each row's images in its own slots (pixel_values [B, P, D],
image_grid_thw [B, K, 3]), so rows can be split over devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from latent_mca.data.batching import collate
from latent_mca.data.processor import Processor
from latent_mca.stages.data import DIALOGUE_MESSAGES, encode_segments


def prompt_example(processor: Processor, task: str, example: Mapping,
                   max_length: int) -> dict[str, np.ndarray]:
  """The conversation before the example's reply, as one (unlearned) example for `collate`."""
  messages = DIALOGUE_MESSAGES[task](example, include_reply=False)
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  out = encode_segments(processor, [(text, False)], [example["image"]], 1 << 30)
  if len(out["input_ids"]) > max_length:
    raise ValueError(f"example {example.get('id')!r}: its prompt has {len(out['input_ids'])} "
                     f"tokens, more than the RL prompt length {max_length}")
  return out


def _image_budget(rows: int, patches_per_image: int) -> tuple[int, int]:
  """`collate`'s pad_images_to for rows with at most one image of patches_per_image each."""
  return rows * patches_per_image + 4, rows + 1


def collate_prompts(examples: Sequence[Mapping], pad_id: int, prompt_length: int,
                    patches_per_image: int, shards: int = 1) -> dict[str, np.ndarray]:
  """Prompts for `rollout`: input_ids / attention_mask [B, prompt_length] (left-padded) and
  the images packed per shard: pixel_values [shards, P, D], image_grid_thw [shards, K, 3].

  Shard s packs the images of rows [s * B / shards, (s + 1) * B / shards) in order, then
  dummy fill, so each batch shard of `sharded_rollout` holds exactly its rows' images. Each
  example has at most one image of at most `patches_per_image` patches.
  """
  if len(examples) % shards:
    raise ValueError(f"{len(examples)} prompts do not split into {shards} shards")
  rows = len(examples) // shards
  chunks = [collate(examples[i:i + rows], pad_id=pad_id, pad_to=prompt_length,
                    pad_images_to=_image_budget(rows, patches_per_image))
            for i in range(0, len(examples), rows)]
  out = {key: np.concatenate([c[key] for c in chunks])
         for key in ("input_ids", "attention_mask")}
  if "pixel_values" in chunks[0]:
    out["pixel_values"] = np.stack([c["pixel_values"] for c in chunks])
    out["image_grid_thw"] = np.stack([c["image_grid_thw"] for c in chunks])
  return out


def repeated_images(examples: Sequence[Mapping], group_size: int,
                    patches_per_image: int) -> dict[str, np.ndarray]:
  """The images of the learner's B * G rows (each example's G times, in row order):
  pixel_values [N, D], image_grid_thw [K, 3], or {} for text-only prompts."""
  repeated = [e for e in examples for _ in range(group_size)]
  batch = collate(repeated, pad_id=0,
                  pad_images_to=_image_budget(len(repeated), patches_per_image))
  return {key: batch[key] for key in ("pixel_values", "image_grid_thw") if key in batch}
