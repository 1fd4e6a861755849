"""`train`: the loop every training stage runs, resumable to the bit.

The stage supplies a pure `train_step(state, batch, rng) -> (state, metrics)`; the
loop jits it once with the state donated, feeds it batches, logs, evaluates,
checkpoints, and when started again with the same arguments continues from the
latest checkpoint. Under `workdir/<stage>/`:

  checkpoints/<step>/   see `latent_mca.training.checkpoint`.
  metrics.jsonl         one line per logged step, see `latent_mca.training.metrics`.

Given a `latent_mca.parallel.mesh.Layout`, the step is jitted with the state's
shardings in and out (still donated), each batch is placed on the mesh and the step
runs with the mesh and logical-axis rules in context, so the activations' logical
constraints shard them too. Without one, the step is jitted as it is.

Step s (1-based) is the s-th update: it consumes the loader's s-th batch and the key
`fold_in(state.rng, s)`, and leaves `state` after s updates. Nothing else varies
between runs, so a stage killed and resumed ends with the same bits as one that ran
through (given a deterministic train_step and loader).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Optional, Protocol

import jax
from absl import logging
from tqdm import tqdm

from latent_mca.parallel.mesh import Layout
from latent_mca.training.checkpoint import Checkpointer
from latent_mca.training.metrics import MetricsLog, scalars


class ResumableLoader(Protocol):
  """What `train` needs of a loader (e.g. `latent_mca.data.batching.DataLoader`)."""

  def __next__(self) -> Any: ...

  def state(self) -> dict: ...

  def restore(self, state: dict) -> None: ...


def final_metrics(history: list[dict]) -> dict:
  """The last logged value of every metric in `history` (with "step": the last step logged)."""
  out = {}
  for record in history:
    out.update(record)
  return out


def _with_rng(train_step: Callable) -> Callable:
  def step_fn(state, batch, step):
    return train_step(state, batch, jax.random.fold_in(state.rng, step))
  return step_fn


def jit_step(train_step: Callable, layout: Optional[Layout] = None) -> Callable:
  """`train_step` as `train` runs it: (state, batch, step) -> (state, metrics), the state
  donated, the key `fold_in(state.rng, step)`.

  With a layout the state keeps `layout.state`'s shardings in and out, the metrics come
  back replicated, and the batch keeps the shardings it was placed with
  (`layout.put_batch`); call it inside `layout.context()`.

  The same `train_step` object on an equal layout gets the same jitted function back, so
  stages that run one step function (e.g. an ablation's and the full run's, see
  `latent_mca.stages.latent`) trace and compile it once per process.
  """
  key = (train_step, None, (), None, None)
  if layout is not None:
    # The rules too: the logical constraints they turn into are fixed at trace time.
    key = (train_step, jax.tree.structure(layout.state), tuple(jax.tree.leaves(layout.state)),
           layout.replicated, tuple(map(tuple, layout.rules)))
  try:
    hash(key)
  except TypeError:  # e.g. an optimizer holding unhashable settings: jit without sharing
    return _jit.__wrapped__(*key)
  return _jit(*key)


@functools.lru_cache(maxsize=32)
def _jit(train_step: Callable, state_treedef, state_shardings: tuple, replicated,
         rules) -> Callable:
  del rules  # part of the cache key only
  if state_treedef is None:
    return jax.jit(_with_rng(train_step), donate_argnums=0)
  state = jax.tree.unflatten(state_treedef, state_shardings)
  return jax.jit(_with_rng(train_step), donate_argnums=0, in_shardings=(state, None, replicated),
                 out_shardings=(state, replicated))


def _on_mesh(jitted: Callable, layout: Layout) -> Callable:
  """The jitted step fed host batches: placed on the mesh, run in the layout's context."""

  def step_fn(state, batch, step):
    with layout.context():
      return jitted(state, layout.put_batch(batch), step)

  return step_fn


def train(stage_name: str,
          workdir: str,
          init_state,
          train_step: Callable,
          loader: ResumableLoader,
          num_steps: int,
          *,
          eval_fn: Optional[Callable[[Any], dict]] = None,
          eval_every: int = 0,
          checkpoint_every: int = 1000,
          log_every: int = 50,
          keep_checkpoints: int = 3,
          layout: Optional[Layout] = None) -> tuple[Any, list[dict]]:
  """Trains a stage to `num_steps` updates, resuming from its latest checkpoint if any.

  Args:
    stage_name: names the stage's folder workdir/<stage_name>.
    workdir: the run's folder.
    init_state: the `TrainState` at step 0; also the restore target (its shardings,
      dtypes and optimizer) when resuming. Donated to the first step: do not use it
      after the call.
    train_step: pure `(state, batch, rng) -> (state, metrics)`, metrics a dict of
      scalars; it should apply one update (`state.apply_gradients`).
    loader: yields batches (`next(loader)`) and has `state()` / `restore(state)`;
      positioned at its start. A resumed run restores its position.
    num_steps: the stage's total number of updates. A run that finds a checkpoint at
      num_steps returns it without training; a larger num_steps continues training.
    eval_fn: `state -> dict` of scalars, run on the host every `eval_every` steps and
      after the last one; logged with an "eval/" prefix.
    eval_every: 0 evaluates after the last step only.
    checkpoint_every: checkpoint every this many steps, and after the last one.
    log_every: log the step's train metrics every this many steps, and the last one.
    keep_checkpoints: how many of the newest checkpoints to keep.
    layout: where the step runs (`latent_mca.parallel.mesh.Layout`); init_state must
      have its shardings (`layout.init_state`), and a resumed state is restored into
      them. None runs the step where its inputs are (one device).

  Returns:
    (the state after num_steps updates, the metric records of every logged step,
    each {"step": s, **metrics}: what metrics.jsonl holds).

  Raises:
    ValueError: a non-positive interval (or a negative eval_every), a loader that runs out
      of batches before num_steps, or several processes without a layout.
  """
  for name, value in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {value}")
  if eval_every < 0:
    raise ValueError(f"eval_every must be >= 0, got {eval_every}")
  if layout is None and jax.process_count() > 1:
    # Each process would train on its own rows alone, and the runs would drift apart.
    raise ValueError(f"{stage_name}: {jax.process_count()} processes need a layout "
                     "(`latent_mca.parallel.mesh.Layout`) to make one global batch")
  stage_dir = os.path.join(workdir, stage_name)
  is_main = jax.process_index() == 0
  log = MetricsLog(os.path.join(stage_dir, "metrics.jsonl"))
  step_fn = jit_step(train_step, layout)
  if layout is not None:
    step_fn = _on_mesh(step_fn, layout)
  with Checkpointer(stage_dir, keep=keep_checkpoints) as checkpointer:
    if checkpointer.latest_step() is None:
      state, start, history = init_state, 0, []
    else:
      restored = checkpointer.restore(init_state)
      state, start, history = restored.state, restored.step, restored.history
      loader.restore(restored.loader_state)
      logging.info("%s: resuming from %s at step %d", stage_name, checkpointer.directory, start)
    if is_main:
      # Drop what a killed run logged after its last checkpoint: those steps run again.
      log.reset(history)

    began = time.time()
    with tqdm(total=num_steps, initial=start, desc=stage_name, disable=not is_main) as bar:
      for step in range(start + 1, num_steps + 1):
        try:
          batch = next(loader)
        except StopIteration:
          raise ValueError(f"{stage_name}: the loader ran out of batches after {step - 1} "
                           f"of {num_steps} steps") from None
        state, metrics = step_fn(state, batch, step)
        last = step == num_steps
        record = {}
        if step % log_every == 0 or last:
          record.update(scalars(metrics))
        if eval_fn is not None and (last or (eval_every and step % eval_every == 0)):
          record.update(scalars(eval_fn(state), prefix="eval/"))
        if record:
          record = {"step": step, **record}
          history.append(record)
          if is_main:
            log.append(record)
          bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"},
                          refresh=False)
        if step % checkpoint_every == 0 or last:
          # A copy: the save finishes in the background while later steps append.
          checkpointer.save(step, state, loader_state=loader.state(), history=list(history),
                            num_steps=num_steps)
        bar.update(1)

  summary = final_metrics(history)
  logging.info("%s: %d steps (%d this run, %.1f s); final %s", stage_name, num_steps,
               max(num_steps - start, 0), time.time() - began, summary)
  return state, history
