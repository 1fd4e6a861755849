"""Configuration of the Qwen2.5-VL backbone.

Plain frozen dataclasses (hashable, so a config can be a Flax module attribute
and a static jit argument). `Qwen2_5_VLConfig.from_hf_dict` reads both the flat
`config.json` of the released checkpoints (`rope_scaling` + top-level text
fields) and the nested `text_config` layout that current `transformers` writes;
`to_hf_dict` writes the nested layout, which `transformers` loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


class ConfigError(ValueError):
  """A checkpoint or model configuration that cannot describe a Qwen2.5-VL model."""


# What the backward pass keeps of each block (`layers.stack_layers` maps them to
# `jax.checkpoint_policies`): "none" keeps every activation (no remat); "full" keeps only
# the block's inputs and recomputes the rest; the dots policies keep the matmul outputs
# (all of them, or those without batch dimensions: the weight matmuls, not attention's
# q.k / p.v) and recompute the cheap elementwise work in between.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(remat: bool | str) -> str:
  """The policy name of a `remat` setting: a name of REMAT_POLICIES, or a bool (True = "full").

  Raises:
    ConfigError: an unknown policy name.
  """
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ConfigError(f"remat={remat!r} is not a rematerialisation policy; use a bool or one "
                      f"of {REMAT_POLICIES}")
  return remat


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (ViT with window attention and a 2x2 patch merger)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # pixels: 112 / 14 / 2 = 4x4 merged tokens per window
  out_hidden_size: int = 2048
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  rope_theta: float = 10000.0
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch in `pixel_values`: C * T * P * P."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def window_merged(self) -> int:
    """Side of an attention window, in merged tokens."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 text decoder."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """Full model configuration plus the numerics we run it with.

  `dtype` is the compute dtype of activations and matmuls (the weights are cast to
  it where they are used); `param_dtype` the storage dtype of the weights, so
  dtype=bfloat16 with param_dtype=float32 trains fp32 master weights with a bf16
  forward. `remat` rematerialises each decoder/vision block in the backward pass
  (the usual choice for training the 3B/7B models): a policy name of
  REMAT_POLICIES, or a bool (True = "full", False = "none").
  """

  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  tie_word_embeddings: bool = True
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: tuple[int, ...] = (151645,)
  pad_token_id: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool | str = False

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ConfigError naming the first inconsistent field."""
    t, v = self.text, self.vision
    remat_policy(self.remat)
    if t.hidden_size % t.num_attention_heads:
      raise ConfigError(f"text.hidden_size={t.hidden_size} is not divisible by "
                        f"text.num_attention_heads={t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
      raise ConfigError(f"text.num_attention_heads={t.num_attention_heads} is not a multiple of "
                        f"text.num_key_value_heads={t.num_key_value_heads}")
    if sum(t.mrope_section) * 2 != t.head_dim:
      raise ConfigError(f"text.mrope_section={list(t.mrope_section)} sums to {sum(t.mrope_section)}, "
                        f"but must sum to head_dim/2 = {t.head_dim // 2}")
    if len(t.mrope_section) != 3:
      raise ConfigError(f"text.mrope_section must have 3 entries (t, h, w), got {list(t.mrope_section)}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ConfigError(f"vision.hidden_size={v.hidden_size} / num_heads={v.num_heads} must give a "
                        "head_dim divisible by 4 (2-D rotary over h and w)")
    if v.out_hidden_size != t.hidden_size:
      raise ConfigError(f"vision.out_hidden_size={v.out_hidden_size} must equal "
                        f"text.hidden_size={t.hidden_size}")
    bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
    if bad:
      raise ConfigError(f"vision.fullatt_block_indexes {bad} are outside [0, depth={v.depth})")
    if v.window_merged < 1:
      raise ConfigError(f"vision.window_size={v.window_size} is smaller than one merged patch "
                        f"({v.patch_size * v.spatial_merge_size} pixels)")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
      tok = getattr(self, name)
      if not 0 <= tok < t.vocab_size:
        raise ConfigError(f"{name}={tok} is outside the vocabulary [0, {t.vocab_size})")
    for act in (t.hidden_act, v.hidden_act):
      if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (Qwen2.5-VL uses 'silu')")

  def replace(self, **changes) -> "Qwen2_5_VLConfig":
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- presets
  @classmethod
  def qwen2_5_vl_3b(cls, **overrides) -> "Qwen2_5_VLConfig":
    """Qwen/Qwen2.5-VL-3B-Instruct sizes (tied head)."""
    return cls(**overrides)

  @classmethod
  def qwen2_5_vl_7b(cls, **overrides) -> "Qwen2_5_VLConfig":
    """Qwen/Qwen2.5-VL-7B-Instruct sizes (untied head)."""
    text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    vision = VisionConfig(out_hidden_size=3584)
    return cls(text=text, vision=vision, tie_word_embeddings=False, **overrides)

  @classmethod
  def tiny(cls, **overrides) -> "Qwen2_5_VLConfig":
    """A few-hundred-k-parameter model with the real structure, for tests and demos."""
    text = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      mrope_section=(2, 3, 3), max_position_embeddings=4096)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=64, fullatt_block_indexes=(1,))
    ids = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502,
               vision_end_token_id=503, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
    ids.update(overrides)
    return cls(text=text, vision=vision, tie_word_embeddings=False, **ids)

  # ------------------------------------------------------------ HF mapping
  @classmethod
  def from_hf_dict(cls, d: dict, **overrides) -> "Qwen2_5_VLConfig":
    """Builds a config from a Hugging Face `config.json` dict (flat or nested layout)."""
    if d.get("model_type") not in (None, "qwen2_5_vl"):
      raise ConfigError(f"config.json has model_type={d.get('model_type')!r}, expected 'qwen2_5_vl'")
    td = dict(d)
    if isinstance(d.get("text_config"), dict):
      td.update(d["text_config"])
    rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
    vd = d.get("vision_config") or {}
    try:
      text = TextConfig(
          vocab_size=td["vocab_size"], hidden_size=td["hidden_size"],
          intermediate_size=td["intermediate_size"], num_hidden_layers=td["num_hidden_layers"],
          num_attention_heads=td["num_attention_heads"],
          num_key_value_heads=td.get("num_key_value_heads") or td["num_attention_heads"],
          rms_norm_eps=td.get("rms_norm_eps", 1e-6),
          rope_theta=float(rope.get("rope_theta", td.get("rope_theta", 1_000_000.0))),
          mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
          max_position_embeddings=td.get("max_position_embeddings", 128000),
          hidden_act=td.get("hidden_act", "silu"))
      vrope = vd.get("rope_parameters") or {}
      vision = VisionConfig(
          depth=vd.get("depth", 32), hidden_size=vd.get("hidden_size", 1280),
          intermediate_size=vd.get("intermediate_size", 3420),
          num_heads=vd.get("num_heads", 16),
          in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
          patch_size=vd.get("patch_size", vd.get("spatial_patch_size", 14)),
          temporal_patch_size=vd.get("temporal_patch_size", 2),
          spatial_merge_size=vd.get("spatial_merge_size", 2),
          window_size=vd.get("window_size", 112),
          out_hidden_size=vd.get("out_hidden_size", td["hidden_size"]),
          fullatt_block_indexes=tuple(vd.get("fullatt_block_indexes", (7, 15, 23, 31))),
          tokens_per_second=vd.get("tokens_per_second", 2),
          rope_theta=float(vrope.get("rope_theta", 10000.0)),
          hidden_act=vd.get("hidden_act", "silu"))
    except KeyError as e:
      raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
    eos = td.get("eos_token_id", d.get("eos_token_id"))
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    tie = bool(d.get("tie_word_embeddings", False) or td.get("tie_word_embeddings", False))
    kw = dict(text=text, vision=vision, tie_word_embeddings=tie,
              image_token_id=d.get("image_token_id", 151655),
              video_token_id=d.get("video_token_id", 151656),
              vision_start_token_id=d.get("vision_start_token_id", 151652),
              vision_end_token_id=d.get("vision_end_token_id", 151653),
              bos_token_id=td.get("bos_token_id", d.get("bos_token_id")), eos_token_id=eos,
              pad_token_id=td.get("pad_token_id", d.get("pad_token_id")))
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict:
    """The nested `config.json` layout that `transformers.Qwen2_5_VLConfig` reads."""
    t, v = self.text, self.vision
    eos = list(self.eos_token_id)
    text = dict(
        model_type="qwen2_5_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act, tie_word_embeddings=self.tie_word_embeddings,
        rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                             mrope_section=list(t.mrope_section)),
        bos_token_id=self.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=self.pad_token_id)
    vision = dict(
        model_type="qwen2_5_vl_vision", depth=v.depth, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
        patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
        out_hidden_size=v.out_hidden_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
        tokens_per_second=v.tokens_per_second, hidden_act=v.hidden_act,
        rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta))
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        text_config=text, vision_config=vision, tie_word_embeddings=self.tie_word_embeddings,
        image_token_id=self.image_token_id, video_token_id=self.video_token_id,
        vision_start_token_id=self.vision_start_token_id,
        vision_end_token_id=self.vision_end_token_id)

