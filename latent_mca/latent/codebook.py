"""The codebook of latent actions and its two quantisers.

`GumbelCodebook` (the reference): the inverse dynamics model gives code logits;
a straight-through Gumbel-softmax picks one code per step. `VQCodebook` (an
option): the inverse dynamics model gives a continuous vector; the nearest code
is taken, big_vision-style, with a commitment loss, EMA codebook updates and
dead-code restarts. Both return a `CodebookOutput`, so a stage does not care
which one the config chose (`make_codebook`).

RNG streams: "gumbel" (Gumbel noise) and "codebook_restart" (VQ restarts).
The VQ statistics live in the mutable collection "codebook_ema".
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from latent_mca.latent.config import LatentConfig
from latent_mca.latent.losses import code_neg_entropy

GUMBEL_RNG = "gumbel"
RESTART_RNG = "codebook_restart"
CODEBOOK_STATE = "codebook_ema"


@flax.struct.dataclass
class CodebookOutput:
  """What a quantiser gives for each step.

  codes [B, T] int32; one_hot [B, T, C], exactly one-hot in the forward pass
  (Gumbel: the backward pass is that of the soft probabilities; VQ: no gradient);
  probs [B, T, C], the soft probabilities (VQ: the one-hot); embedding [B, T, D],
  the action fed to the world model (Gumbel: one_hot @ codebook; VQ: the code
  vector, straight-through to the input); aux_loss (sum, count), already weighted
  (Gumbel: entropy_coef * sum p log p; VQ: beta * commitment); metrics
  {"perplexity", "codes_used"} from `codebook_metrics`.
  """

  codes: Any
  one_hot: Any
  probs: Any
  embedding: Any
  aux_loss: Any
  metrics: Any


def straight_through(value, surrogate):
  """`value` in the forward pass, the gradient of `surrogate` in the backward pass.

  big_vision's x + stop_gradient(e - x), rearranged so the forward value is
  exactly `value` (surrogate - surrogate is exactly 0 in floating point).
  """
  return jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))


def gumbel_softmax(logits_btc, tau: float, rng=None):
  """Straight-through Gumbel-softmax: (one_hot_btc, probs_btc), both fp32.

  probs = softmax((logits + g) / tau) with g ~ Gumbel(0, 1) (g = 0 when rng is
  None: deterministic, for evaluation); one_hot is the one-hot of the argmax of
  logits + g in the forward pass and carries the gradient of probs backward.
  """
  logits = logits_btc.astype(jnp.float32)
  if rng is not None:
    logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  probs_btc = jax.nn.softmax(logits / tau, axis=-1)
  hard_btc = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return straight_through(hard_btc, probs_btc), probs_btc


def codebook_metrics(one_hot_or_probs_btc, weights_bt) -> dict:
  """Codebook usage over the weighted steps, as big_vision reports it.

  perplexity = exp(entropy of the average code distribution): num_codes when
  every code is used equally, 1 when one code takes everything. codes_used =
  how many codes are the argmax of at least one weighted step.
  """
  chex.assert_rank([one_hot_or_probs_btc, weights_bt], [3, 2])
  chex.assert_equal_shape([one_hot_or_probs_btc[..., 0], weights_bt])
  p_btc = jax.lax.stop_gradient(one_hot_or_probs_btc).astype(jnp.float32)
  w_bt1 = weights_bt.astype(jnp.float32)[..., None]
  avg_c = jnp.sum(p_btc * w_bt1, axis=(0, 1)) / jnp.maximum(jnp.sum(w_bt1), 1.0)
  perplexity = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(avg_c, avg_c)))
  argmax_btc = jax.nn.one_hot(jnp.argmax(p_btc, axis=-1), p_btc.shape[-1])
  counts_c = jnp.sum(argmax_btc * w_bt1, axis=(0, 1))
  return {"perplexity": perplexity, "codes_used": jnp.sum(counts_c > 0)}


def _check_inputs(x_btf, weights_bt, features: int):
  chex.assert_rank([x_btf, weights_bt], [3, 2])
  chex.assert_equal_shape([x_btf[..., 0], weights_bt])
  chex.assert_axis_dimension(x_btf, 2, features)


class GumbelCodebook(nn.Module):
  """num_codes learned vectors of size d, chosen by straight-through Gumbel-softmax."""

  config: LatentConfig
  features: int  # d, the backbone's hidden size
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    # Unit scale, like the RMS-normed hidden states the codes are concatenated with.
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codes", "embed")),
        (self.config.num_codes, self.features), self.param_dtype)

  def __call__(self, logits_btc, weights_bt, deterministic: bool) -> CodebookOutput:
    """logits_btc [B, T, C] from the inverse dynamics model; weights_bt [B, T] marks real steps.

    deterministic=True takes the argmax without noise (evaluation); otherwise
    the noise comes from the "gumbel" RNG stream.
    """
    _check_inputs(logits_btc, weights_bt, self.config.num_codes)
    rng = None if deterministic else self.make_rng(GUMBEL_RNG)
    one_hot_btc, probs_btc = gumbel_softmax(logits_btc, self.config.gumbel_tau, rng)
    embedding_btd = jnp.einsum("btc,cd->btd", one_hot_btc.astype(self.dtype),
                               jnp.asarray(self.codebook, self.dtype))
    neg_entropy, count = code_neg_entropy(logits_btc, weights_bt)
    return CodebookOutput(
        codes=jnp.argmax(one_hot_btc, axis=-1).astype(jnp.int32), one_hot=one_hot_btc,
        probs=probs_btc, embedding=embedding_btd,
        aux_loss=(self.config.entropy_coef * neg_entropy, count),
        metrics=codebook_metrics(one_hot_btc, weights_bt))

  def lookup(self, codes_bt):
    """codebook[codes]: [B, T] int -> [B, T, D] (e.g. the policy's codes for the world model)."""
    return jnp.asarray(self.codebook, self.dtype)[codes_bt]


class VQCodebook(nn.Module):
  """Nearest-neighbour codebook learned by EMA, with dead-code restarts.

  The statistics are EMA counts [C] (uses per step) and EMA sums [C, D] of the
  inputs each code won, in the "codebook_ema" collection; a code vector is
  sums / counts. Apply with mutable=["codebook_ema"] and a "codebook_restart"
  RNG when deterministic=False. Under jit with a sharded batch the sums over
  the batch are global, so every device keeps the same codebook.
  """

  config: LatentConfig
  features: int  # d, the size of the inputs and of the code vectors
  dtype: Any = jnp.float32  # of the embedding; the statistics stay fp32 (EMA of small updates)

  def setup(self):
    c, d = self.config.num_codes, self.features
    self.counts = self.variable(CODEBOOK_STATE, "counts", jnp.ones, (c,), jnp.float32)
    self.sums = self.variable(
        CODEBOOK_STATE, "sums",
        lambda: nn.initializers.normal(1.0)(self.make_rng("params"), (c, d), jnp.float32))

  def codebook(self):
    """The code vectors [C, D], fp32."""
    return self.sums.value / self.counts.value[:, None]

  def __call__(self, x_btd, weights_bt, deterministic: bool) -> CodebookOutput:
    """x_btd [B, T, D] continuous inputs; weights_bt [B, T] marks real steps.

    deterministic=False also updates the EMA statistics from the weighted steps
    (and restarts dead codes); the outputs use the codebook from before the update.
    """
    _check_inputs(x_btd, weights_bt, self.features)
    cfg = self.config
    x = x_btd.astype(jnp.float32)
    e_cd = self.codebook()
    dist_btc = (jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * jnp.einsum("btd,cd->btc", x, e_cd)
                + jnp.sum(e_cd * e_cd, axis=-1))
    codes_bt = jnp.argmin(dist_btc, axis=-1).astype(jnp.int32)
    one_hot_btc = jax.nn.one_hot(codes_bt, cfg.num_codes, dtype=jnp.float32)
    quantized_btd = e_cd[codes_bt]
    weights = weights_bt.astype(jnp.float32)
    commitment_bt = jnp.mean(jnp.square(x - jax.lax.stop_gradient(quantized_btd)), axis=-1)
    aux_loss = (cfg.vq_commitment_beta * jnp.sum(commitment_bt * weights), jnp.sum(weights))
    if not deterministic and not self.is_initializing():
      self._update(jax.lax.stop_gradient(x), one_hot_btc, weights)
    return CodebookOutput(
        codes=codes_bt, one_hot=one_hot_btc, probs=one_hot_btc,
        embedding=straight_through(quantized_btd, x).astype(self.dtype), aux_loss=aux_loss,
        metrics=codebook_metrics(one_hot_btc, weights_bt))

  def _update(self, x_btd, one_hot_btc, weights_bt):
    """One EMA step of counts and sums, then restart codes whose count fell below threshold.

    A dead code becomes a random weighted input of this batch, with count =
    threshold: if it still wins nothing it is dead again next step and re-drawn.
    """
    cfg = self.config
    decay, threshold = cfg.vq_ema_decay, cfg.vq_dead_code_threshold
    won_btc = one_hot_btc * weights_bt[..., None]
    counts_c = decay * self.counts.value + (1 - decay) * jnp.sum(won_btc, axis=(0, 1))
    sums_cd = decay * self.sums.value + (1 - decay) * jnp.einsum("btc,btd->cd", won_btc, x_btd)
    flat_x = x_btd.reshape(-1, x_btd.shape[-1])
    flat_w = weights_bt.reshape(-1)
    total = jnp.sum(flat_w)
    picks_c = jax.random.choice(self.make_rng(RESTART_RNG), flat_x.shape[0], (cfg.num_codes,),
                                p=flat_w / jnp.maximum(total, 1.0))
    dead_c = (counts_c < threshold) & (total > 0)  # nothing to restart from in an empty batch
    self.counts.value = jnp.where(dead_c, threshold, counts_c)
    self.sums.value = jnp.where(dead_c[:, None], threshold * flat_x[picks_c], sums_cd)

  def lookup(self, codes_bt):
    """codebook[codes]: [B, T] int -> [B, T, D]."""
    return self.codebook()[codes_bt].astype(self.dtype)


def make_codebook(config: LatentConfig, features: int, dtype=jnp.float32,
                  param_dtype=jnp.float32, name: str | None = None):
  """The codebook the config's `quantizer` names, for hidden size `features`."""
  if config.quantizer == "vq":
    return VQCodebook(config, features, dtype=dtype, name=name)
  return GumbelCodebook(config, features, dtype=dtype, param_dtype=param_dtype, name=name)
