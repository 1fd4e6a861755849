"""JAX's persistent compilation cache, and XLA settings that compile quickly."""

from __future__ import annotations

import functools
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
# And where this jaxlib has the switch, the CPU's classic fusion emitters instead of the
# MLIR-based ones (the default in jaxlib 0.10): the smoke config's programs compile about
# 2.5x faster; results may differ in the last bits. XLA aborts the process on a flag it
# does not know, and XLA is retiring the classic emitters, so `fast_compile_flags` adds
# it only when jaxlib's binary names it.
OPTIONAL_FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


@functools.cache
def _jaxlib_knows(flag: str) -> bool:
  """Whether a shared library of the installed jaxlib contains the flag's name (scanned
  once per process: `fast_compile` runs at every pipeline run)."""
  import mmap
  import jaxlib
  name = flag.lstrip("-").split("=")[0].encode()
  root = os.path.dirname(jaxlib.__file__)
  for directory, _, files in os.walk(root):
    for file in files:
      if ".so" not in file and not file.endswith((".pyd", ".dylib")):
        continue
      with open(os.path.join(directory, file), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
          continue
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
          if m.find(name) >= 0:
            return True
  return False


def fast_compile_flags() -> tuple[str, ...]:
  """`FAST_COMPILE_FLAGS`, then those of `OPTIONAL_FAST_COMPILE_FLAGS` this jaxlib knows."""
  return FAST_COMPILE_FLAGS + tuple(f for f in OPTIONAL_FAST_COMPILE_FLAGS if _jaxlib_knows(f))


def fast_compile() -> bool:
  """Adds `fast_compile_flags()` to XLA_FLAGS, if JAX has not started its backends yet.

  XLA reads its flags once, when the first backend starts, so this must run before the
  first computation. Returns whether the flags are in effect (False, with a warning,
  when the backends had already started without them).
  """
  flags = os.environ.get("XLA_FLAGS", "").split()
  missing = [f for f in fast_compile_flags() if f not in flags]
  if not missing:
    return True
  if xla_bridge.backends_are_initialized():
    logging.warning("fast_compile: JAX's backends already started; XLA_FLAGS stay %r",
                    os.environ.get("XLA_FLAGS", ""))
    return False
  os.environ["XLA_FLAGS"] = " ".join(flags + missing)
  return True
