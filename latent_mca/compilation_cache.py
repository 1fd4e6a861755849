"""JAX's persistent compilation cache, and XLA settings that compile quickly."""

from __future__ import annotations

import os

import jax
from absl import logging
from jax._src import xla_bridge


def enable_compilation_cache(directory: str) -> None:
  """Caches every compiled program in `directory` (created if needed), however quickly it
  compiled: on CPU most of the pipeline's programs take under JAX's default 1 s threshold,
  and together they are most of a short run's time. A program compiled before (same HLO,
  same backend and flags), in this process or an earlier one, is then loaded instead."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# XLA settings that trade the speed of the compiled code for the speed of compiling it:
# LLVM's optimisation level 0, without its expensive passes. Programs of tiny models
# (the smoke config, the tests) spend far longer compiling than running.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


def fast_compile() -> bool:
  """Adds `FAST_COMPILE_FLAGS` to XLA_FLAGS, if JAX has not started its backends yet.

  XLA reads its flags once, when the first backend starts, so this must run before the
  first computation. Returns whether the flags are in effect (False, with a warning,
  when the backends had already started without them).
  """
  flags = os.environ.get("XLA_FLAGS", "").split()
  missing = [f for f in FAST_COMPILE_FLAGS if f not in flags]
  if not missing:
    return True
  if xla_bridge.backends_are_initialized():
    logging.warning("fast_compile: JAX's backends already started; XLA_FLAGS stay %r",
                    os.environ.get("XLA_FLAGS", ""))
    return False
  os.environ["XLA_FLAGS"] = " ".join(flags + missing)
  return True
