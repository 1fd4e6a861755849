r"""Model batches for the backbone stages: prepared datasets -> tokens, images and a loss mask.

An example is written as *segments*, (text, learn) pieces of one token sequence in order;
each is tokenized by the `Processor` (which expands `<|image_pad|>` and preprocesses the
images the piece holds), and `learn` says whether the loss counts its tokens. Segments
end at a newline or a special token, where Qwen2's pre-tokenizer splits anyway, so the
concatenated pieces equal the whole text's tokens (for chat, what `Processor` gives for
the whole conversation; `tests/test_backbone_stages.py` checks it). The formats, with
`|` between segments and [...] the learned ones:

  pretraining, paired:    <|vision_start|><|image_pad|><|vision_end|>{prompt}\n
                          | [{answer}<|endoftext|>]
  pretraining, text-only: [{text}<|endoftext|>]
  SFT (chat template):    <|im_start|>system ... <|im_start|>assistant\n
                          | [{reply}<|im_end|>] | \n<|im_start|>user ...

A paired example's text is the world's `text` (prompt, newline, answer), so the same
sample without its image is a text-only document. SFT learns every assistant turn of
a dialogue (role-play has one or two, personalised one), nothing the user or system says.

`loss_mask[t] = 1` means token t is a target, predicted from the tokens before it (so
the first token of a sequence is never learned). Examples longer than the stage's
`seq_len` are cut at the end; shapes are static: every batch is padded to `seq_len`
tokens and to an image budget of one image per example (`image_budget`), so a stage's
step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import transformers

from latent_mca import tasks
from latent_mca.config_schema import ConfigError
from latent_mca.data import real, synthetic, tfds_builders
from latent_mca.data.batching import DataLoader, collate
from latent_mca.data.image_processing import ImageProcessorConfig, square_size
from latent_mca.data.processor import Processor
from latent_mca.data.tokenizers import (ENDOFTEXT, IM_END, IMAGE_PAD, VISION_END, VISION_START,
                                        load_qwen_tokenizer)
from latent_mca.parallel import distributed

Segment = tuple[str, bool]  # (text, whether the loss learns its tokens)

DIALOGUE_MESSAGES = {"roleplay": tasks.roleplay_messages,
                     "personalised": tasks.personalised_messages}


class DataNotPreparedError(FileNotFoundError):
  """The datasets or tokenizer a stage reads are not in the workdir: prepare_data has not run."""


def load_tokenizer(config, workdir: str) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer of the backbone: a real checkpoint's own, else prepare_data's BPE.

  Raises:
    DataNotPreparedError: no checkpoint is configured and workdir/tokenizer does not exist.
  """
  if config.backbone.checkpoint:
    folder = config.backbone.checkpoint
  else:
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
      raise DataNotPreparedError(f"{folder} holds no tokenizer; run the prepare_data stage "
                                 "first, e.g. --config.stages=prepare_data,pretrain")
  return _cached_tokenizer(os.path.abspath(folder), _folder_stamp(folder),
                           bool(config.backbone.checkpoint))


def _folder_stamp(folder: str) -> tuple:
  """(name, size, mtime) of a folder's files: a changed tokenizer is loaded again."""
  if not os.path.isdir(folder):
    return ()
  return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                      for e in os.scandir(folder) if e.is_file()))


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(folder: str, stamp: tuple, checkpoint: bool):
  """Loading a tokenizer takes seconds and every stage needs it: one load per folder state."""
  del stamp
  if checkpoint:
    return load_qwen_tokenizer(folder)
  return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


# The dialogue tasks a real benchmark can stand in for: task -> (config.data field, builder).
REAL_TASKS = {"roleplay": ("mmrole_dir", tfds_builders.MMRoleTask),
              "personalised": ("pcogalign_dir", tfds_builders.PCogAlignBenchTask)}


def datasets(config, data_dir: str) -> dict:
  """The tfds builders of every dataset of the pipeline, by name, under data_dir.

  The synthetic world's, except that a dialogue task whose benchmark folder config.data
  names (`REAL_TASKS`) is that benchmark (`tfds_builders.MMRoleTask`,
  `PCogAlignBenchTask`); paired and text-only data are always the world's.

  Raises:
    ConfigError: a benchmark folder is missing or lacks a folder or file of its published
      layout; the message names the config field and the path.
  """
  d = config.data

  def cfg(sizes):
    return synthetic.synthetic_config(config.seed, sizes, d.image_size)

  builders = {
      "paired": synthetic.SyntheticPaired(
          config=cfg({"train": d.paired_train, "test": d.paired_test}), data_dir=data_dir),
      "text_only": synthetic.SyntheticTextOnly(
          config=cfg({"train": d.text_train, "test": d.text_test}), data_dir=data_dir),
  }
  synthetic_tasks = {"roleplay": synthetic.SyntheticRoleplay,
                     "personalised": synthetic.SyntheticPersonalised}
  for task, (field, benchmark) in REAL_TASKS.items():
    if d[field]:
      try:
        builders[task] = benchmark.for_folder(d[field], d.image_size, d.skip_bad, data_dir)
      except real.DataError as e:
        raise ConfigError(f"config.data.{field}: {e}") from None
    else:
      builders[task] = synthetic_tasks[task](
          config=cfg({"in": d.dialogue_in, "out": d.dialogue_out}), data_dir=data_dir)
  return builders


def load_sources(config, workdir: str, splits: Sequence[str]) -> dict[str, Any]:
  """Random-access sources of prepared splits, by "dataset/split" (e.g. "paired/train").

  Raises:
    DataNotPreparedError: a dataset has not been built in workdir/data.
  """
  builders = datasets(config, os.path.join(workdir, "data"))
  sources = {}
  for name in splits:
    dataset, split = name.split("/")
    builder = builders[dataset]
    if not builder.is_prepared():
      raise DataNotPreparedError(f"dataset {dataset} is not built in {builder.data_dir}; run the "
                                 "prepare_data stage first, e.g. --config.stages=prepare_data,sft")
    sources[name] = builder.as_data_source()[split]
  return sources


def decode_example(value: Any) -> Any:
  """A tfds example as plain Python: bytes -> str, a Sequence of dicts -> a list of dicts.

  tfds hands a `Sequence({...})` feature back as a dict of equal-length lists (dialogue
  turns, role sets); the task functions take the benchmark's list of dicts. Images stay
  uint8 arrays [H, W, 3].
  """
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
    return [decode_example(v) for v in value]
  if isinstance(value, (list, tuple)):
    return [decode_example(v) for v in value]
  if isinstance(value, Mapping):
    fields = {key: decode_example(item) for key, item in value.items()}
    columns = list(fields.values())
    if columns and all(isinstance(c, list) for c in columns) and len(set(map(len, columns))) == 1:
      return [dict(zip(fields, row)) for row in zip(*columns)]
    return fields
  return value


# ----------------------------------------------------------------------------- segments


def paired_segments(example: Mapping) -> list[Segment]:
  """A paired sample as a document: its image and prompt, then the answer to learn."""
  return [(f"{VISION_START}{IMAGE_PAD}{VISION_END}{example['prompt']}\n", False),
          (example["answer"] + ENDOFTEXT, True)]


def text_segments(example: Mapping) -> list[Segment]:
  """A text-only sample as a document, all of it learned."""
  return [(example["text"] + ENDOFTEXT, True)]


def chat_segments(processor: Processor, messages: Sequence[Mapping]) -> list[Segment]:
  """The rendered chat with each assistant turn's content and `<|im_end|>` learned.

  Each turn's boundaries come from rendering the conversation up to it, so this holds for
  any chat template that renders a conversation's prefixes as prefixes of it and closes
  an assistant turn with `<|im_end|>` (Qwen's do).

  Raises:
    ValueError: a template that breaks those assumptions.
  """
  segments, done = [], ""
  for k, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prompt = processor.apply_chat_template(messages[:k], add_generation_prompt=True)
    full = processor.apply_chat_template(messages[:k + 1])
    end = full.rfind(IM_END) + len(IM_END)
    if not (prompt.startswith(done) and full.startswith(prompt) and end > len(prompt)):
      raise ValueError("the chat template does not render conversation prefixes as prefixes "
                       f"closed by {IM_END}; cannot locate assistant turn {k}")
    segments += [(prompt[len(done):], False), (full[len(prompt):end], True)]
    done = full[:end]
  rest = processor.apply_chat_template(messages)[len(done):]
  return [(text, learn) for text, learn in segments + [(rest, False)] if text]


def encode_segments(processor: Processor, segments: Sequence[Segment], images: Sequence[Any],
                    max_length: int) -> dict[str, np.ndarray]:
  """Tokenizes segments into one example for `collate`, cut to max_length tokens.

  Args:
    processor: tokenizes and preprocesses images.
    segments: (text, learn) in order; the `<|image_pad|>` placeholders in them take
      `images` in order.
    images: one per placeholder (uint8 arrays or PIL images).
    max_length: the stage's sequence length; longer examples lose their end.

  Returns:
    input_ids int32 [L], loss_mask int32 [L] (L <= max_length) and, with images,
    pixel_values float32 [N, 1176] and image_grid_thw int32 [K, 3].

  Raises:
    ValueError: max_length would cut into an image's tokens.
  """
  ids, mask, pixels, grids, used = [], [], [], [], 0
  for text, learn in segments:
    count = text.count(IMAGE_PAD)
    out = processor(text, images=list(images[used:used + count]) if count else None)
    used += count
    ids.append(out["input_ids"][0])  # [L_segment]
    mask.append(np.full(len(ids[-1]), int(learn), np.int32))
    if count:
      pixels.append(out["pixel_values"])
      grids.append(out["image_grid_thw"])
  input_ids, loss_mask = np.concatenate(ids), np.concatenate(mask)  # [L], [L]
  if len(input_ids) > max_length:
    if np.any(input_ids[max_length:] == processor.image_token_id):
      raise ValueError(f"seq_len={max_length} cuts into an image's tokens (the example has "
                       f"{len(input_ids)}); raise the stage's seq_len")
    input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
  example = {"input_ids": input_ids, "loss_mask": loss_mask}
  if pixels:
    example["pixel_values"] = np.concatenate(pixels)
    example["image_grid_thw"] = np.concatenate(grids)
  return example


def pretrain_example(processor: Processor, dataset: str, example: Mapping,
                     max_length: int) -> dict[str, np.ndarray]:
  """A decoded "paired" or "text_only" example as a pretraining example for `collate`."""
  if dataset == "paired":
    return encode_segments(processor, paired_segments(example), [example["image"]], max_length)
  if dataset == "text_only":
    return encode_segments(processor, text_segments(example), [], max_length)
  raise ValueError(f"pretraining reads 'paired' and 'text_only', not {dataset!r}")


def sft_example(processor: Processor, task: str, example: Mapping,
                max_length: int) -> dict[str, np.ndarray]:
  """A decoded dialogue example ("roleplay" or "personalised") as an SFT example for `collate`."""
  messages = DIALOGUE_MESSAGES[task](example, include_reply=True)
  return encode_segments(processor, chat_segments(processor, messages), [example["image"]],
                         max_length)


def latent_paired_example(processor: Processor, dataset: str, example: Mapping,
                          max_length: int) -> dict[str, dict[str, np.ndarray]]:
  """A paired sample for the latent stages: {"image": with its image, "text": without it}.

  All of its text is learned (the latent model labels every transition of the text).
  The image block is the prefix of "image", and "text" is "image" without that prefix,
  so after left padding to one length (`collate_views`) both hold the same text token
  at every position where "text" has one: the alignment the projector losses need.
  """
  if dataset != "paired":
    raise ValueError(f"latent paired examples read 'paired', not {dataset!r}")
  segments = [(f"{VISION_START}{IMAGE_PAD}{VISION_END}", False),
              (f"{example['prompt']}\n", True), (example["answer"] + ENDOFTEXT, True)]
  image = encode_segments(processor, segments, [example["image"]], max_length)
  vision_end = processor.tokenizer.convert_tokens_to_ids(VISION_END)
  start = int(np.flatnonzero(image["input_ids"] == vision_end)[0]) + 1
  text = {"input_ids": image["input_ids"][start:], "loss_mask": image["loss_mask"][start:]}
  return {"image": image, "text": text}


def collate_views(examples: Sequence[Mapping], image_collate: Callable,
                  text_collate: Callable) -> dict[str, dict[str, np.ndarray]]:
  """`latent_paired_example`s -> {"image": image_collate(...), "text": text_collate(...)}.

  Both collates must pad on the left to the same length, so the views stay aligned.
  """
  return {"image": image_collate([e["image"] for e in examples]),
          "text": text_collate([e["text"] for e in examples])}


# ----------------------------------------------------------------------------- sources


class EncodedSource:
  """Several random-access sources end to end, each example decoded and encoded when read.

  `parts` are (source, encode) pairs; index i reads the source it falls in and returns
  `encode(decode_example(raw))`. Deterministic, so loaders over it resume bit-exactly.
  """

  def __init__(self, parts: Sequence[tuple[Any, Callable[[Any], dict]]]):
    self._parts = list(parts)
    self._ends = np.cumsum([len(source) for source, _ in self._parts])  # [num_parts]

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    part = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[part - 1]) if part else 0
    source, encode = self._parts[part]
    return encode(decode_example(source[index - start]))


def image_budget(config, batch_size: int) -> tuple[int, int]:
  """`collate`'s pad_images_to for batches with at most one dataset image per example.

  Every synthetic image has config.data.image_size pixels a side, so it takes P patches
  (a real benchmark's images are stored at most that many: `tfds_builders.fitted_png`);
  a batch needs B * P patches and B images, plus one slot of 4 patches for the dummy
  image that fills what the batch leaves free.
  """
  image = ImageProcessorConfig()
  height, width = square_size(config.data.image_size, image)
  patches = (height // image.patch_size) * (width // image.patch_size)
  return batch_size * patches + image.merge_size**2, batch_size + 1


@dataclasses.dataclass(frozen=True)
class StageData:
  """What a backbone stage reads: encoded examples and how to batch them.

  Attributes:
    processor: the tokenizer and image settings the examples were made with.
    train: the training examples.
    eval: held-out examples by name (e.g. "paired", "text_only").
    collate_fn: list of examples -> a static-shape batch: input_ids, attention_mask,
      loss_mask [B, seq_len] int32; pixel_values [N, 1176], image_grid_thw [K, 3] with
      (N, K) = `image_budget`.
    batch_size: examples per batch.
  """

  processor: Processor
  train: EncodedSource
  eval: dict[str, EncodedSource]
  collate_fn: Callable[[list], dict]
  batch_size: int


def _stage_data(config, workdir: str, stage, train_parts: Sequence[str],
                eval_parts: Mapping[str, Sequence[str]], encode) -> StageData:
  """StageData over prepared splits; encode(processor, dataset, example, max_length)."""
  processor = Processor(load_tokenizer(config, workdir))
  names = list(train_parts) + [n for parts in eval_parts.values() for n in parts]
  sources = load_sources(config, workdir, names)

  def encoded(parts):
    return EncodedSource([
        (sources[name], functools.partial(encode, processor, name.split("/")[0],
                                          max_length=stage.seq_len))
        for name in parts])

  collate_fn = functools.partial(collate, pad_id=processor.pad_token_id, pad_to=stage.seq_len,
                                 pad_images_to=image_budget(config, stage.batch_size))
  return StageData(processor=processor, train=encoded(train_parts),
                   eval={name: encoded(parts) for name, parts in eval_parts.items()},
                   collate_fn=collate_fn, batch_size=stage.batch_size)


def pretrain_data(config, workdir: str) -> StageData:
  """Pretraining: paired + text-only train splits mixed; evaluated on each test split."""
  return _stage_data(config, workdir, config.pretrain, ("paired/train", "text_only/train"),
                     {"paired": ("paired/test",), "text_only": ("text_only/test",)},
                     pretrain_example)


def sft_data(config, workdir: str, stage=None) -> StageData:
  """SFT: the role-play and personalised sft splits mixed; evaluated on each task's test_in.

  `stage` is the stage config giving seq_len and batch_size (default config.sft).
  """
  return _stage_data(config, workdir, config.sft if stage is None else stage,
                     [f"{t}/sft" for t in DIALOGUE_MESSAGES],
                     {t: (f"{t}/test_in",) for t in DIALOGUE_MESSAGES}, sft_example)


def latent_data(config, workdir: str, seq_len: int, batch_size: int) -> dict[str, StageData]:
  """The latent stages' data: {"paired": ..., "text_only": ...}, each a StageData.

  "paired" holds `latent_paired_example`s, collated as {"image": batch, "text": batch}
  (the same samples with and without their image, aligned token by token); "text_only"
  the text-only corpus, every token learned. Each has batches of `batch_size` and is
  evaluated on its own test split, under its own name; a stage zips the parts it
  trains on (`ZipLoader`).
  """
  processor = Processor(load_tokenizer(config, workdir))
  sources = load_sources(config, workdir, [f"{dataset}/{split}" for dataset in
                                           ("paired", "text_only") for split in ("train", "test")])
  image_collate = functools.partial(collate, pad_id=processor.pad_token_id, pad_to=seq_len,
                                    pad_images_to=image_budget(config, batch_size))
  text_collate = functools.partial(collate, pad_id=processor.pad_token_id, pad_to=seq_len)

  def part(dataset, encode, collate_fn):
    def encoded(split):
      return EncodedSource([(sources[f"{dataset}/{split}"],
                             functools.partial(encode, processor, dataset, max_length=seq_len))])
    return StageData(processor=processor, train=encoded("train"),
                     eval={dataset: encoded("test")}, collate_fn=collate_fn,
                     batch_size=batch_size)

  return {"paired": part("paired", latent_paired_example,
                         functools.partial(collate_views, image_collate=image_collate,
                                           text_collate=text_collate)),
          "text_only": part("text_only", pretrain_example, text_collate)}


def train_loader(data: StageData, seed: int) -> DataLoader:
  """Shuffled batches of `data.train`, endlessly, resumable through `state()` / `restore()`;
  with several processes, each reads its own rows of every batch."""
  return DataLoader(data.train, data.batch_size, collate_fn=data.collate_fn, seed=seed,
                    **distributed.process_shard())


def eval_batches(data: StageData, name: str, max_examples: int = 0) -> list[dict]:
  """The first max_examples (0: all) of eval set `name`, as batches of the training shapes.

  The last batch is filled up with copies of the set's first example whose loss_mask is
  zero, so every batch has the same shape and sums over the batches count each example once.
  """
  source = data.eval[name]
  n = len(source) if max_examples <= 0 else min(max_examples, len(source))
  if n == 0:
    raise ValueError(f"eval set {name} is empty")
  examples = [source[i] for i in range(n)]
  examples += [_unlearned(examples[0])] * (-n % data.batch_size)
  return [data.collate_fn(examples[i:i + data.batch_size])
          for i in range(0, len(examples), data.batch_size)]


def _unlearned(example: Mapping) -> dict:
  """A copy of an example (or of each view of one) with loss_mask all zero."""
  if "loss_mask" in example:
    return dict(example, loss_mask=np.zeros_like(example["loss_mask"]))
  return {name: _unlearned(view) for name, view in example.items()}
