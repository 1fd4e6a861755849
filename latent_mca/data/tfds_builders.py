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
local copy (the manual dir) by `latent_mca.data.real`.
"""

from __future__ import annotations

import abc
import io
import os
from collections.abc import Iterable, Iterator

import PIL.Image
import tensorflow_datasets as tfds

from latent_mca.data import real
from latent_mca.data.image_processing import load_image

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
