"""Checkpoints of a training stage: the state, the data position and the metrics so far.

A stage writes to `workdir/<stage>/checkpoints/<step>/`, one orbax step folder per
checkpoint, with three items:

  state/    the `TrainState` (orbax StandardSave: every array, sharded as it was).
  loader/   the data loader's `state()` (JSON): where the next batch comes from.
  history/  JSON {"num_steps": N, "metrics": [...]}: the stage's length and the
            metric records logged up to this step (what `metrics.jsonl` held).

Together they are everything a resumed run needs to continue bit-identically. Orbax
writes each step to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest; the leftovers are removed
when the stage next opens its checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

_STATE, _LOADER, _HISTORY = "state", "loader", "history"


class CheckpointNotFoundError(FileNotFoundError):
  """A checkpoint that something needs is not there; names its folder and writing stage."""

  def __init__(self, directory: str, stage: str, detail: str = "it holds no checkpoint"):
    super().__init__(f"{directory}: {detail}. Checkpoints there are written by stage "
                     f"'{stage}'; run that stage (to the end) first, e.g. with "
                     f"--config.stages={stage}")
    self.directory, self.stage = directory, stage


@dataclasses.dataclass(frozen=True)
class Restored:
  """Where a stage starts: after `step` updates, with `state`.

  loader_state is None (start the loader from its beginning) and history is [] when
  nothing was restored.
  """

  state: Any
  step: int
  loader_state: Optional[dict]
  history: list


def stage_name(stage_dir: str) -> str:
  """The stage a stage folder belongs to: its last path component."""
  return os.path.basename(os.path.normpath(stage_dir))


def checkpoint_dir(stage_dir: str) -> str:
  """Where the checkpoints of the stage in `stage_dir` (workdir/<stage>) live: an absolute
  path (orbax refuses relative ones, and workdirs are often given relative)."""
  return os.path.abspath(os.path.join(stage_dir, "checkpoints"))


class Checkpointer:
  """Saves and restores the checkpoints of one stage; use as a context manager.

  Saves are asynchronous: `save` returns once the arrays are copied off the device,
  and `close` (or leaving the `with` block) waits for the writes to finish.
  """

  def __init__(self, stage_dir: str, *, keep: int = 3):
    """Opens (creating if needed) workdir/<stage>/checkpoints, keeping the last `keep` steps."""
    self.stage = stage_name(stage_dir)
    self.directory = checkpoint_dir(stage_dir)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _LOADER: ocp.JsonCheckpointHandler(),
                       _HISTORY: ocp.JsonCheckpointHandler()})

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def latest_step(self) -> Optional[int]:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state, *, loader_state: dict, history: list, num_steps: int) -> None:
    """Checkpoints the state after `step` updates of a stage of `num_steps`.

    Args:
      step: the number of updates `state` has had (the folder's name).
      state: the TrainState (any pytree of arrays).
      loader_state: the loader's `state()`, positioned at the batch of update step + 1.
      history: the metric records (JSON-serialisable dicts) logged so far.
      num_steps: the stage's length; `step == num_steps` marks the final checkpoint.
    """
    self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _LOADER: ocp.args.JsonSave(loader_state),
        _HISTORY: ocp.args.JsonSave({"num_steps": num_steps, "metrics": history}),
    }))

  def restore(self, target, step: Optional[int] = None) -> Restored:
    """The checkpoint of `step` (default: the latest), with the state shaped like `target`.

    Args:
      target: a TrainState to restore into: real arrays or jax.ShapeDtypeStructs
        (e.g. `jax.eval_shape(init_fn)`); their shardings and dtypes are used, and
        static fields (the optimizer) come from it.
      step: which checkpoint.

    Raises:
      CheckpointNotFoundError: there is no checkpoint (of that step).
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      detail = "it holds no checkpoint" if step is None else f"it holds no checkpoint {step}"
      raise CheckpointNotFoundError(self.directory, self.stage, detail)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target),
        _LOADER: ocp.args.JsonRestore(),
        _HISTORY: ocp.args.JsonRestore(),
    }))
    return Restored(state=restored[_STATE], step=step, loader_state=restored[_LOADER],
                    history=list(restored[_HISTORY]["metrics"]))

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_or_init(stage_dir: str, init_fn: Callable[[], Any]) -> Restored:
  """The latest checkpoint of the stage in `stage_dir`, or `init_fn()` at step 0.

  For loops other than `train` (which resumes by itself). `init_fn` runs only when
  there is no checkpoint; otherwise `jax.eval_shape(init_fn)` is the restore target,
  so jit it with out_shardings to restore sharded.
  """
  with Checkpointer(stage_dir) as checkpointer:
    if checkpointer.latest_step() is None:
      return Restored(state=init_fn(), step=0, loader_state=None, history=[])
    return checkpointer.restore(jax.eval_shape(init_fn))


def load_params(stage_dir: str, abstract_params=None):
  """The params of the final checkpoint of another stage (workdir/<stage>), nothing else.

  Args:
    stage_dir: the folder of the stage that wrote them.
    abstract_params: a tree of jax.ShapeDtypeStructs (with shardings) to restore
      into; None restores every array with the sharding it was saved with (same
      device topology only).

  Raises:
    CheckpointNotFoundError: the stage has no checkpoint, or its latest one is not
      its last step (the stage did not finish).
  """
  return load_final(stage_dir, {"params": abstract_params})["params"]


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of another stage's checkpoints. PyTreeCheckpointHandler (the
  format under StandardCheckpointHandler) restores a subtree of the state."""
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                     _LOADER: ocp.JsonCheckpointHandler(),
                     _HISTORY: ocp.JsonCheckpointHandler()})


def _num_steps(manager: ocp.CheckpointManager, step: int) -> int:
  """The length of the stage whose checkpoint `step` is (its final one is num_steps)."""
  return manager.restore(step, args=ocp.args.Composite(
      **{_HISTORY: ocp.args.JsonRestore()}))[_HISTORY]["num_steps"]


def final_id(stage_dir: str) -> Optional[str]:
  """An id of the final checkpoint of the stage in `stage_dir`: "<stage>/<step>@<the
  time orbax committed it, in ns>", or None where the stage has no checkpoint or did not
  finish. What is made from a checkpoint records its id (`training.lineage`): training the
  stage again (more steps, or from scratch) gives a new id; copying the workdir keeps it."""
  directory = checkpoint_dir(stage_dir)
  if not os.path.isdir(directory):
    return None
  with _reader(directory) as manager:
    step = manager.latest_step()
    if step is None or _num_steps(manager, step) != step:
      return None
    committed = manager.metadata(step).commit_timestamp_nsecs
  return f"{stage_name(stage_dir)}/{step}@{committed}"


def load_final(stage_dir: str, fields: dict) -> dict:
  """Fields of the TrainState in the final checkpoint of another stage (workdir/<stage>).

  Args:
    stage_dir: the folder of the stage that wrote them.
    fields: {field name ("params", "extra", ...): restore target}, each target a
      tree of jax.ShapeDtypeStructs, or None for the tree as saved (same device
      topology only). An empty tree is returned as is.

  Raises:
    CheckpointNotFoundError: the stage has no checkpoint, or its latest one is not
      its last step (the stage did not finish).
  """
  stage, directory = stage_name(stage_dir), checkpoint_dir(stage_dir)
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(directory, stage, "the folder does not exist")
  with _reader(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise CheckpointNotFoundError(directory, stage)
    num_steps = _num_steps(manager, step)
    if step != num_steps:
      raise CheckpointNotFoundError(
          directory, stage, f"its latest checkpoint is step {step} of {num_steps}, not final")
    empty = {name: tree for name, tree in fields.items()
             if tree is not None and not jax.tree_util.tree_leaves(tree)}
    item = {}
    for name, tree in fields.items():
      if name not in empty:
        item[name] = manager.item_metadata(step)[_STATE].tree[name] if tree is None else tree
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)}))
  return {**empty, **{name: restored[_STATE][name] for name in item}}
