"""Tiny job for testing `experiments.run`, selected by its module path."""

import os

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Returns the fake job's defaults, which are also its schema."""
  config = ml_collections.ConfigDict()
  config.job = "tests.fake_job"
  config.scale = 2.0
  config.steps = 3
  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 8
  config.model.name = "tiny"
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes a marker file into `workdir` and returns a metric computed by a jitted program."""
  import jax
  import jax.numpy as jnp

  with open(os.path.join(workdir, "ran.txt"), "w") as f:
    f.write(config.model.name)
  value = jax.jit(lambda x: x * config.steps)(jnp.float32(config.scale))
  return {"value": float(value)}
