"""Sharding as data: logical axis names (on every weight and activation) -> mesh axes.

Weights and activations are annotated with the logical names used below
(`nn.with_logical_partitioning` / `nn.with_logical_constraint`). A rules table
maps each name to a mesh axis (or None = replicated); changing the parallelism
of a run means changing this table, not the model.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

# (logical axis name, mesh axis / tuple of mesh axes / None = replicated), by priority:
# a mesh axis already taken by an earlier rule leaves a later dimension replicated.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with sharded weights),
# "tensor" (Megatron-style tensor parallel).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("codes", None),  # the 128 latent codes: small, replicated
    ("vit_length", None),
    ("vit_patch", None),
    ("vit_embed", "fsdp"),
    ("vit_qkv", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merge", "fsdp"),
    ("vit_merge_hidden", "tensor"),
)


def logical_axis_names(rules: Rules = DEFAULT_RULES) -> set[str]:
  return {name for name, _ in rules}


def fit_spec(spec: jax.sharding.PartitionSpec, shape: tuple[int, ...],
             mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """`spec` with each dimension sharded over the longest prefix of its mesh axes that divides it.

  JAX refuses a dimension that its mesh axes do not divide evenly; such a dimension (e.g.
  a tokenizer's odd vocabulary over tensor=2) is sharded less, down to replicated,
  rather than failing the run.
  """
  fitted = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    while names and size % math.prod(mesh.shape[n] for n in names):
      names = names[:-1]
    fitted.append(names[0] if len(names) == 1 else (names or None))
  return jax.sharding.PartitionSpec(*fitted)


def boxed_shardings(boxed, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings of a tree whose leaves are boxed (nn.Partitioned) or plain arrays/structs.

  Boxed leaves are sharded as their logical names map under `rules` (fitted to their
  shapes, `fit_spec`); plain leaves are replicated. The result has the unboxed tree's
  structure: use it for the real (unboxed) arrays.
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  return jax.tree.map(
      lambda spec, x: jax.sharding.NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
      specs, nn.meta.unbox(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

