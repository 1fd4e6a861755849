"""Configuration of the latent action model (SPEC section 2).

The defaults are the constants of the reference code. A frozen dataclass, so a
config can be a Flax module attribute and a static jit argument.
"""

from __future__ import annotations

import dataclasses

QUANTIZERS = ("gumbel", "vq")


class LatentConfigError(ValueError):
  """A latent action model configuration that cannot work."""


@dataclasses.dataclass(frozen=True)
class LatentConfig:
  """Sizes, quantiser and loss weights of the latent action model.

  The hidden size d is the backbone's (`TextConfig.hidden_size`); sizes given as
  None below are derived from it. The three ablations of the reference are
  `use_cycle`, `use_projector` and `use_text_only` (each one switch: turning off
  the projector or the text-only data also turns off the cycle term, see
  `cycle_enabled`).
  """

  num_codes: int = 128
  quantizer: str = "gumbel"  # "gumbel": straight-through Gumbel-softmax; "vq": nearest neighbour
  gumbel_tau: float = 2.0
  entropy_coef: float = 1e-3  # anti-collapse: + coef * mean over tokens of sum_c p log p
  vq_commitment_beta: float = 0.25
  vq_ema_decay: float = 0.99
  # A VQ code whose EMA count (uses per step) falls below this is restarted from a recent input.
  vq_dead_code_threshold: float = 1.0
  idm_layers: int = 4
  policy_layers: int = 8
  world_model_merge_layers: int = 2
  world_model_hidden: int | None = None  # SwiGLU width of a merge MLP; None = backbone's MLP width
  projector_hidden: int | None = None  # None = d // 2
  proj_nll_coef: float = 1e-5
  cycle_coef: float = 1e-5
  use_cycle: bool = True
  use_projector: bool = True
  use_text_only: bool = True

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises LatentConfigError naming the first invalid field."""
    if self.quantizer not in QUANTIZERS:
      raise LatentConfigError(f"quantizer={self.quantizer!r} must be one of {QUANTIZERS}")
    for name in ("num_codes", "idm_layers", "policy_layers", "world_model_merge_layers"):
      if getattr(self, name) < 1:
        raise LatentConfigError(f"{name}={getattr(self, name)} must be at least 1")
    for name in ("world_model_hidden", "projector_hidden"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise LatentConfigError(f"{name}={value} must be None or at least 1")
    if self.gumbel_tau <= 0:
      raise LatentConfigError(f"gumbel_tau={self.gumbel_tau} must be positive")
    if not 0.0 <= self.vq_ema_decay < 1.0:
      raise LatentConfigError(f"vq_ema_decay={self.vq_ema_decay} must be in [0, 1)")
    if self.vq_dead_code_threshold <= 0:
      # A restarted code's count is set to the threshold; zero would divide by zero.
      raise LatentConfigError(
          f"vq_dead_code_threshold={self.vq_dead_code_threshold} must be positive")
    for name in ("entropy_coef", "vq_commitment_beta", "proj_nll_coef", "cycle_coef"):
      if getattr(self, name) < 0:
        raise LatentConfigError(f"{name}={getattr(self, name)} must be non-negative")

  @property
  def cycle_enabled(self) -> bool:
    """The cycle term needs the projectors and text-only data as well as its own switch."""
    return self.use_cycle and self.use_projector and self.use_text_only

  def projector_width(self, hidden_size: int) -> int:
    """Hidden width of the projector MLPs for a backbone of hidden size d."""
    return self.projector_hidden or hidden_size // 2

  def world_model_width(self, intermediate_size: int) -> int:
    """SwiGLU width of the world model's merge MLPs, given the backbone's MLP width."""
    return self.world_model_hidden or intermediate_size

  def replace(self, **changes) -> "LatentConfig":
    return dataclasses.replace(self, **changes)
