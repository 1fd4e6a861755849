"""Sharding as data: logical axis names (on every weight and activation) -> mesh axes.

Weights and activations are annotated with the logical names used below
(`nn.with_logical_partitioning` / `nn.with_logical_constraint`). A rules table
maps each name to a mesh axis (or None = replicated); changing the parallelism
of a run means changing this table, not the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax

# Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with sharded weights),
# "tensor" (Megatron-style tensor parallel).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
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


def logical_axis_names(rules=DEFAULT_RULES) -> set[str]:
  return {name for name, _ in rules}


def param_shardings(abstract_params, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a boxed (nn.Partitioned) param tree, e.g. from `abstract_params`."""
  specs = nn.get_partition_spec(abstract_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)
