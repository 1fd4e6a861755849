"""Training loop of the text-only Points24 plan experiments (`points24_plans`,
`points24_restated`): a decoder trained from scratch on weighted next-token loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from latent_mca.models import qwen2_5_vl


def train(model: qwen2_5_vl.Qwen2_5_VL, params, tx: optax.GradientTransformation,
          next_batch: Callable[[], dict], steps: int, desc: str):
  """(params after `steps` AdamW steps, the loss of each step).

  `next_batch()` gives numpy "ids", "mask" (attention) and "weights" [B, T]: position t's
  weight counts the loss of predicting ids[t + 1].
  """

  def loss_fn(p, b):
    logits = model.apply({"params": p}, b["ids"], b["mask"]).logits
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b["ids"][:, 1:])
    return (nll * b["weights"][:, :-1]).sum() / b["weights"].sum()

  @jax.jit
  def step(p, o, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  opt_state = tx.init(params)
  losses = []
  for _ in tqdm(range(steps), desc=desc, leave=False):
    b = {k: jnp.asarray(v) for k, v in next_batch().items()}
    params, opt_state, loss = step(params, opt_state, b)
    losses.append(float(loss))
  return params, np.asarray(losses)
