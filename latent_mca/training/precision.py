"""Training numerics as config: the forward's compute dtype and the parameters' storage dtype.

`precision_config()` is `config.precision`; `model_dtypes` turns it into the `dtype` /
`param_dtype` of the model configs. The combination that large runs use,

    compute_dtype="bfloat16", param_dtype="float32",

keeps fp32 master weights (and fp32 Adam moments, which follow the parameters) while
the forward and backward run in bf16: every module casts its fp32 weights to bf16
where it uses them, so the gradient of that cast brings the bf16 gradients back to
fp32 for the optimizer. Losses stay fp32 whatever the compute dtype: the steps cast
logits (and the projector's Gaussians) to fp32 before their cross-entropy / NLL, and
RMSNorm and softmax statistics are fp32. The default is fp32 throughout.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from latent_mca.config_schema import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def precision_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of `config.precision`.

  compute_dtype: activations and matmuls ("float32" or "bfloat16").
  param_dtype: the stored parameters, which the optimizer updates: "float32" (master
    weights) or "bfloat16" (half the memory, no fp32 master copy).
  """
  return ml_collections.ConfigDict(dict(compute_dtype="float32", param_dtype="float32"))


def model_dtypes(config: ml_collections.ConfigDict) -> dict:
  """{"dtype", "param_dtype"} of `config.precision` for the model configs.

  Raises:
    ConfigError: naming the field whose dtype is not one of DTYPES.
  """
  out = {}
  for field, key in (("compute_dtype", "dtype"), ("param_dtype", "param_dtype")):
    name = config[field]
    if name not in DTYPES:
      raise ConfigError(f"config.precision.{field}={name!r}: one of {sorted(DTYPES)}")
    out[key] = DTYPES[name]
  return out
