"""Model definitions. Each model is a subpackage: `from latent_mca.models import qwen2_5_vl`."""
