"""Chat messages + images -> model inputs, as `transformers`' Qwen2.5-VL processor makes them.

`Processor` renders OpenAI-style messages with the chat template, gives each
image's `<|image_pad|>` placeholder one token per merged 2x2 patch block
(`num_image_tokens`), tokenizes, pads the batch (left by default) and runs our
`preprocess_images`. For the same tokenizer, messages and images the outputs
equal `Qwen2_5_VLProcessor`'s (`tests/test_processor.py`), in numpy:

  input_ids       int32 [B, T]
  attention_mask  int32 [B, T]   1 on real tokens, 0 on padding
  pixel_values    float32 [N, 1176] or None   patches of all images, batch order
  image_grid_thw  int32 [num_images, 3] or None

which is what `Qwen2_5_VL.__call__` and `generate` take (`model.apply(..., **batch)`).
Videos are not supported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import PIL.Image

from latent_mca.data.image_processing import (ImageProcessorConfig, load_image, num_image_tokens,
                                              preprocess_images)
from latent_mca.data.tokenizers import IMAGE_PAD, QWEN2_5_VL_CHAT_TEMPLATE, VIDEO_PAD

Message = Mapping[str, Any]
Conversation = Sequence[Message]


class ProcessorError(ValueError):
  """Inputs that cannot become a batch: malformed messages, placeholders not matching images."""


def _is_image_item(item: Mapping[str, Any]) -> bool:
  # The chat template's own test, so we count exactly the placeholders it renders.
  return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video_item(item: Mapping[str, Any]) -> bool:
  return item.get("type") == "video" or "video" in item


def _to_image(image: Any) -> Any:
  """A path or encoded bytes loaded as the reference loads them; PIL images and arrays pass."""
  if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
    return load_image(image)
  return image


class Processor:
  """Turns chat messages (or prompt strings) and images into padded Qwen2.5-VL inputs.

  Attributes:
    tokenizer: a `transformers` tokenizer holding `<|image_pad|>` and a pad token.
    image_config: image preprocessing settings (`merge_size` sets tokens per image).
    padding_side: "left" (default; what batched decoding needs) or "right".
    chat_template: the jinja template used for messages.
    image_token_id: id of `<|image_pad|>`.
    video_token_id: id of `<|video_pad|>` (refused: videos are not supported).
    pad_token_id: id written into padding positions.
  """

  def __init__(self,
               tokenizer,
               image_config: ImageProcessorConfig = ImageProcessorConfig(),
               *,
               padding_side: str = "left",
               chat_template: Optional[str] = None):
    """Wraps a tokenizer and image settings.

    Args:
      tokenizer: e.g. from `load_qwen_tokenizer` or `train_bpe_tokenizer`.
      image_config: image preprocessing settings.
      padding_side: "left" or "right"; overridable per call.
      chat_template: jinja template for messages; default the tokenizer's own,
        else the Qwen2.5-VL one.

    Raises:
      ProcessorError: the tokenizer lacks `<|image_pad|>` / `<|video_pad|>` as
        single tokens or a pad token, or padding_side is invalid.
    """
    _check_padding_side(padding_side)
    self.tokenizer = tokenizer
    self.image_config = image_config
    self.padding_side = padding_side
    self.chat_template = chat_template or tokenizer.chat_template or QWEN2_5_VL_CHAT_TEMPLATE
    self.image_token_id = self._single_token_id(IMAGE_PAD)
    self.video_token_id = self._single_token_id(VIDEO_PAD)
    if tokenizer.pad_token_id is None:
      raise ProcessorError("the tokenizer has no pad token; set tokenizer.pad_token")
    self.pad_token_id = int(tokenizer.pad_token_id)

  def _single_token_id(self, token: str) -> int:
    ids = self.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
      raise ProcessorError(f"the tokenizer does not encode {token} as one token (got {ids}); "
                           "use a tokenizer with the Qwen2.5-VL added tokens")
    return ids[0]

  def apply_chat_template(self, messages: Conversation, add_generation_prompt: bool = False,
                          **template_kwargs) -> str:
    """Renders one conversation to text, one `<|image_pad|>` per image item (not yet expanded).

    Args:
      messages: [{"role": ..., "content": str or a list of items}], items
        {"type": "image"} (optionally with "image": the image) or {"type": "text", "text": ...}.
      add_generation_prompt: end with "<|im_start|>assistant\\n" for the model to continue.
      **template_kwargs: passed to the template (e.g. add_vision_id=True).
    """
    return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template,
                                              tokenize=False,
                                              add_generation_prompt=add_generation_prompt,
                                              **template_kwargs)

  def __call__(self,
               inputs: Union[str, Sequence[str], Conversation, Sequence[Conversation]],
               images: Any = None,
               *,
               add_generation_prompt: bool = False,
               padding_side: Optional[str] = None,
               pad_to_multiple_of: Optional[int] = None,
               **template_kwargs) -> dict[str, Optional[np.ndarray]]:
    """Builds a padded batch.

    Args:
      inputs: one conversation (a list of message dicts), a list of them, a
        prompt string, or a list of strings. Strings are tokenized as they are
        (no template); each `<|image_pad|>` in them stands for one image.
      images: the images for the placeholders, in order: one image, a flat
        list for the whole batch, or one list per sample. Each is a PIL image,
        a uint8 array, or a file path / encoded bytes. None: take them from
        the messages' image items ({"type": "image", "image": ...}).
      add_generation_prompt: for messages, end each prompt with the assistant header.
      padding_side: override the processor's "left" / "right".
      pad_to_multiple_of: round T up to a multiple of this (fewer distinct jit shapes).
      **template_kwargs: passed to the chat template.

    Returns:
      {"input_ids": int32 [B, T], "attention_mask": int32 [B, T],
       "pixel_values": float32 [N, 1176] or None, "image_grid_thw": int32 [num_images, 3] or None}.

    Raises:
      ProcessorError: malformed inputs, videos, placeholders and images that
        do not match (per sample when images are given per sample).
      ImageError: an image cannot be loaded or processed.
    """
    side = self.padding_side if padding_side is None else padding_side
    _check_padding_side(side)
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or
                                           pad_to_multiple_of < 1):
      raise ProcessorError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    texts, embedded = self._render(inputs, add_generation_prompt, template_kwargs)
    flat_images, per_sample_counts = _collect_images(images, embedded, len(texts))

    rows = self.tokenizer(texts)["input_ids"]
    placeholders = []
    for i, row in enumerate(rows):
      row = np.asarray(row, dtype=np.int64)
      if np.any(row == self.video_token_id):
        raise ProcessorError(f"sample {i} holds {VIDEO_PAD}: videos are not supported")
      placeholders.append(int(np.sum(row == self.image_token_id)))
    _check_counts(placeholders, per_sample_counts, len(flat_images))

    pixel_values = image_grid_thw = None
    tokens_per_image = []
    if flat_images:
      pixel_values, image_grid_thw = preprocess_images([_to_image(x) for x in flat_images],
                                                       self.image_config)
      tokens_per_image = [num_image_tokens(g, self.image_config.merge_size) for g in image_grid_thw]

    expanded, next_image = [], 0
    for row, count in zip(rows, placeholders):
      row = np.asarray(row, dtype=np.int32)  # [L]
      repeats = np.ones(len(row), dtype=np.int64)  # [L]: each placeholder -> its image's tokens
      repeats[row == self.image_token_id] = tokens_per_image[next_image:next_image + count]
      next_image += count
      expanded.append(np.repeat(row, repeats))
    input_ids, attention_mask = self._pad(expanded, side, pad_to_multiple_of)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
    }

  def _render(self, inputs, add_generation_prompt: bool,
              template_kwargs: dict) -> tuple[list[str], list[list[Any]]]:
    """(texts [B], per-sample embedded image values, None where an image item holds none)."""
    if isinstance(inputs, str):
      return [inputs], [[]]
    if isinstance(inputs, Mapping) or not isinstance(inputs, Sequence) or len(inputs) == 0:
      raise ProcessorError("inputs must be a string, a list of strings, a conversation (a list of "
                           f"message dicts) or a list of conversations; got {_describe(inputs)}")
    if all(isinstance(x, str) for x in inputs):
      return list(inputs), [[] for _ in inputs]
    conversations = [inputs] if isinstance(inputs[0], Mapping) else list(inputs)
    texts, embedded = [], []
    for i, conversation in enumerate(conversations):
      embedded.append(_conversation_images(conversation, i))
      texts.append(self.apply_chat_template(conversation, add_generation_prompt, **template_kwargs))
    return texts, embedded

  def _pad(self, rows: list[np.ndarray], side: str,
           multiple: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pads rows to a common length: (input_ids int32 [B, T], attention_mask int32 [B, T])."""
    length = max(len(r) for r in rows)
    if multiple:
      length = -(-length // multiple) * multiple
    input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
      span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
      input_ids[i, span] = row
      attention_mask[i, span] = 1
    return input_ids, attention_mask

  def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
    """One row of ids (list, numpy or jax array [T]) back to text."""
    return self.tokenizer.decode(np.asarray(token_ids).reshape(-1).tolist(),
                                 skip_special_tokens=skip_special_tokens)

  def batch_decode(self, token_ids, skip_special_tokens: bool = False) -> list[str]:
    """Rows of ids ([B, T]) back to texts; skip_special_tokens drops padding and chat markers."""
    return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in token_ids]


def _check_padding_side(side: str) -> None:
  if side not in ("left", "right"):
    raise ProcessorError(f"padding_side must be 'left' or 'right', got {side!r}")


def _describe(value: Any) -> str:
  if isinstance(value, Sequence) and not isinstance(value, str) and value:
    return f"a {type(value).__name__} of {type(value[0]).__name__}"
  return f"{type(value).__name__} {value!r}"[:80]


def _conversation_images(conversation: Any, index: int) -> list[Any]:
  """Checks one conversation's structure; its image items' values (None where absent), in order."""
  if isinstance(conversation, (str, Mapping)) or not isinstance(conversation, Sequence):
    raise ProcessorError(f"sample {index}: a conversation must be a list of message dicts, got "
                         f"{_describe(conversation)}")
  found = []
  for m, message in enumerate(conversation):
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
      raise ProcessorError(f"sample {index}, message {m}: a message must be a dict with a str "
                           f"'role', got {_describe(message)}")
    content = message.get("content")
    if isinstance(content, str):
      continue
    if not isinstance(content, Sequence) or not all(isinstance(item, Mapping) for item in content):
      raise ProcessorError(f"sample {index}, message {m}: 'content' must be a str or a list of "
                           f"dicts, got {_describe(content)}")
    for k, item in enumerate(content):
      if _is_image_item(item):
        found.append(item.get("image"))
      elif _is_video_item(item):
        raise ProcessorError(f"sample {index}, message {m}, item {k}: videos are not supported")
      elif "text" not in item:
        raise ProcessorError(f"sample {index}, message {m}, item {k}: an item needs type 'image' "
                             f"or a 'text', got keys {sorted(item)}")
  return found


def _collect_images(images: Any, embedded: list[list[Any]],
                    batch: int) -> tuple[list[Any], Optional[list[int]]]:
  """(all images in batch order, images per sample; None when a flat list spans several samples)."""
  in_messages = sum(image is not None for sample in embedded for image in sample)
  if images is None:
    for i, sample in enumerate(embedded):
      for k, image in enumerate(sample):
        if image is None:
          raise ProcessorError(f"sample {i}: image item {k} carries no image (no 'image' value) "
                               "and no images= were given")
    return [image for sample in embedded for image in sample], [len(sample) for sample in embedded]
  if in_messages:
    raise ProcessorError("images were given both inside the messages and as images=; use one")
  if isinstance(images, (PIL.Image.Image, str, os.PathLike, bytes)) or (
      isinstance(images, np.ndarray) and images.ndim in (2, 3)):
    images = [images]
  images = list(images)
  if images and all(isinstance(x, (list, tuple)) for x in images):
    if len(images) != batch:
      raise ProcessorError(f"images were given per sample for {len(images)} samples, but the "
                           f"batch has {batch}")
    return [x for sample in images for x in sample], [len(sample) for sample in images]
  return images, [len(images)] if batch == 1 else None


def _check_counts(placeholders: list[int], per_sample: Optional[list[int]], total: int) -> None:
  """Placeholders must match images: per sample when known, else in total."""
  if per_sample is not None:
    for i, (count, given) in enumerate(zip(placeholders, per_sample)):
      if count != given:
        raise ProcessorError(f"sample {i} has {count} {IMAGE_PAD} placeholder(s) but {given} "
                             "image(s) were given for it" + _HINT)
  elif sum(placeholders) != total:
    raise ProcessorError(f"the batch has {sum(placeholders)} {IMAGE_PAD} placeholder(s) (per "
                         f"sample: {placeholders}) but {total} image(s) were given" + _HINT)


# Text that was expanded once already (e.g. decoded model inputs) holds many pads per image.
_HINT = (f"; each image takes exactly one {IMAGE_PAD} in the text (the chat template writes "
         f"<|vision_start|>{IMAGE_PAD}<|vision_end|>), which the processor expands")
