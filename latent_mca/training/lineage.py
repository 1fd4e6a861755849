"""What a stage's outputs were made from, so that a workdir never reports stale results.

A stage that starts from another's final checkpoint (SFT from the reading stage, the
latent model from SFT, an evaluation or a PPO run from either) records the ids of those
checkpoints (`checkpoint.final_id`) as its sources: in the result it writes, or in
`made_from.json` in its folder, written before it trains. When it runs again and a source
has been trained again since (more steps, or from scratch), what it made is moved aside,
never deleted (`move_aside`: `<name>.stale<k>`), and made again from the new source.

Outputs written before sources were recorded carry none and are kept as they are. With
several processes, process 0 alone moves and writes, and the others wait for it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Mapping, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils

MADE_FROM = "made_from.json"
Sources = Mapping[str, Optional[str]]


def changed(recorded: Optional[Mapping], sources: Sources) -> list[str]:
  """The names of `sources` whose id differs from the one `recorded` holds for it.

  A source with no id now (its checkpoint gone) or none recorded compares equal: nothing
  tells the output is stale. `recorded` None (an output from before sources were
  recorded) has no changed source."""
  if recorded is None:
    return []
  return [name for name, now in sources.items()
          if now is not None and recorded.get(name) not in (None, now)]


def move_aside(path: str) -> str:
  """Renames the file or folder `path` to the first free `<root>.stale<k><ext>` (k = 1, 2,
  ...; a folder's ext is empty) and returns that path."""
  root, ext = (path, "") if os.path.isdir(path) else os.path.splitext(path)
  k = 1
  while os.path.exists(f"{root}.stale{k}{ext}"):
    k += 1
  os.replace(path, f"{root}.stale{k}{ext}")
  return f"{root}.stale{k}{ext}"


def _moved(paths: Sequence[str], names: list[str]) -> None:
  for path in paths:
    if os.path.exists(path):
      logging.warning("%s was made from an earlier %s checkpoint (trained again since): "
                      "moved to %s; it is made again", path, " and ".join(names),
                      move_aside(path))


def _main_process_then_all(fn):
  """`fn` run by process 0 alone, every process returning once it is done."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    if jax.process_index() == 0:
      fn(*args, **kwargs)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lineage.{fn.__name__}")
  return wrapped


@_main_process_then_all
def check_result(path: str, sources: Sources) -> None:
  """Moves the JSON result at `path` aside if its "made_from" names other ids than
  `sources` (`changed`); the caller then makes it again."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    names = changed(json.load(f).get("made_from"), sources)
  if names:
    _moved([path], names)


@_main_process_then_all
def check_folders(folders: Sequence[str], sources: Sources) -> None:
  """Readies the folders of stages made from `sources`, in order, each later one made
  from the one before (the latent model's IDM, then its BC), the first one's
  `made_from.json` speaking for them all: folders made from other ids are moved aside,
  and so are later folders left without their first; the first folder is made, recording
  `sources`, once every source has an id (else the stage cannot start: nothing is
  written). A first folder without the file (made before sources were recorded) is kept
  as it is, and so are the later ones."""
  record = os.path.join(folders[0], MADE_FROM)
  recorded = None
  if os.path.isfile(record):
    with open(record) as f:
      recorded = json.load(f)
    names = changed(recorded, sources)
    if names:
      _moved(folders, names)
      recorded = None
  elif os.path.isdir(folders[0]):
    return
  else:
    for path in folders[1:]:
      if os.path.exists(path):
        logging.warning("%s was made from a %s that is gone: moved to %s; it is made again",
                        path, os.path.basename(folders[0]), move_aside(path))
  if recorded == dict(sources) or any(now is None for now in sources.values()):
    return
  os.makedirs(folders[0], exist_ok=True)
  with open(record + ".tmp", "w") as f:
    json.dump(dict(sources), f, indent=1)
  os.replace(record + ".tmp", record)
