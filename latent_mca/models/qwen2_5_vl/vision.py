"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks, 2x2 patch merger."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_mca.models.qwen2_5_vl.config import VisionConfig
from latent_mca.models.qwen2_5_vl.layers import (RMSNorm, SwiGLU, apply_rotary, attention, dense,
                                                 mask_to_bias, stack_layers)
from latent_mca.models.qwen2_5_vl.positions import VisionLayout

Dtype = jnp.dtype


def segment_attention(q, k, v, segment):
  """Attention of each patch to the patches of its own segment. q/k/v [N, heads, head_dim]."""
  bias = mask_to_bias(segment[:, None] == segment[None, :])[None, None]  # [1, 1, N, N]
  return attention(q[None], k[None], v[None], bias)[0]


def local_segment_attention(q, k, v, segment, block: int):
  """`segment_attention` for contiguous segments of at most `block` patches, in O(N * block).

  Queries are cut into blocks of `block`; a segment that long spans at most two
  neighbouring blocks, so each query block attends to its own and both neighbouring
  key blocks (3 * block keys) under the same segment mask: the same result as the
  dense N x N form, at a cost linear in N.
  """
  n = q.shape[0]
  nb = -(-n // block)
  pad = nb * block - n

  def blocks(x, fill):  # [N, ...] -> [nb, block, ...]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((nb, block) + x.shape[1:])

  def with_neighbours(xb, fill):  # [nb, block, ...] -> [nb, 3 * block, ...]
    edge = jnp.full_like(xb[:1], fill)
    prev = jnp.concatenate([edge, xb[:-1]])
    nxt = jnp.concatenate([xb[1:], edge])
    return jnp.concatenate([prev, xb, nxt], axis=1)

  seg_q = blocks(segment, -1)  # padding queries form their own segment: no empty rows
  seg_k = with_neighbours(seg_q, -2)  # outside the sequence: matches nothing
  bias = mask_to_bias(seg_q[:, :, None] == seg_k[:, None, :])[:, None]  # [nb, 1, block, 3 block]
  out = attention(blocks(q, 0), with_neighbours(blocks(k, 0), 0),
                  with_neighbours(blocks(v, 0), 0), bias)
  return out.reshape((nb * block,) + out.shape[2:])[:n]


class VisionBlock(nn.Module):
  """Pre-norm attention + SwiGLU block; scanned over depth, so it also takes this layer's flag."""

  config: VisionConfig
  dtype: Dtype
  param_dtype: Dtype
  blocked_windows: bool = True

  @nn.compact
  def __call__(self, x, is_full, cos, sin, window_segment, frame_segment):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, d = x.shape
    h = RMSNorm(cfg.rms_norm_eps, "vit_embed", name="norm1", **kw)(x)
    qkv = dense(3 * d, ("vit_embed", "vit_qkv"), use_bias=True, name="qkv", **kw)(h)
    q, k, v = jnp.split(qkv.reshape(n, 3, cfg.num_heads, cfg.head_dim), 3, axis=1)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]  # [N, heads, head_dim]
    # The reference applies the vision rotary in fp32.
    q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(self.dtype)
    k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(self.dtype)
    window = cfg.window_merged**2 * cfg.spatial_merge_size**2  # patches in a full window
    if self.blocked_windows and n > 3 * window:
      windowed = lambda q, k, v: local_segment_attention(q, k, v, window_segment, window)
    else:  # too short for blocking to pay
      windowed = lambda q, k, v: segment_attention(q, k, v, window_segment)
    full = lambda q, k, v: segment_attention(q, k, v, frame_segment)
    out = jax.lax.cond(is_full, full, windowed, q, k, v).reshape(n, d)
    x = x + dense(d, ("vit_qkv", "vit_embed"), use_bias=True, name="proj", **kw)(out)
    h = RMSNorm(cfg.rms_norm_eps, "vit_embed", name="norm2", **kw)(x)
    x = x + SwiGLU(cfg.intermediate_size, use_bias=True, embed_axis="vit_embed",
                   mlp_axis="vit_mlp", name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("vit_length", "vit_embed"))
    return x, None


class PatchMerger(nn.Module):
  """RMSNorm, then concat each 2x2 group of patches (4C) and an MLP with GELU to the LM width."""

  config: VisionConfig
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    wide = cfg.hidden_size * cfg.spatial_merge_size**2
    x = RMSNorm(1e-6, "vit_embed", name="ln_q", **kw)(x).reshape(-1, wide)
    x = dense(wide, ("vit_merge", "vit_merge_hidden"), use_bias=True, name="mlp_0", **kw)(x)
    x = nn.gelu(x, approximate=False)
    return dense(cfg.out_hidden_size, ("vit_merge_hidden", "embed"), use_bias=True,
                 name="mlp_2", **kw)(x)


def vision_rotary(rotary_hw, head_dim: int, theta: float):
  """cos, sin [N, head_dim] of the 2-D rotary: head_dim/4 frequencies each for rows and columns."""
  spatial = head_dim // 2
  inv_freq = 1.0 / theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial)
  freqs = rotary_hw.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
  freqs = freqs.reshape(freqs.shape[0], -1)  # rows then columns: [N, head_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class VisionTower(nn.Module):
  """pixel_values [N, C*T*P*P] -> merged image tokens [N / merge^2, text hidden]."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  blocked_windows: bool = True  # False: window layers use the dense N x N mask (benchmarks)

  @nn.compact
  def __call__(self, pixel_values, layout: VisionLayout):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unit = cfg.spatial_merge_size**2
    n = pixel_values.shape[0]
    # The Conv3d with stride == kernel is a matmul over flattened patches.
    x = dense(cfg.hidden_size, ("vit_patch", "vit_embed"), use_bias=False, name="patch_embed",
              **kw)(pixel_values.astype(self.dtype))
    # Reorder merged tokens (groups of `unit` patches) so each window is contiguous.
    x = x.reshape(n // unit, unit, -1)[layout.window_perm].reshape(n, -1)
    cos, sin = vision_rotary(layout.rotary_hw, cfg.head_dim, cfg.rope_theta)
    is_full = jnp.zeros((cfg.depth,), bool).at[jnp.array(cfg.fullatt_block_indexes,
                                                         jnp.int32)].set(True)

    blocks = stack_layers(VisionBlock, cfg.depth, (0,) + (nn.broadcast,) * 4, self.remat)
    blocks = blocks(cfg, name="blocks", blocked_windows=self.blocked_windows, **kw)
    x, _ = blocks(x, is_full, cos, sin, layout.window_segment, layout.frame_segment)
    merged = PatchMerger(cfg, name="merger", **kw)(x)
    inverse = jnp.zeros_like(layout.window_perm).at[layout.window_perm].set(
        jnp.arange(layout.window_perm.shape[0], dtype=layout.window_perm.dtype))
    return merged[inverse]
