"""The device mesh of a run, and the layout of a stage's train step on it.

A run's parallelism is config: `mesh_config()` sizes the mesh axes "data" (pure data
parallel), "fsdp" (data parallel with sharded weights and optimizer state) and
"tensor" (Megatron-style), and may override entries of the logical-axis rules
(`latent_mca.parallel.sharding.DEFAULT_RULES`). The model code only names logical axes.
From a mesh, the rules and a stage's boxed abstract parameters, `Layout.build` derives
where every array of the TrainState lives (the optimizer's moments inherit their
parameter's boxes, so they shard alike), how a batch is split, and the context in which
the activations' logical constraints take effect:

    make_state = lambda params: TrainState.create(params, tx, rng)
    layout = Layout.from_config(config.mesh, make_state, boxed_params)
    state = layout.init_state(make_state, params)   # sharded at birth
    training.train(..., state, step, loader, num_steps, layout=layout)

`train` then jits the step with the state's shardings in and out (donated), places each
batch with `Layout.put_batch` and traces the step inside `Layout.context()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from latent_mca.config_schema import ConfigError
from latent_mca.parallel import distributed, sharding

MESH_AXES = ("data", "fsdp", "tensor")

# Batch fields without a leading batch dimension: the images of the whole batch, packed
# ([patches, C*T*P*P] and [images, 3]). They are replicated; every other field is split
# over the "batch" logical axis along its first dimension.
PACKED_FIELDS = ("pixel_values", "image_grid_thw")


def mesh_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of `config.mesh`: every device on "data" (plain data parallel).

  data, fsdp, tensor: the mesh axes' sizes; one of them may be -1, the devices the others
    leave. Their product must be the number of devices.
  rules: overrides of `sharding.DEFAULT_RULES`, ((logical axis, mesh axes or None), ...),
    each replacing the default rule of its logical axis, e.g. (("vocab", None),) to
    replicate the vocabulary.
  """
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=()))


def axis_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{axis: size} of `config` on `num_devices` devices, the -1 axis resolved.

  Raises:
    ConfigError: naming the field: a size that is neither positive nor -1, two -1 axes,
      or sizes whose product is not the number of devices.
  """
  sizes = {axis: config[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh.{axis}={size!r}: a mesh axis size is a positive int, or -1 "
                        "for the devices the other axes leave")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh.{free[0]}=-1: the other axes ({fixed} devices) do not "
                        f"divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    shown = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    raise ConfigError(f"config.mesh: {shown} is {fixed} devices, but there are {num_devices}")
  return sizes


def make_mesh(config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh of `config` over `devices` (default: all of them).

  The axes are Auto (GSPMD propagates shardings from the inputs and the constraints), and
  the devices are ordered by `jax.make_mesh` so that "tensor", the innermost axis,
  falls on the most closely connected devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = axis_sizes(config, len(devices))
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules(config: ml_collections.ConfigDict) -> sharding.Rules:
  """`sharding.DEFAULT_RULES` with `config.rules` replacing the rules of their logical axes.

  Raises:
    ConfigError: an override of an unknown logical axis or onto an unknown mesh axis.
  """
  overrides = {}
  for rule in config.rules:
    name, axes = tuple(rule)
    if name not in sharding.logical_axis_names():
      raise ConfigError(f"config.mesh.rules: unknown logical axis {name!r}; known: "
                        f"{sorted(sharding.logical_axis_names())}")
    axes = tuple(axes) if isinstance(axes, list) else axes
    unknown = set((axes,) if isinstance(axes, str) else axes or ()) - set(MESH_AXES)
    if unknown:
      raise ConfigError(f"config.mesh.rules: {name!r} maps to unknown mesh axes "
                        f"{sorted(unknown)}; the mesh has {MESH_AXES}")
    overrides[name] = axes
  return tuple((name, overrides.get(name, axes)) for name, axes in sharding.DEFAULT_RULES)


def batch_axes(rules: sharding.Rules = sharding.DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a batch's rows are split over (those of the "batch" logical axis, in
  order, major to minor): ("data", "fsdp") by default, () when the rules replicate it."""
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_parallelism(mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES) -> int:
  """How many ways a batch is split: the product of the mesh axes of the "batch" axis."""
  return math.prod(mesh.shape[name] for name in batch_axes(rules))


def check_batch_size(batch_size: int, mesh: Mesh, rules: sharding.Rules, field: str) -> None:
  """Raises ConfigError naming `field` when the mesh cannot split `batch_size` evenly."""
  ways = batch_parallelism(mesh, rules)
  if batch_size % ways:
    raise ConfigError(f"{field}={batch_size} must be a multiple of the {ways} ways the mesh "
                      f"{dict(mesh.shape)} splits a batch (config.mesh)")


def state_shardings(make_state: Callable[[Any], Any], boxed_params, mesh: Mesh,
                    rules: sharding.Rules = sharding.DEFAULT_RULES):
  """NamedShardings of `make_state(params)`: parameters and optimizer state as their boxes say.

  `make_state` runs abstractly (jax.eval_shape) on the boxed (nn.Partitioned) parameters,
  so the optimizer's per-parameter state (Adam's mu and nu) keeps each parameter's
  logical names; everything unboxed (step, counts, rng, extra) is replicated.
  """
  return sharding.boxed_shardings(jax.eval_shape(make_state, boxed_params), mesh, rules)


def _is_packed(path) -> bool:
  last = path[-1] if path else None
  return getattr(last, "key", None) in PACKED_FIELDS


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a stage's train step runs: the mesh, the rules and the TrainState's shardings.

  Attributes:
    mesh: the device mesh.
    rules: the logical-axis rules (for the weights, the batch and the activations).
    state: NamedShardings of the TrainState (a TrainState of shardings).
  """

  mesh: Mesh
  rules: sharding.Rules
  state: Any

  @classmethod
  def build(cls, mesh: Mesh, rules: sharding.Rules, make_state: Callable[[Any], Any],
            boxed_params) -> "Layout":
    """The layout of the state `make_state(params)`, for params boxed like `boxed_params`."""
    return cls(mesh, tuple(rules), state_shardings(make_state, boxed_params, mesh, rules))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, make_state: Callable[[Any], Any],
                  boxed_params, devices: Optional[Sequence[jax.Device]] = None) -> "Layout":
    """`build` on the mesh and rules of `config` (a `mesh_config()`), over `devices`."""
    return cls.build(make_mesh(config, devices), rules(config), make_state, boxed_params)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def init_state(self, make_state: Callable[[Any], Any], params):
    """make_state(params), each array created where `state` puts it (params moved there first)."""
    params = jax.device_put(params, self.state.params)
    return jax.jit(make_state, out_shardings=self.state)(params)

  def batch_shardings(self, batch):
    """NamedShardings of a batch: its first dimension over the "batch" logical axis (the
    images packed in `PACKED_FIELDS` and scalars replicated)."""
    batch_axes = nn.logical_to_mesh_axes(("batch",), self.rules)

    def leaf(path, x):
      if _is_packed(path) or np.ndim(x) == 0:
        return self.replicated
      return NamedSharding(self.mesh, batch_axes)

    return jax.tree_util.tree_map_with_path(leaf, batch)

  def put_batch(self, batch):
    """The host batch as global arrays laid out by `batch_shardings`.

    With one process the batch is the global batch (jax.device_put). With several, each
    process's loader yields its own rows, which become one global array per field
    (`distributed.global_batch`: it checks that the layout puts each process's rows on
    its devices, and refuses image inputs, whose per-process packs do not concatenate).
    """
    return distributed.global_batch(batch, self.batch_shardings(batch))

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """The mesh and the rules in context, so `nn.with_logical_constraint` shards activations.

    Both are read when a function is traced: jit (or call) the step inside it.
    """
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield
