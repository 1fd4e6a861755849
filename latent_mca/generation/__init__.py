"""Decoding with a KV cache (`generate`) and next-token sampling."""

from latent_mca.generation.decode import generate, init_kv_cache
from latent_mca.generation.sampling import filter_logits, sample_logits
