"""The training state every stage carries, and the optimizer that updates it.

`TrainState` is a flax.struct pytree: `step`, `params`, `opt_state`, `rng` and
`extra` (non-trained collections a step updates itself, e.g. EMA codebook
statistics), plus the optimizer `tx` as static data. A stage's
`train_step(state, batch, rng) -> (state, metrics)` computes gradients and calls
`state.apply_gradients(grads)`.

`make_optimizer` builds AdamW with a warmup / constant / cosine learning rate and
global-norm clipping from an ml_collections config (`optimizer_config()` is its
schema). Which parameters train is data, like sharding rules: `trainable` is a
tuple of regexes over parameter paths ("policy/Dense_0/kernel"); every other
parameter gets a zero update and no optimizer state, so it is frozen by
construction rather than by a convention each train_step must remember.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

TRAINABLE, FROZEN = "trainable", "frozen"


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, so it jits, donates and checkpoints whole.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: the model parameters (a plain pytree).
    opt_state: `tx`'s state for `params`.
    rng: a typed key (`jax.random.key(seed)`); `train` hands the step with index s
      the key `jax.random.fold_in(rng, s)`, so randomness depends on the step only and
      a resumed run draws the same numbers.
    extra: named non-trained collections a step maintains itself (e.g.
      {"codebook_stats": ...}); {} when there are none.
    tx: the optimizer (static: not a leaf, not checkpointed).
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array
  extra: dict
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
             extra: Optional[dict] = None) -> "TrainState":
    """A state at step 0 with `tx` initialised on `params`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, extra={} if extra is None else dict(extra), tx=tx)

  def apply_gradients(self, grads, **changes) -> "TrainState":
    """One optimizer update from `grads` (same tree as params); `changes` replace other fields."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def optimizer_config() -> ml_collections.ConfigDict:
  """Defaults (and schema) of `make_optimizer`'s config; embed it as e.g. `c.sft.optimizer`."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-4,  # peak rate, reached after warmup
      schedule="cosine",  # "constant" or "cosine" (decays to final_fraction by num_steps)
      warmup_steps=0,  # linear warmup from 0, in front of either schedule
      final_fraction=0.0,  # cosine: final rate / learning_rate
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,  # AdamW's decoupled decay, on the trainable parameters only
      grad_clip_norm=1.0,  # clip the trainable gradients' global norm; 0 turns it off
      trainable=(".*",),  # regexes, each matching whole parameter paths; the rest is frozen
  ))


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The learning rate by update count, for `make_optimizer` and for logging it in a step.

  Raises:
    ValueError: an unknown schedule, or a cosine schedule with no steps after warmup.
  """
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == "constant":
    if warmup:
      return optax.warmup_constant_schedule(0.0, peak, warmup)
    return optax.constant_schedule(peak)
  if config.schedule == "cosine":
    if num_steps <= warmup:
      raise ValueError(f"a cosine schedule needs num_steps > warmup_steps, got num_steps="
                       f"{num_steps} and warmup_steps={warmup}")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps,
                                              end_value=peak * config.final_fraction)
  raise ValueError(f"optimizer schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def param_path(path: Sequence[Any]) -> str:
  """A jax key path as "a/b/0/kernel", the form the `trainable` regexes match."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _is_param(x) -> bool:
  # Logically partitioned params (nn.Partitioned) count as one parameter, so their
  # paths do not end in "/value" and labels line up with the boxes.
  return isinstance(x, nn.meta.AxisMetadata)


def trainable_labels(params, trainable: Sequence[str], frozen: Sequence[str] = ()):
  """The tree of params with each leaf replaced by TRAINABLE or FROZEN.

  A parameter trains when one of the `trainable` regexes matches its whole path and
  none of the `frozen` ones does (those may match nothing: e.g. a stage freezing what
  an ablation leaves unused).

  Raises:
    ValueError: a regex that matches no parameter (most likely a typo that would
      silently freeze what it meant to train).
  """
  patterns = [re.compile(p) for p in trainable]
  exclude = [re.compile(p) for p in frozen]
  used = set()

  def label(path, _):
    name = param_path(path)
    hits = [p.pattern for p in patterns if p.fullmatch(name)]
    used.update(hits)
    return TRAINABLE if hits and not any(p.fullmatch(name) for p in exclude) else FROZEN

  labels = jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_param)
  unused = [p.pattern for p in patterns if p.pattern not in used]
  if unused:
    names = [param_path(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_param)[0]]
    raise ValueError(f"trainable pattern(s) {unused} match no parameter; parameters are "
                     f"e.g. {names[:8]}")
  return labels


def trainable_paths(params, trainable: Sequence[str], frozen: Sequence[str] = ()) -> list[str]:
  """The paths of the parameters that `trainable` (less `frozen`) selects, in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(trainable_labels(params, trainable, frozen))[0]
  return [param_path(path) for path, label in flat if label == TRAINABLE]


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW with clipping and the configured schedule on `config.trainable`; zero updates elsewhere.

  Equal arguments give the same transformation object. The state carries it as static
  data, so a jitted step is traced once per process for every run with this optimizer
  (the RL stage's algorithms, resumed and repeated stages), not once per run.

  Args:
    config: fields of `optimizer_config()`.
    num_steps: the stage's number of updates (the cosine schedule's horizon).
    frozen: regexes of parameters to freeze even where `config.trainable` matches.

  Returns:
    A transformation whose state holds moments for the trainable parameters only.
  """
  spec = json.dumps(ml_collections.ConfigDict(config).to_dict(), sort_keys=True)
  return _optimizer(spec, num_steps, tuple(frozen))


@functools.lru_cache(maxsize=64)
def _optimizer(spec: str, num_steps: int, frozen: tuple[str, ...]) -> optax.GradientTransformation:
  config = ml_collections.ConfigDict(json.loads(spec))
  steps = []
  if config.grad_clip_norm:
    steps.append(optax.clip_by_global_norm(config.grad_clip_norm))
  steps.append(optax.adamw(learning_rate_schedule(config, num_steps), b1=config.b1,
                           b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
  trainable = tuple(config.trainable)
  return optax.multi_transform(
      {TRAINABLE: optax.chain(*steps), FROZEN: optax.set_to_zero()},
      lambda params: trainable_labels(params, trainable, tuple(frozen)))
