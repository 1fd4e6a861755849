"""JAX's persistent compilation cache, switched on for a directory."""

from __future__ import annotations

import os

import jax


def enable_compilation_cache(directory: str) -> None:
  """Caches every compiled program in `directory` (created if needed), however quickly it
  compiled: on CPU most of the pipeline's programs take under JAX's default 1 s threshold,
  and together they are most of a short run's time. A program compiled before (same HLO,
  same backend and flags), in this process or an earlier one, is then loaded instead."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
