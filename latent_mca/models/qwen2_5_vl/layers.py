"""Building blocks shared by the vision tower and the text decoder.

Every weight carries logical axis names (see `latent_mca.parallel.sharding`),
so sharding the model is a rules table, not code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_mca.models.qwen2_5_vl.config import remat_policy

Dtype = Any

# The jax.checkpoint policy of each remat policy name ("full": None saves nothing).
_CHECKPOINT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dense(features: int, axes: tuple[str, str], *, use_bias: bool, dtype: Dtype,
          param_dtype: Dtype, name: str) -> nn.Dense:
  """nn.Dense whose kernel [in, out] (and bias [out]) carry logical axis names."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


class RMSNorm(nn.Module):
  """Qwen RMSNorm: normalise in fp32, cast back, then scale (in that order, as the reference)."""

  eps: float = 1e-6
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)); the vision MLP has biases, the text MLP does not."""

  hidden: int
  use_bias: bool
  embed_axis: str = "embed"
  mlp_axis: str = "mlp"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(self.hidden, (self.embed_axis, self.mlp_axis), name="gate_proj", **kw)(x)
    up = dense(self.hidden, (self.embed_axis, self.mlp_axis), name="up_proj", **kw)(x)
    h = nn.silu(gate) * up
    return dense(x.shape[-1], (self.mlp_axis, self.embed_axis), name="down_proj", **kw)(h)


def stack_layers(block: type[nn.Module], length: int, in_axes: tuple, remat: bool | str):
  """`block` applied `length` times with nn.scan; its weights get a leading "layers" axis.

  Scanning compiles one layer instead of `length` copies. The block returns
  (carry, per-layer output); `in_axes` says which extra arguments are per layer (0)
  and which are shared (nn.broadcast). `remat` is a policy of
  `config.REMAT_POLICIES` (or a bool: True = "full") for what the backward pass keeps
  of each block.
  """
  policy = remat_policy(remat)
  if policy != "none":
    # prevent_cse=False: under scan, CSE cannot undo the rematerialisation.
    block = nn.remat(block, prevent_cse=False, policy=_CHECKPOINT_POLICIES[policy])
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
  """x [..., heads, head_dim]; cos/sin [..., head_dim], broadcast over heads."""
  return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


# Large but finite: a fully masked row (a left-pad query) stays finite instead of NaN.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def mask_to_bias(mask):
  """bool mask (True = attend) -> additive fp32 attention bias (0 or MASKED).

  An additive bias is constant w.r.t. the parameters, so the backward pass keeps
  nothing for it; a boolean select would be saved per layer by the scan.
  """
  return jnp.where(mask, 0.0, MASKED).astype(jnp.float32)


def attention(q, k, v, bias):
  """Softmax attention with GQA.

  q [B, T, N, H], k/v [B, S, K, H] with N % K == 0; bias fp32 from `mask_to_bias`,
  broadcastable to [B, N, T, S]. Logits and softmax in fp32, as the reference.
  """
  return jax.nn.dot_product_attention(q, k, v, bias=bias)
