"""Run as `python -m tests.rl_sharding_check` with 8 simulated devices (see test_rl_rollout).

Prints "OK <space>" for each action space whose sharded rollout equals the
single-device one, bit for bit on the sampled tokens and actions.
"""

import jax
import numpy as np
from jax.sharding import Mesh

from latent_mca.rl import rollout as ro
from tests.rl_fixtures import sampling, tiny_prompts, tiny_system


def main():
  assert jax.device_count() == 8, jax.devices()
  system, params, extra = tiny_system()
  prompts, packed = tiny_prompts(8), tiny_prompts(8, shards=8)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  for space in ("latent", "token"):
    config = sampling()
    single = ro.jitted_rollout(system, space=space, sampling=config)(
        params, extra, prompts, jax.random.key(3))
    sharded = ro.sharded_rollout(system, mesh, space=space, sampling=config)(
        params, extra, packed, jax.random.key(3))
    assert len(sharded.tokens.sharding.device_set) == 8
    for name in ("prompt_ids", "tokens", "actions", "mask"):
      np.testing.assert_array_equal(getattr(single, name), getattr(sharded, name), name)
    np.testing.assert_allclose(single.logp, sharded.logp, atol=1e-5)
    print("OK", space, int(single.mask.sum()))


if __name__ == "__main__":
  main()
