"""latent_mca: RL fine-tuning of vision-language agents in a learned latent action space."""

__version__ = "0.1.0"
