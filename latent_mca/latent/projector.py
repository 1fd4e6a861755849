"""Projectors between text-only and image+text hidden states, and their Gaussian losses.

P maps a text-only state h_T to a Gaussian over the state h_TV the same text
has with its image; P' (the inverse projector) maps back. Both are `Projector`s.
The losses take the projectors as functions h -> (mu, logvar), e.g.
`lambda h: projector.apply({"params": p}, h)`, and return (sum, count).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_mca.models.qwen2_5_vl.layers import dense


class TanhMLP(nn.Module):
  """d -> hidden -> tanh -> d."""

  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    y = jnp.tanh(dense(self.hidden, ("embed", "mlp"), name="fc_in", **kw)(x_btd))
    return dense(x_btd.shape[-1], ("mlp", "embed"), name="fc_out", **kw)(y)


class Projector(nn.Module):
  """Gaussian projector: (mu_btd, logvar_btd), logvar squashed into (-1, 1) by tanh.

  `hidden` is d // 2 in the reference (`LatentConfig.projector_width`).
  """

  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    chex.assert_rank(x_btd, 3)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mu_btd = TanhMLP(self.hidden, name="mean", **kw)(x_btd)
    # Bounded log-variance keeps exp(-logvar) from blowing up the NLL.
    logvar_btd = jnp.tanh(TanhMLP(self.hidden, name="logvar", **kw)(x_btd))
    return mu_btd, logvar_btd


def gaussian_nll(mu_btd, logvar_btd, target_btd, weights_bt):
  """sum_d (mu - target)^2 * exp(-logvar) + logvar, summed over weighted tokens: (sum, count).

  The target is data (a backbone state), so no gradient flows into it.
  """
  chex.assert_rank([mu_btd, logvar_btd, target_btd, weights_bt], [3, 3, 3, 2])
  chex.assert_equal_shape([mu_btd, logvar_btd, target_btd])
  chex.assert_equal_shape([mu_btd[..., 0], weights_bt])
  mu, logvar = mu_btd.astype(jnp.float32), logvar_btd.astype(jnp.float32)
  target = jax.lax.stop_gradient(target_btd).astype(jnp.float32)
  nll_bt = jnp.sum(jnp.square(mu - target) * jnp.exp(-logvar) + logvar, axis=-1)
  weights = weights_bt.astype(jnp.float32)
  return jnp.sum(nll_bt * weights), jnp.sum(weights)


def projection_loss(projector: Callable, inverse_projector: Callable, h_text_btd, h_image_btd,
                    weights_bt):
  """L_proj on paired data: NLL(P(h_T) -> h_TV) + NLL(P'(h_TV) -> h_T), as (sum, count).

  h_text_btd and h_image_btd must be aligned token by token (the text tokens'
  states without and with the image); the inputs are stop-gradient.
  """
  h_text = jax.lax.stop_gradient(h_text_btd)
  h_image = jax.lax.stop_gradient(h_image_btd)
  forward, count = gaussian_nll(*projector(h_text), h_image, weights_bt)
  backward, _ = gaussian_nll(*inverse_projector(h_image), h_text, weights_bt)
  return forward + backward, count


def cycle_loss(projector: Callable, inverse_projector: Callable, h_text_btd, weights_bt):
  """L_cycle on text-only data: NLL(P'(mean of P(h_T)) -> h_T), as (sum, count).

  The gradient reaches both projectors (through the mean of P), not h_T.
  """
  h_text = jax.lax.stop_gradient(h_text_btd)
  mu_btd, _ = projector(h_text)
  return gaussian_nll(*inverse_projector(mu_btd), h_text, weights_bt)
