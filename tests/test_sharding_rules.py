"""Every weight carries logical axis names that the rules table maps."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import sharding


def test_every_weight_has_known_logical_axes_of_its_rank():
  boxed = qwen2_5_vl.abstract_params(qwen2_5_vl.Qwen2_5_VLConfig.tiny())
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = sharding.logical_axis_names()
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim, leaf
    assert set(leaf.names) <= known, leaf.names


def test_rules_give_mesh_shardings():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  shardings = sharding.boxed_shardings(
      qwen2_5_vl.abstract_params(qwen2_5_vl.Qwen2_5_VLConfig.tiny()), mesh)
  q_proj = shardings["decoder"]["layers"]["q_proj"]["kernel"]
  assert q_proj.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
