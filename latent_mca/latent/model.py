"""All modules of the latent action model, built from one pair of configs.

    modules = LatentModules.build(backbone_config.text, LatentConfig())
    variables = modules.init(rng)            # {"policy": {"params": ...}, ...}
    logits_btc, _ = modules.policy.apply(variables["policy"], h, positions, mask)

Each module keeps its own variables, so a stage optimises exactly the modules it
trains (stage 1: inverse_dynamics, codebook, world_model; RL: policy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_mca.latent.codebook import GumbelCodebook, VQCodebook, make_codebook
from latent_mca.latent.config import LatentConfig
from latent_mca.latent.heads import InverseDynamics, Policy, WorldModel
from latent_mca.latent.projector import Projector
from latent_mca.models.qwen2_5_vl.config import TextConfig


@dataclasses.dataclass(frozen=True)
class LatentModules:
  """inverse_dynamics, codebook, world_model, policy, projector (P: text -> image+text)
  and inverse_projector (P')."""

  inverse_dynamics: InverseDynamics
  codebook: GumbelCodebook | VQCodebook
  world_model: WorldModel
  policy: Policy
  projector: Projector
  inverse_projector: Projector

  @classmethod
  def build(cls, text_config: TextConfig, config: LatentConfig, dtype: Any = jnp.float32,
            param_dtype: Any = jnp.float32, remat: bool = False) -> "LatentModules":
    """The modules for a backbone with `text_config` (d = text_config.hidden_size)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    d = text_config.hidden_size
    width = config.projector_width(d)
    return cls(
        inverse_dynamics=InverseDynamics(text_config, config, remat=remat, **kw),
        codebook=make_codebook(config, d, **kw),
        world_model=WorldModel(text_config, config, **kw),
        policy=Policy(text_config, config, remat=remat, **kw),
        projector=Projector(width, **kw),
        inverse_projector=Projector(width, **kw))

  def init_fns(self) -> dict:
    """name -> jitted fn(rng) -> that module's random variables, boxed with logical axis names.

    Runs on the smallest inputs (one token); the weights do not depend on them.
    """
    d = self.world_model.text_config.hidden_size
    num_codes = self.world_model.config.num_codes
    h = jnp.zeros((1, 1, d), jnp.float32)
    positions = jnp.zeros((3, 1, 1), jnp.int32)
    mask = jnp.ones((1, 1), jnp.int32)
    codebook_in = h if isinstance(self.codebook, VQCodebook) else jnp.zeros((1, 1, num_codes))
    fns = {
        "inverse_dynamics": lambda r: self.inverse_dynamics.init(r, h, positions, mask),
        "codebook": lambda r: self.codebook.init(r, codebook_in, mask, deterministic=True),
        # The world model's own weights do not depend on the LM head.
        "world_model": lambda r: self.world_model.init(r, h, h, lambda x: x),
        "policy": lambda r: self.policy.init(r, h, positions, mask),
        "projector": lambda r: self.projector.init(r, h),
        "inverse_projector": lambda r: self.inverse_projector.init(r, h),
    }
    return {name: jax.jit(fn) for name, fn in fns.items()}

  def init(self, rng) -> dict[str, dict]:
    """Random variables of all modules, unboxed: {module name: {collection: tree}}.

    Every module has "params" except the VQ codebook, whose state is "codebook_ema".
    """
    return nn.meta.unbox(self._init_all(rng))

  @functools.partial(jax.jit, static_argnums=0)
  def _init_all(self, rng) -> dict[str, dict]:
    # One compiled program for all modules (compiling each init alone takes longer).
    fns = self.init_fns()
    rngs = jax.random.split(rng, len(fns))
    return {name: fn(r) for (name, fn), r in zip(fns.items(), rngs)}

  def abstract(self) -> dict[str, dict]:
    """Shapes/dtypes of `init`'s variables, boxed with their logical axis names (for sharding).

    Traced once per set of modules; each call gets its own containers."""
    return jax.tree.map(lambda leaf: leaf, _abstract(self))


@functools.cache
def _abstract(modules: LatentModules) -> dict[str, dict]:
  return {name: jax.eval_shape(fn, jax.random.key(0)) for name, fn in modules.init_fns().items()}
