"""The latent action model (SPEC section 2): codebook, inverse dynamics, world model,
policy and projectors, as Flax Linen modules, and their losses.

Losses return (sum, count) (`masked_mean` to average); see `model.LatentModules`
for building and initialising all modules at once.
"""

from latent_mca.latent.codebook import (CODEBOOK_STATE, GUMBEL_RNG, RESTART_RNG, CodebookOutput,
                                        GumbelCodebook, VQCodebook, codebook_metrics,
                                        gumbel_softmax, make_codebook, straight_through)
from latent_mca.latent.config import LatentConfig, LatentConfigError
from latent_mca.latent.heads import (InverseDynamics, Policy, WorldModel, backbone_lm_head,
                                     causal_mask, init_kv_cache, shift_to_steps)
from latent_mca.latent.losses import (behaviour_cloning_loss, code_neg_entropy, cross_entropy,
                                      masked_mean, next_token_targets)
from latent_mca.latent.model import LatentModules
from latent_mca.latent.projector import (Projector, cycle_loss, gaussian_nll, projection_loss)
