"""RL over either action space (SPEC section 3): GRPO, Dr.GRPO, DAPO and BNPO.

Pure, jittable functions over per-token log-probs and masks; look an algorithm
up with `get_algorithm(name)`, then `shape_rewards`, `compute_advantages` and
`policy_loss`. Aggregations return (sum, count) (`latent.masked_mean` to average).
"""

from latent_mca.rl.algorithms import (AGGREGATIONS, ADVANTAGES, ALGORITHMS, AlgorithmConfig,
                                      LossParams, aggregate, aggregate_by_index, bnpo_advantages, bnpo_beta_params,
                                      clipped_surrogate, compute_advantages, dr_grpo_advantages,
                                      get_algorithm, group_row_indices, groups_with_signal,
                                      grpo_advantages, k3_kl, loss_params, overlong_penalty,
                                      overlong_reward_shaping, policy_loss,
                                      select_groups_with_signal, seq_mean_token_mean,
                                      seq_sum_over_constant, shape_rewards, token_mean)
