"""Metric records of a stage: `workdir/<stage>/metrics.jsonl`, and plots of them.

One JSON object per line, one line per step that logged anything:
{"step": 100, "loss": 0.52, "eval/accuracy": 0.9}. The file mirrors the history in
the latest checkpoint plus the lines written since; `MetricsLog.reset` rewrites it
from a restored history, so a resumed stage never repeats a step.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import numbers
import os
import time
from concurrent import futures
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from latent_mca.training import tensorboard


def scalars(metrics: Mapping, prefix: str = "") -> dict:
  """`metrics` (device or host scalars) as JSON-ready Python numbers, names prefixed.

  Raises:
    ValueError: a metric that is not a scalar (named).
  """
  out = {}
  for name, value in jax.device_get(dict(metrics)).items():
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(f"metric {prefix}{name} must be a scalar, got shape {array.shape}")
    out[f"{prefix}{name}"] = array.item()
  return out


class MetricsLog:
  """Appends metric records to a JSON-lines file, one flushed line per record.

  Each record with an integer "step" is mirrored as TensorBoard scalars at that step in
  `tb/` beside the file (`latent_mca.training.tensorboard`: non-numeric values are left
  out there); a record without one goes to the JSON file only. The folder belongs to
  this log: `reset` replaces its event files.
  """

  def __init__(self, path: str):
    self.path = path
    self.tb_dir = os.path.join(os.path.dirname(path), "tb")
    self._events: str | None = None  # the event file appends go to; made by the first

  def reset(self, history: Sequence[Mapping]) -> None:
    """Makes the file hold exactly `history`, replacing it whole (no torn or repeated lines),
    and `tb/` one event file of exactly `history` (old event files removed)."""
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(record) + "\n" for record in history)
    os.replace(tmp, self.path)

    os.makedirs(self.tb_dir, exist_ok=True)
    old = [os.path.join(self.tb_dir, name) for name in os.listdir(self.tb_dir)
           if tensorboard.is_event_file(name) or name.endswith(".tmp")]
    now = time.time()
    # Written under a name TensorBoard ignores (no "tfevents"), then renamed into place.
    tmp = os.path.join(self.tb_dir, f".reset.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
      f.write(tensorboard.file_header(now))
      f.writelines(self._tb_record(record, now) for record in history)
    events = os.path.join(self.tb_dir, tensorboard.event_file_name(now))
    os.replace(tmp, events)
    for stale in old:
      if stale not in (tmp, events):
        try:
          os.remove(stale)
        except FileNotFoundError:
          pass
    self._events = events

  def append(self, record: Mapping) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    event = self._tb_record(record)
    if event:
      if self._events is None:  # no reset in this process: a new file beside any old ones
        os.makedirs(self.tb_dir, exist_ok=True)
        self._events = os.path.join(self.tb_dir, tensorboard.event_file_name())
        event = tensorboard.file_header() + event
      with open(self._events, "ab") as f:
        f.write(event)

  @staticmethod
  def _tb_record(record: Mapping, wall_time: float | None = None) -> bytes:
    """A record as a framed TensorBoard event; b"" without an integer step or a number."""
    step = record.get("step")
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
      return b""
    values = {k: v for k, v in record.items() if k != "step"}
    return tensorboard.encode_scalars(int(step), values, wall_time)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# The process that draws plots while the job goes on (`background_plots`), and its work.
_PLOTTER: futures.Executor | None = None
_PENDING: list[futures.Future] = []


@contextlib.contextmanager
def background_plots() -> Iterator[None]:
  """Within this context, `plot` calls draw their PNGs in a separate process (matplotlib is
  a sixth of a small job's main-thread time; a second core draws while the first traces
  and compiles). On exit every plot is finished, and the first one that failed raises.
  Nested uses share the outer one's process."""
  global _PLOTTER
  if _PLOTTER is not None:
    yield
    return
  # spawn, not fork: a fork of a process running JAX's threads may deadlock.
  _PLOTTER = futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
  try:
    yield
  finally:
    pending, plotter = list(_PENDING), _PLOTTER
    _PENDING.clear()
    _PLOTTER = None
    try:
      for future in pending:
        future.result()
    finally:
      plotter.shutdown()


def plot(draw: Callable, *args) -> None:
  """draw(*args) now, or in the plotting process inside `background_plots` (`draw` a
  module-level function, its arguments picklable)."""
  if _PLOTTER is None:
    draw(*args)
  else:
    _PENDING.append(_PLOTTER.submit(draw, *args))


def plot_metrics(metrics_jsonl: str, png_path: str,
                 panels: Sequence[str | Sequence[str]], columns: int = 4,
                 skip_missing: bool = False) -> None:
  """Plots metrics against step into a PNG file, one panel per entry of `panels`.

  An entry is a metric name, or a sequence of names drawn together in one panel with
  a legend (e.g. a loss and its baselines). Panels fill rows of `columns`.
  skip_missing=True leaves out metrics the file does not hold (and emptied panels),
  e.g. the terms an ablation switches off. The file is read now; inside
  `background_plots` the PNG is drawn in the background.

  Raises:
    ValueError: a metric that no record of the file holds (unless skip_missing).
  """
  records = read_metrics(metrics_jsonl)
  groups = [(p,) if isinstance(p, str) else tuple(p) for p in panels]
  if skip_missing:
    logged = set().union(*map(set, records))
    groups = [g for g in (tuple(k for k in g if k in logged) for g in groups) if g]
  missing = [k for g in groups for k in g if not any(k in r for r in records)]
  if missing:
    raise ValueError(f"{metrics_jsonl} has no metric {missing}")
  curves = [[(key, [(r["step"], r[key]) for r in records
                    if key in r and math.isfinite(r[key])]) for key in group]
            for group in groups]
  plot(_draw_curves, curves, png_path, columns)


def _draw_curves(panels: list[list[tuple[str, list]]], png_path: str, columns: int) -> None:
  """Draws `plot_metrics`'s panels: each a list of (name, [(step, value)])."""
  # matplotlib only for plotting: training does not need it installed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  cols = min(columns, len(panels))
  rows = -(-len(panels) // cols)
  width, height = 4.5 * cols, 3.3 * rows
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)  # an explicit Agg canvas: no pyplot, no global backend
  for i, panel in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    names = [key for key, _ in panel]
    for key, points in panel:
      steps, values = zip(*points) if points else ((), ())
      ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
    ax.set_title(names[0] if len(names) == 1 else _common_prefix(names))
    if len(names) > 1:
      ax.legend(fontsize="small")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  # Fixed margins (inches) rather than tight_layout, which measures every tick label and
  # took a third of the plotting time.
  fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height,
                      top=1 - 0.35 / height, wspace=0.35, hspace=0.55)
  fig.savefig(png_path, format="png")


def _common_prefix(names: Sequence[str]) -> str:
  prefix = os.path.commonprefix(list(names)).rstrip("_/")
  return prefix or ", ".join(names)
