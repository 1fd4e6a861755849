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


def collate_prompts(examples: Sequence[Mapping], pad_id: int, prompt_length: int,
                    images_per_row: tuple[int, int]) -> dict[str, np.ndarray]:
  """Prompts [B, prompt_length] (left-padded) with per-row image slots.

  images_per_row: (patches, images) every row is padded to, e.g. (P + 4, 2) for one
  image of at most P patches plus the dummy filler `collate` needs.
  """
  rows = [collate([e], pad_id=pad_id, pad_to=prompt_length, pad_images_to=images_per_row)
          for e in examples]
  return {key: np.stack([r[key] for r in rows]) if key in ("pixel_values", "image_grid_thw")
          else np.concatenate([r[key] for r in rows]) for key in rows[0]}
