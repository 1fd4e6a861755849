"""Blocked window attention equals the dense block-diagonal form."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from latent_mca.models.qwen2_5_vl.vision import local_segment_attention, segment_attention


@pytest.mark.parametrize("n,block,seed", [(200, 16, 0), (257, 64, 1), (64, 64, 2)])
def test_local_equals_dense(n, block, seed):
  rng = np.random.default_rng(seed)
  lengths = []
  while sum(lengths) < n:  # contiguous segments of 1..block patches, like windows
    lengths.append(int(rng.integers(1, block + 1)))
  lengths[-1] -= sum(lengths) - n
  segment = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
  q, k, v = (jax.random.normal(key, (n, 2, 8)) for key in jax.random.split(jax.random.key(seed), 3))
  dense = segment_attention(q, k, v, segment)
  local = local_segment_attention(q, k, v, segment, block)
  np.testing.assert_allclose(np.asarray(local), np.asarray(dense), atol=1e-5, rtol=0)
  if n > 3 * block:  # one segment longer than 3 blocks loses keys: the check has teeth
    long = np.zeros(n, np.int32)
    assert not np.allclose(np.asarray(local_segment_attention(q, k, v, long, block)),
                           np.asarray(segment_attention(q, k, v, long)), atol=1e-3)
