r"""Window attention in the vision tower: blocked O(N * window) form vs the dense N x N form.

  python -m experiments.bench_vision_attention

Times the forward pass of one vision tower (the cpu-small shape of bench_backbone by
default, `--preset 3b` for the real one) on square images of growing size, once with
window layers computed blockwise (what the model does) and once densely under the same
block-diagonal mask, checks both give the same output, and writes
results/bench_vision_attention_<device>.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from latent_mca.data.image_processing import ImageProcessorConfig, smart_resize
from latent_mca.models import qwen2_5_vl
from latent_mca.models.qwen2_5_vl import vision

_PRESET = flags.DEFINE_enum("preset", "small", ["small", "3b"], "Vision tower size.")
_SIZES = flags.DEFINE_list("sizes", ["224", "448", "672", "896"], "Square image sides (pixels).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results", "Where the JSON goes.")


def _vision_config(preset: str) -> qwen2_5_vl.VisionConfig:
  if preset == "3b":
    return qwen2_5_vl.VisionConfig()
  return qwen2_5_vl.VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                                 out_hidden_size=256, fullatt_block_indexes=(3,))


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv):
  del argv
  cfg = _vision_config(_PRESET.value)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  tower = vision.VisionTower(cfg, dtype=dtype, param_dtype=dtype)
  rows = []
  for side in map(int, _SIZES.value):
    h, w = smart_resize(side, side, max_pixels=16384 * 28 * 28)
    grid = np.array([[1, h // cfg.patch_size, w // cfg.patch_size]], np.int32)
    n = int(grid.prod())
    pixels = jax.random.normal(jax.random.key(0), (n, cfg.patch_dim), jnp.float32)
    layout = qwen2_5_vl.vision_layout(grid, n, cfg)
    params = jax.jit(tower.init)(jax.random.key(1), pixels, layout)
    blocked = jax.jit(tower.apply)
    dense = jax.jit(tower.clone(blocked_windows=False).apply)
    out_dense = dense(params, pixels, layout)
    dense_ms = _median_ms(dense, params, pixels, layout)
    out_blocked = blocked(params, pixels, layout)
    blocked_ms = _median_ms(blocked, params, pixels, layout)
    diff = float(jnp.max(jnp.abs(out_blocked.astype(jnp.float32) - out_dense.astype(jnp.float32))))
    rows.append(dict(image=f"{side}x{side}", resized=f"{h}x{w}", patches=n,
                     dense_ms=dense_ms, blocked_ms=blocked_ms, speedup=dense_ms / blocked_ms,
                     max_abs_diff=diff))
    print(f"{side:5d}px  {n:6d} patches  dense {dense_ms:9.2f} ms  blocked {blocked_ms:9.2f} ms  "
          f"speedup {dense_ms / blocked_ms:6.2f}  max|diff| {diff:.2e}")
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUT_DIR.value, f"bench_vision_attention_{jax.default_backend()}.json")
  with open(path, "w") as f:
    json.dump(dict(preset=_PRESET.value, dtype=jnp.dtype(dtype).name,
                   device=jax.devices()[0].device_kind, rows=rows), f, indent=2)
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
