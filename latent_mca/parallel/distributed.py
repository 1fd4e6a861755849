"""Multi-host runs: starting JAX's distributed runtime, and each process's share of a batch.

A multi-host job runs the same program once per host (or per process), and every
process calls `initialize` before anything else touches JAX. Where the settings come
from, first found wins:

  1. the `distributed` config block (`distributed_config()`), e.g.
     `--config.distributed.coordinator_address=10.0.0.1:1234`;
  2. the environment: LATENT_MCA_COORDINATOR (host:port of process 0),
     LATENT_MCA_NUM_PROCESSES, LATENT_MCA_PROCESS_ID and, optionally,
     LATENT_MCA_LOCAL_DEVICE_IDS ("0,1,2,3");
  3. with mode="cluster", JAX's own detection (Cloud TPU pods, SLURM, Open MPI).

With none of them (mode="auto") the run is a single process and `initialize` does
nothing, so single-host jobs need no setting at all.

Data: every process reads its own contiguous rows of each global batch,
`process_batch_slice(global_batch_size)` (a `DataLoader` built with `**process_shard()`
serves exactly those), and `global_batch` assembles the processes' rows into global
`jax.Array`s for a jitted step. Checkpoints need nothing extra: every process calls
`Checkpointer.save` / `restore` (orbax writes each array shard once, from the process
that holds it, and the JSON items from process 0 only), and a checkpoint written by N
processes restores in any other number.

Example, two processes on one machine (the test `tests/test_multihost.py` does this):

  LATENT_MCA_COORDINATOR=127.0.0.1:1234 LATENT_MCA_NUM_PROCESSES=2 \
      LATENT_MCA_PROCESS_ID=0 python -m experiments.run ... &
  LATENT_MCA_COORDINATOR=127.0.0.1:1234 LATENT_MCA_NUM_PROCESSES=2 \
      LATENT_MCA_PROCESS_ID=1 python -m experiments.run ...
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
# The runtime's own record of this process's id and count (also when JAX detected them):
# no public API reads them without starting the backends.
from jax._src.distributed import global_state as _runtime

from latent_mca.data.batching import process_rows

ENV_COORDINATOR = "LATENT_MCA_COORDINATOR"
ENV_NUM_PROCESSES = "LATENT_MCA_NUM_PROCESSES"
ENV_PROCESS_ID = "LATENT_MCA_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LATENT_MCA_LOCAL_DEVICE_IDS"

AUTO, CLUSTER, OFF = "auto", "cluster", "off"
_MODES = (AUTO, CLUSTER, OFF)


def distributed_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of `initialize`'s config; embed it as `c.distributed`."""
  return ml_collections.ConfigDict(dict(
      # "auto": multi-process when the fields below or the LATENT_MCA_* variables say so,
      # else a single process; "cluster": always, with what is not given detected by JAX
      # (TPU pods, SLURM, Open MPI); "off": a single process whatever the environment says.
      mode=AUTO,
      coordinator_address="",  # host:port of process 0; "" = $LATENT_MCA_COORDINATOR
      num_processes=-1,  # -1 = $LATENT_MCA_NUM_PROCESSES
      process_id=-1,  # this process's index, 0 .. num_processes - 1; -1 = $LATENT_MCA_PROCESS_ID
      local_device_ids=(),  # the local devices this process uses; () = all (or the variable)
      initialization_timeout=300,  # seconds to wait for every process to connect
  ))


@dataclasses.dataclass(frozen=True)
class Settings:
  """The arguments for `jax.distributed.initialize`; None leaves a field to JAX's detection."""

  coordinator_address: Optional[str]
  num_processes: Optional[int]
  process_id: Optional[int]
  local_device_ids: Optional[tuple[int, ...]]
  initialization_timeout: int


def _setting(config: Mapping[str, Any], field: str, variable: str, environ: Mapping[str, str],
             unset: Any, parse) -> tuple[Any, str]:
  """(value, where it came from) of one field: the config's, else the variable's, else None."""
  value = config.get(field, unset)
  if isinstance(value, list):
    value = tuple(value)
  if value != unset:
    return value, f"distributed.{field}"
  text = environ.get(variable, "").strip()
  if not text:
    return None, f"distributed.{field}"
  where = f"${variable}={text!r} (distributed.{field} unset)"
  try:
    return parse(text), where
  except ValueError:
    raise ValueError(f"{where}: not a valid value") from None


def _device_ids(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split(","))


def resolve(config: Optional[Mapping[str, Any]] = None,
            environ: Optional[Mapping[str, str]] = None) -> Optional[Settings]:
  """What `initialize` would do: the settings to start the runtime with, or None for one process.

  Pure: reads `config` and `environ` only.

  Args:
    config: fields of `distributed_config()` (missing ones take its defaults); None is
      all defaults.
    environ: the environment variables (default os.environ).

  Returns:
    None for a single process (mode "off"; mode "auto" with nothing set; one process
    in all), else the Settings for `jax.distributed.initialize`.

  Raises:
    ValueError: a bad or inconsistent setting, named with where it came from.
  """
  config = {**distributed_config().to_dict(), **(dict(config) if config else {})}
  environ = os.environ if environ is None else environ
  unknown = sorted(set(config) - set(distributed_config()))
  if unknown:
    raise ValueError(f"distributed config has unknown fields {unknown}; it takes "
                     f"{sorted(distributed_config())}")
  mode = config["mode"]
  if mode not in _MODES:
    raise ValueError(f"distributed.mode must be one of {_MODES}, got {mode!r}")
  if mode == OFF:
    return None
  address, address_from = _setting(config, "coordinator_address", ENV_COORDINATOR, environ,
                                   "", str)
  count, count_from = _setting(config, "num_processes", ENV_NUM_PROCESSES, environ, -1, int)
  index, index_from = _setting(config, "process_id", ENV_PROCESS_ID, environ, -1, int)
  devices, devices_from = _setting(config, "local_device_ids", ENV_LOCAL_DEVICE_IDS, environ,
                                   (), _device_ids)

  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"{address_from} must be host:port, got {address!r}")
  if count is not None and count < 1:
    raise ValueError(f"{count_from} must be at least 1, got {count}")
  if index is not None and (index < 0 or (count is not None and index >= count)):
    raise ValueError(f"{index_from} must be in [0, num_processes={count}), got {index}")
  if devices is not None:
    devices = tuple(devices)
    if not devices or any(not isinstance(d, int) or d < 0 for d in devices):
      raise ValueError(f"{devices_from} must be non-negative device ids, got {devices!r}")
  if config["initialization_timeout"] <= 0:
    raise ValueError(f"distributed.initialization_timeout must be positive, got "
                     f"{config['initialization_timeout']}")

  if mode == AUTO:
    given = {"coordinator_address": address, "num_processes": count, "process_id": index}
    if all(value is None for value in given.values()) or count == 1:
      return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
      variables = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
                   "process_id": ENV_PROCESS_ID}
      raise ValueError(
          "a multi-process run needs coordinator_address, num_processes and process_id; "
          + ", ".join(f"distributed.{name} (or ${variables[name]})" for name in missing)
          + " not given. Set mode='cluster' to let JAX detect them (TPU pods, SLURM, "
          "Open MPI)")
  return Settings(coordinator_address=address, num_processes=count, process_id=index,
                  local_device_ids=devices,
                  initialization_timeout=int(config["initialization_timeout"]))


def initialize(config: Optional[Mapping[str, Any]] = None) -> None:
  """Starts JAX's distributed runtime as `config` and the environment say (see the module doc).

  Call it first, before any JAX computation. A no-op for a single process, and when
  this process already started the runtime with the same settings.

  Args:
    config: fields of `distributed_config()`; None is all defaults (the environment
      decides).

  Raises:
    ValueError: a bad setting (see `resolve`).
    RuntimeError: the runtime is already running with other settings.
  """
  settings = resolve(config)
  if settings is None:
    return
  if jax.distributed.is_initialized():
    running = (_runtime.process_id, _runtime.num_processes)
    wanted = (settings.process_id, settings.num_processes)
    if any(w is not None and w != r for w, r in zip(wanted, running)):
      raise RuntimeError(f"the distributed runtime already runs as process {running[0]} of "
                         f"{running[1]}, not {wanted[0]} of {wanted[1]}")
    return
  jax.distributed.initialize(
      coordinator_address=settings.coordinator_address,
      num_processes=settings.num_processes, process_id=settings.process_id,
      local_device_ids=(None if settings.local_device_ids is None
                        else list(settings.local_device_ids)),
      initialization_timeout=settings.initialization_timeout)
  # Not jax.process_index(): it would start the backends (see is_main_process).
  logging.info("Distributed runtime started: %s", settings)


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes a run's files (True for one process).

  Unlike `jax.process_index() == 0` it does not start JAX's backends, so a job can still
  set XLA_FLAGS afterwards (`latent_mca.compilation_cache.fast_compile`).
  """
  return not jax.distributed.is_initialized() or _runtime.process_id == 0


def process_shard() -> dict[str, int]:
  """This process's place among the processes: `DataLoader(..., **process_shard())`."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def process_batch_slice(global_batch_size: int) -> slice:
  """The rows of every global batch of `global_batch_size` that this process reads.

  Process p of P holds rows [p * b / P, (p + 1) * b / P): what a `DataLoader` with
  `**process_shard()` serves, and what `global_batch` expects.

  Raises:
    ValueError: a batch size the processes cannot share equally.
  """
  return process_rows(global_batch_size, jax.process_index(), jax.process_count())


def _check_process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...],
                        name: str) -> None:
  """Raises ValueError unless this process's devices hold exactly its `process_batch_slice`."""
  wanted = process_batch_slice(global_shape[0])
  rows = set()
  for device, index in sharding.devices_indices_map(global_shape).items():
    if device.process_index == jax.process_index():
      rows.update(range(*index[0].indices(global_shape[0])))
  if rows != set(range(wanted.start, wanted.stop)):
    held = sorted(rows)
    shown = held if len(held) <= 16 else f"{held[:8]} ... ({len(held)} rows)"
    raise ValueError(
        f"batch leaf {name}: under {sharding} the devices of process {jax.process_index()} "
        f"hold rows {shown} of {global_shape[0]}, but it reads rows "
        f"[{wanted.start}, {wanted.stop}): split the batch axis over the mesh axes that "
        "split the processes, outermost first (as a mesh of jax.devices() in order does)")


def global_batch(local_batch, sharding):
  """Global `jax.Array`s from each process's rows of a batch, for a jitted step.

  Every process calls it with its own rows (`process_batch_slice`) of the same global
  batch; the result is the global batch, laid out by `sharding` over all devices.
  With one process it is `jax.device_put(local_batch, sharding)`.

  Args:
    local_batch: a pytree of host arrays. A leaf whose sharding splits its first axis
      holds this process's rows, [b / P, ...]; a leaf with a fully replicated sharding
      is the same whole value in every process. None leaves (e.g. a text-only batch's
      pixel_values) stay None.
    sharding: one `jax.sharding.Sharding` for every leaf, or a pytree of them shaped
      like `local_batch`; a split leaf's must put exactly this process's rows on its
      devices.

  Returns:
    The pytree of global arrays, [b, ...] for the split leaves.

  Raises:
    ValueError: a sharding under which this process's devices hold other rows than
      it read (the batch would be silently reordered), or image inputs
      (pixel_values / image_grid_thw) with several processes: their rows are the
      concatenation of every example's images, which `collate` pads with dummy images
      per process, so concatenating the processes' arrays would hand process 0's
      dummy images to process 1's image tokens.
  """
  count = jax.process_count()
  if count > 1 and isinstance(local_batch, Mapping):
    images = [key for key in ("pixel_values", "image_grid_thw")
              if local_batch.get(key) is not None]
    if images:
      raise ValueError(f"global_batch cannot join the image inputs {images} of {count} "
                       "processes: each process's images end in its own dummy images; "
                       "run multi-process training on text batches")
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, local_batch)

  def one(path, x, leaf_sharding):
    x = np.asarray(x)
    if leaf_sharding.is_fully_replicated:
      return jax.make_array_from_process_local_data(leaf_sharding, x, x.shape)
    global_shape = (x.shape[0] * count,) + x.shape[1:]
    _check_process_rows(leaf_sharding, global_shape, jax.tree_util.keystr(path))
    return jax.make_array_from_process_local_data(leaf_sharding, x, global_shape)

  return jax.tree_util.tree_map_with_path(one, local_batch, sharding)
