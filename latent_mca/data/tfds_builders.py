"""tensorflow-datasets builders for the project's datasets, used without TensorFlow.

Each builder writes its splits once, as ArrayRecord files under
`<data_dir>/<name>/<version>/`, and reads them back by random access:

    builder = MMRole(data_dir="/data/tfds")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/MMRole_dataset"))
    source = builder.as_data_source()["in_distribution"]
    example = source[0]   # numpy: images uint8 [H, W, 3], text as bytes

`download_and_prepare` is a no-op when `data_dir` already holds this version
of the dataset (a second builder, a second process, a later run): nothing is
read or regenerated. To rebuild after changing the data or the code, bump
`VERSION` or delete `<data_dir>/<name>/<version>/`.

Only `tensorflow_datasets`, `array_record` and `importlib_resources` (which
tfds 4.9.10 imports without declaring it, tensorflow/datasets#11212) are
needed: the builders and `as_data_source()` run on numpy, and TensorFlow is
never imported (only `as_dataset()`, unused here, would need it).

`ExamplesBuilder` is the base for any dataset the project makes itself
(the synthetic paired, text-only, role-play and personalised sets): a
subclass lists its splits and features and yields plain-dict examples.
`MMRole` and `PCogAlignBench` are the two reference benchmarks, read from a
local copy (the manual dir) by `latent_mca.data.real`, in their own splits.
`MMRoleTask` and `PCogAlignBenchTask` are the same benchmarks as the pipeline's
dialogue tasks (`config.data.mmrole_dir` / `pcogalign_dir`): the synthetic tasks'
sft / rl / test_in / test_out splits, images sized for the stages' batches.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator

import PIL.Image
import tensorflow_datasets as tfds

from latent_mca import tasks
from latent_mca.data import real
from latent_mca.data.image_processing import fitted_size, load_image

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


class ExamplesBuilder(tfds.core.GeneratorBasedBuilder):
  """A tfds builder over examples made in Python: subclass it, list splits, define two methods.

  Subclasses set `VERSION` (bump it whenever the generated data changes) and
  `SPLITS`, and define `features()` and `examples(split)`:

      class PairedWorld(ExamplesBuilder):
        '''Synthetic scenes with captions.'''
        VERSION = tfds.core.Version("1.0.0")
        SPLITS = ("train", "test")

        def features(self):
          return {"image": tfds.features.Image(), "caption": tfds.features.Text()}

        def examples(self, split):
          for scene in make_scenes(split):
            yield {"image": scene.png_bytes, "caption": scene.caption}

      builder = PairedWorld(data_dir=...)
      builder.download_and_prepare()
      builder.as_data_source()["train"][3]

  The dataset's name (its folder under data_dir, and its key for
  `tfds.builder`) is the class name in snake_case unless `name` is set; it
  must be unique in the process. Examples are stored in ArrayRecord files
  and, unless `KEEP_ORDER`, in a pseudo-random order fixed by their index.
  Give images as encoded PNG/JPEG bytes, file paths, or PIL images (with
  `tfds.features.Image(encoding_format="png")`); tfds encodes numpy arrays
  with TensorFlow, so wrap them in `PIL.Image.fromarray` first.
  """

  VERSION = tfds.core.Version("1.0.0")
  SPLITS: tuple[str, ...] = ()
  KEEP_ORDER = False

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    """Takes tfds `DatasetBuilder` keyword arguments (data_dir, ...); files default to ArrayRecord."""
    super().__init__(file_format=file_format, **kwargs)

  @abc.abstractmethod
  def features(self) -> dict:
    """The features of one example: a dict of `tfds.features` connectors (nested dicts allowed)."""

  @abc.abstractmethod
  def examples(self, split: str) -> Iterable[dict]:
    """Yields the examples of `split`, plain dicts matching `features()`."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(self.features()),
        disable_shuffling=self.KEEP_ORDER,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # examples() makes everything itself; manual-dir builders override this
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    for index, example in enumerate(self.examples(split)):
      yield index, example


def encoded_image(path: str) -> bytes:
  """Encoded bytes of the image file at `path` whose plain decode equals `load_image(path)`.

  RGB or greyscale JPEG/PNG files without an EXIF rotation are kept byte for
  byte (tfds decodes greyscale to three equal channels, as `convert("RGB")`
  does); anything else is converted the way the model's image pipeline
  converts a file and stored as lossless PNG.

  Raises:
    real.DataError: the file is missing or not a decodable image.
  """
  try:
    with PIL.Image.open(path) as image:
      image.load()  # `open` reads only the header; truncation shows up here
      keep = (image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L")
              and "transparency" not in image.info
              and image.getexif().get(_EXIF_ORIENTATION, 1) == 1)
    if keep:
      with open(path, "rb") as f:
        return f.read()
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    return buffer.getvalue()
  except (OSError, SyntaxError, ValueError, EOFError) as e:  # load_image's ImageError is a ValueError
    raise real.DataError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e


def _text_dict(keys: Iterable[str]) -> dict:
  return {key: tfds.features.Text() for key in keys}


def roleplay_features() -> dict:
  """Features of a role-play example (`real.read_mmrole`'s schema) plus its `image`."""
  return {
      "id": tfds.features.Text(),
      "image": tfds.features.Image(),
      "image_path": tfds.features.Text(),
      "character": _text_dict(("name",) + real.MMROLE_KEYS["profile_fields"]),
      "dialogue": tfds.features.Sequence(_text_dict(("role", "speaker", "text"))),
      "distribution": tfds.features.Text(),
      "dialogue_type": tfds.features.Text(),
      "scene": _text_dict(real.MMROLE_KEYS["scene_fields"]),
  }


def personalised_features() -> dict:
  """Features of a personalised example (`real.read_pcogalign`'s schema) plus its `image`."""
  return {
      "id": tfds.features.Text(),
      "subset": tfds.features.Text(),
      "individual": tfds.features.Text(),
      "role_set": tfds.features.Sequence(_text_dict(("location", "role"))),
      "situation": _text_dict(("location", "image_description", "eval_help")),
      "image": tfds.features.Image(),
      "image_path": tfds.features.Text(),
      "query": tfds.features.Text(),
      "reference_reply": tfds.features.Text(),
  }


class _ManualDirBuilder(ExamplesBuilder):
  """An `ExamplesBuilder` whose source is a local benchmark copy: the tfds manual dir."""

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    """skip_bad: skip (and log) bad files and examples instead of failing, as in `real`."""
    super().__init__(**kwargs)
    self._skip_bad = skip_bad
    self._root = ""

  def _split_generators(self, dl_manager):
    # Reading `manual_dir` fails with MANUAL_DOWNLOAD_INSTRUCTIONS when it is missing or empty.
    self._root = os.fspath(dl_manager.manual_dir)
    return super()._split_generators(dl_manager)

  def _stored(self, example: dict) -> dict:
    """The example with its image file as encoded bytes and its path relative to the manual dir."""
    path = example["image_path"]
    return {**example, "image": encoded_image(path), "image_path": os.path.relpath(path, self._root)}


class MMRole(_ManualDirBuilder):
  """MMRole-Data role-play dialogues (in- and out-of-distribution characters), from a local copy.

  Fields are those of `latent_mca.data.real.read_mmrole` plus `image` (the
  decoded image); `image_path` is relative to the manual dir.
  """

  name = "mmrole"
  VERSION = tfds.core.Version("1.0.0")
  SPLITS = tuple(real.MMROLE_SPLITS)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the MMRole_dataset folder (dialogues/, profiles/, images/ with "
      "images/COCO/train2017/) as DownloadConfig(manual_dir=...).")

  def features(self) -> dict:
    return roleplay_features()

  def examples(self, split: str) -> Iterator[dict]:
    for example in real.read_mmrole(self._root, split, skip_bad=self._skip_bad):
      yield self._stored(example)


class PCogAlignBench(_ManualDirBuilder):
  """PCogAlignBench personalised dialogue (role sets, situations, queries), from a local copy.

  Fields are those of `latent_mca.data.real.read_pcogalign` plus `image`;
  `image_path` is relative to the manual dir. The published splits are
  required; the golden test splits (with reference replies) are built when
  their files are there.
  """

  name = "pcogalign_bench"
  VERSION = tfds.core.Version("1.0.0")
  SPLITS = real.PCOGALIGN_PUBLISHED_SPLITS
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the PCogAlignBench folder (or its version_v4/ subfolder) as "
      "DownloadConfig(manual_dir=...).")

  def features(self) -> dict:
    return personalised_features()

  def _split_generators(self, dl_manager):
    generators = super()._split_generators(dl_manager)
    folder = real.pcogalign_dir(self._root)
    for split, (file_name, _) in real.PCOGALIGN_SPLITS.items():
      if split not in generators and os.path.isfile(os.path.join(folder, file_name)):
        generators[split] = self._generate_examples(split)
    return generators

  def examples(self, split: str) -> Iterator[dict]:
    for example in real.read_pcogalign(self._root, split, skip_bad=self._skip_bad):
      yield self._stored(example)


# ----------------------------------------------------------------------------- pipeline tasks


@dataclasses.dataclass(eq=False)
class BenchmarkConfig(tfds.core.BuilderConfig):
  """root: the benchmark folder; image_size: the side of the stages' image budget;
  skip_bad: skip (and log) bad files and examples, as in `real`."""

  root: str = ""
  image_size: int = 56
  skip_bad: bool = False


def fitted_png(path: str, side: int) -> bytes:
  """The image file at `path` as the model pipeline converts it, resized to
  `fitted_size(..., side)` where it is not that size already, as lossless PNG.

  Raises:
    real.DataError: the file is missing or not a decodable image.
  """
  try:
    image = load_image(path)
    height, width = fitted_size(image.height, image.width, side)
  except ValueError as e:  # load_image's and smart_resize's ImageError
    raise real.DataError(f"{path}: cannot decode image: {e}") from e
  if (image.height, image.width) != (height, width):
    image = image.resize((width, height), PIL.Image.BICUBIC)  # the processor's resampling
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


class _BenchmarkTask(ExamplesBuilder):
  """A real benchmark as one of the pipeline's dialogue tasks: the splits `tasks.SPLITS`
  (sft / rl / test_in / test_out) in the reader's schema, plus `image`.

  Subclasses name the folders and files they read (`layout`) and each split's examples
  (`split_examples`). An example the stages cannot train or be scored on, one whose chat
  `MESSAGES` refuses (no reference reply, or no user turn before it), is dropped and
  counted in an INFO log line; a split left empty is a DataError. Images are stored at
  `fitted_size` for config.image_size, so none takes more patches than the stages' batches
  hold for it (`stages.data.image_budget`); `image_path` is relative to the root. Build
  one with `for_folder`: its config's name holds the settings and a digest of the
  folder's path and JSON files (size, mtime), so changed data builds anew.
  """

  VERSION = tfds.core.Version("1.0.0")
  SPLITS = tasks.SPLITS
  MESSAGES = staticmethod(tasks.roleplay_messages)  # the task's chat messages
  SOURCES: dict[str, str] = {}  # split -> where its examples come from, for messages

  def __init__(self, *, config: BenchmarkConfig, **kwargs):
    super().__init__(config=config, **kwargs)

  @classmethod
  @abc.abstractmethod
  def layout(cls, root: str) -> list[tuple[str, bool, str]]:
    """The folders and files read under root, as (path, is_dir, what) (`real.check_layout`)."""

  @abc.abstractmethod
  def split_examples(self, split: str) -> Iterable[dict]:
    """The reader's examples that make up `split`."""

  @classmethod
  def for_folder(cls, root: str, image_size: int, skip_bad: bool, data_dir: str):
    """The builder over the benchmark in `root`, its data under data_dir.

    Raises:
      real.DataError: a folder or file of `layout` is missing (the message names it).
    """
    root = os.path.abspath(root)
    layout = cls.layout(root)
    real.check_layout(layout)
    stats = []
    for path, is_dir, _ in layout:
      files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".json")]
               if is_dir else [path])
      stats += [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    digest = hashlib.sha256(repr((root, stats)).encode()).hexdigest()[:16]
    name = f"px{image_size}_{'skipbad_' if skip_bad else ''}{digest}"
    config = BenchmarkConfig(name=name, root=root, image_size=image_size, skip_bad=skip_bad)
    return cls(config=config, data_dir=data_dir)

  def examples(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    kept = dropped = 0
    for example in self.split_examples(split):
      try:
        self.MESSAGES(example, include_reply=True)
      except ValueError:
        dropped += 1
        continue
      kept += 1
      yield {**example, "image": fitted_png(example["image_path"], cfg.image_size),
             "image_path": os.path.relpath(example["image_path"], cfg.root)}
    if dropped:
      logger.info("%s %s: dropped %d example(s) without a reference reply or a user turn "
                  "before it", self.name, split, dropped)
    if not kept:
      raise real.DataError(f"{cfg.root}: no usable example for split {split!r} "
                           f"({self.SOURCES[split]}; {dropped} dropped)")


class MMRoleTask(_BenchmarkTask):
  """MMRole as the pipeline's role-play task.

  The release's dialogues have no train/test split (`real`), so `tasks.split_of`'s rule
  makes them: in-distribution characters' dialogues go to sft / rl / test_in (50 / 40 /
  10%) by a hash of their id, the out-of-distribution characters' are test_out.
  """

  name = "mmrole_task"
  SOURCES = {"sft": "in-distribution dialogues, 50% by id hash",
             "rl": "in-distribution dialogues, 40% by id hash",
             "test_in": "in-distribution dialogues, 10% by id hash",
             "test_out": "out-of-distribution dialogues"}

  @classmethod
  def layout(cls, root: str) -> list[tuple[str, bool, str]]:
    return real.mmrole_layout(root)

  def features(self) -> dict:
    return roleplay_features()

  def split_examples(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    if split == "test_out":
      return real.read_mmrole(cfg.root, "out_of_distribution", skip_bad=cfg.skip_bad)
    return (e for e in self._in_distribution if tasks.split_of(e) == split)

  @functools.cached_property
  def _in_distribution(self) -> list[dict]:
    """The in-distribution dialogues (without images), read once for sft, rl and test_in."""
    cfg = self.builder_config
    return list(real.read_mmrole(cfg.root, "in_distribution", skip_bad=cfg.skip_bad))


class PCogAlignBenchTask(_BenchmarkTask):
  """PCogAlignBench as the pipeline's personalised task.

  test_in and test_out are the golden test files (HCMAS, HCSHR): the only published
  instances with a reference reply, which evaluation scores against. sft and rl divide
  HCMAS-train 5 : 4 by a hash of the id (`tasks.training_split_of`); they keep only its
  instances with a reference reply ("golden_response", which the published train file
  lacks: add one per instance). HCMAS-test / HCSHR-test (the golden files without the
  replies) and HCSHR-train (out-of-distribution role sets, never trained on) are not read.
  """

  name = "pcogalign_bench_task"
  MESSAGES = staticmethod(tasks.personalised_messages)
  FILES = {"sft": "hcmas_train", "rl": "hcmas_train", "test_in": "hcmas_golden_test",
           "test_out": "hcshr_golden_test"}
  SOURCES = {"sft": "HCMAS-train.json with reference replies, 5/9 by id hash",
             "rl": "HCMAS-train.json with reference replies, 4/9 by id hash",
             "test_in": "HCMAS-golden-test.json", "test_out": "HCSHR-golden-test.json"}

  @classmethod
  def layout(cls, root: str) -> list[tuple[str, bool, str]]:
    return real.pcogalign_layout(root, sorted(set(cls.FILES.values())))

  def features(self) -> dict:
    return personalised_features()

  def split_examples(self, split: str) -> Iterator[dict]:
    cfg = self.builder_config
    examples = real.read_pcogalign(cfg.root, self.FILES[split], skip_bad=cfg.skip_bad)
    if split in ("sft", "rl"):
      return (e for e in examples if tasks.training_split_of(e) == split)
    return examples
