"""tfds datasets of the synthetic world: paired data, text-only corpus and the two dialogue tasks.

Each dataset is a pure function of its `SyntheticConfig` (seed, sizes, image
resolution); the config's name encodes all of them, so data built with other
settings lives in another folder and a second build with the same settings
reuses what exists.
"""

from __future__ import annotations

import dataclasses
import io
import json

import tensorflow_datasets as tfds

from latent_mca import tasks, world
from latent_mca.data.tfds_builders import (ExamplesBuilder, personalised_features,
                                           roleplay_features)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """seed: the world's seed; split_sizes: (split, n) pairs; image_size: pixels."""

  seed: int = 0
  split_sizes: tuple[tuple[str, int], ...] = (("train", 2000), ("test", 200))
  image_size: int = 56


def synthetic_config(seed: int, split_sizes: dict[str, int], image_size: int) -> SyntheticConfig:
  """A config whose name (its folder under the dataset) spells out every setting."""
  sizes = tuple(sorted(split_sizes.items()))
  name = f"seed{seed}_px{image_size}_" + "_".join(f"{s}{n}" for s, n in sizes)
  return SyntheticConfig(name=name, seed=seed, split_sizes=sizes, image_size=image_size)


def png_bytes(image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


class _SyntheticBuilder(ExamplesBuilder):
  """Splits come from the config; each split draws its own stream of sample indices."""

  VERSION = tfds.core.Version("1.0.0")
  KEEP_ORDER = True  # the order is already random; keeping it makes shards reproducible

  def __init__(self, *, config: SyntheticConfig, **kwargs):
    super().__init__(config=config, **kwargs)

  @property
  def SPLITS(self):  # noqa: N802 (the base class reads a class-style attribute)
    return tuple(split for split, _ in self.builder_config.split_sizes)

  def _indices(self, split: str) -> range:
    """Disjoint index ranges per split, in the order the splits are listed."""
    start = 0
    for name, n in self.builder_config.split_sizes:
      if name == split:
        return range(start, start + n)
      start += n
    raise KeyError(split)


class SyntheticPaired(_SyntheticBuilder):
  """Rendered scenes with captions, questions/answers and character captions."""

  name = "synthetic_paired"

  def features(self) -> dict:
    text = tfds.features.Text()
    return {"id": text, "image": tfds.features.Image(encoding_format="png"), "scene": text,
            "kind": text, "style": text, "character": text, "prompt": text, "answer": text}

  def examples(self, split: str):
    cfg = self.builder_config
    paired = world.PairedConfig(image_size=cfg.image_size)
    for i in self._indices(split):
      s = world.paired_sample(cfg.seed, i, paired)
      yield {"id": f"paired/{cfg.seed}/{i}", "image": png_bytes(world.sample_image(s)),
             "scene": json.dumps(world.scene_to_json(s["scene"])), "kind": s["kind"],
             "style": s["style"] or "", "character": s["character"] or "",
             "prompt": s["prompt"], "answer": s["answer"]}


class SyntheticTextOnly(_SyntheticBuilder):
  """The text-only corpus: characters, styles and topics that never appear with an image."""

  name = "synthetic_text_only"

  def features(self) -> dict:
    text = tfds.features.Text()
    return {"id": text, "text": text, "kind": text, "style": text, "character": text,
            "topic": text, "coverage": text}

  def examples(self, split: str):
    cfg = self.builder_config
    for i in self._indices(split):
      s = world.text_only_sample(cfg.seed, i)
      yield {"id": f"text/{cfg.seed}/{i}", "text": s["text"], "kind": s["kind"],
             "style": s["style"] or "", "character": s["character"] or "",
             "topic": s["topic"] or "", "coverage": s["coverage"]}


class _DialogueBuilder(_SyntheticBuilder):
  """A dialogue task in its real benchmark's schema; split sizes are ("in", n), ("out", n).

  In-distribution examples are divided into sft / rl / test_in by `tasks.split_of`;
  the out-of-distribution ones form test_out. `image_path` holds the scene
  ("scene:" + JSON, see `tasks.example_scene`) and `image` its rendering.
  """

  TASK = ""

  @property
  def SPLITS(self):  # noqa: N802
    return tasks.SPLITS

  def examples(self, split: str):
    cfg = self.builder_config
    sizes = dict(cfg.split_sizes)
    for example in tasks.task_splits(cfg.seed, sizes["in"], sizes["out"])[self.TASK][split]:
      yield {**example, "image": png_bytes(tasks.example_image(example, cfg.image_size))}


class SyntheticRoleplay(_DialogueBuilder):
  """MMRole-style role-play about synthetic scenes (in- and out-of-distribution characters)."""

  name = "synthetic_roleplay"
  TASK = "roleplay"

  def features(self) -> dict:
    return roleplay_features()


class SyntheticPersonalised(_DialogueBuilder):
  """PCogAlignBench-style personalised dialogue about synthetic scenes (HCMAS / HCSHR)."""

  name = "synthetic_personalised"
  TASK = "personalised"

  def features(self) -> dict:
    return personalised_features()
