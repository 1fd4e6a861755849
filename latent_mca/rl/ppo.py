"""PPO for the decision-making setting (SPEC sections 3 and 4): RL4VLM's chain-of-thought PPO.

The policy is the VLM itself: at each environment step it writes
`{"thoughts": "...", "action": "..."}` and the environment acts on the parsed
action. The whole response is one PPO action, scored at the sequence level:

  log pi(a|s) = thought_coef * sum(log-probs of the thought tokens)
                + sum(log-probs of the action tokens)          (`sequence_logprob`)

so the ratio exp(log pi - log pi_old) is one number per environment step, and the
thought tokens move the policy less (thought_coef 0.5 for the card games). A
`ValueHead` MLP reads the hidden state of the last prompt token. Everything else is
textbook PPO over T steps of E environments: `gae` (a reverse `lax.scan`),
advantages normalised once over the rollout batch, `epochs` passes of shuffled
mini-batches (`minibatch_indices`), and `ppo_loss` (clipped surrogate + clipped
value loss).

One update, the way a trainer threads it through (all pure and jittable; the config
is frozen and hashable, so it can be a static argument of `jax.jit`):

  advantages_te, returns_te = advantages_and_returns(config, rewards_te, values_te,
                                                      dones_te, last_value_e)
  # Flatten [T, E] -> [T * E] (as every per-sample rollout array), then per epoch and
  # mini-batch `idx`, one optimizer step on:
  for idx in minibatch_indices(rng, config.batch_size, config.minibatch_size,
                               config.epochs).reshape(-1, config.minibatch_size):
    new_logp_n = sequence_logprob(logp_nm, thought_mask_nm, action_mask_nm, config.thought_coef)
    loss, metrics = ppo_loss(new_logp_n, old_logp[idx], advantages[idx], values_n,
                             old_values[idx], returns[idx], config)

where logp_nm and values_n are recomputed under the current parameters for the
samples idx.

Reference: RL4VLM/RL4VLM, `VLM_PPO/` (the gym-cards experiments). What we follow:

- `a2c_ppo_acktr/algo/ppo.py`: advantages = returns - value_preds, normalised over the
  whole rollout with (A - mean) / (std + 1e-5) (torch's unbiased std) before the
  epochs; ratio = exp(logp - old_logp) of the sequence log-prob; clipped surrogate;
  the value loss clipped with the same clip_param, 0.5 * max(unclipped, clipped)
  squared error; loss = value_loss_coef * value_loss + action_loss. There is no
  entropy term: `entropy_coef` is passed in but never used (its reported entropy is
  always 0), so this module has none either. When any ratio of a mini-batch exceeds
  10 the reference uses the clipped surrogate alone (a TRL-inspired guard); with its
  mini-batches of one sample that is per sample, which is what `ratio_guard` does.
  Mini-batches whose new log-prob is NaN are skipped (`mask_n` does that here).
- `a2c_ppo_acktr/storage.py` (the copy in `VLM_PPO_ALF/`; the `VLM_PPO/` one is not
  public): GAE with masks[t + 1] = 1 - done after step t; `use_proper_time_limits` is
  off, so time-limit ends are terminal (`gae` below is the same recursion).
- `a2c_ppo_acktr/model.py`: the value head, Linear(4096, 1024) - ReLU - Linear(1024, 512)
  - ReLU - Linear(512, 1), on `hidden_states[-1][:, input_token_len - 1]` (the last
  prompt token) in `llava_interface/interface.py`, which also scores log-probs at
  logits / temperature, the same temperature as sampling.
- `main.py`, `a2c_ppo_acktr/arguments.py` and `scripts/run_{nl,ezp,p24,bj}.sh`: the
  numbers in `PPOConfig`; Adam(lr, eps=1e-7, weight decay 0), the global gradient
  norm clipped to 0.01, CosineAnnealingLR(T_max=25, eta_min=1e-9) stepped once per
  update.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from latent_mca.latent.losses import masked_mean
from latent_mca.rl.algorithms import clipped_surrogate, k3_kl
from latent_mca.training.state import optimizer_config

ADVANTAGE_NORMS = ("batch", "minibatch", "none")


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """RL4VLM's PPO settings, defaults as the reference's gym-cards scripts (NumberLine).

  "arguments" is `VLM_PPO_ALF/a2c_ppo_acktr/arguments.py` (the argparse defaults);
  "scripts" is `VLM_PPO/scripts/run_*.sh`, which override some of them. The scripts
  launch 2 data-parallel processes (`config_zero2.yaml`), each with its own
  environment and the sizes below; this config describes one such process.

  Attributes:
    clip_eps: ratio clip range (arguments `--clip-param` 0.1).
    value_clip: how far the value prediction may move from the rollout's before its
      error stops counting (the reference reuses `--clip-param`, 0.1); None gives the
      plain 0.5 * squared error (the reference's `use_clipped_value_loss=False`).
    value_coef: weight of the value loss (arguments `--value-loss-coef` 0.5).
    ratio_guard: a sample whose ratio exceeds it takes the clipped surrogate alone, so
      it adds no policy gradient (ppo.py's `ratio > 10`); None turns it off.
    gamma: discount (arguments `--gamma` 0.9).
    gae_lambda: GAE lambda (arguments `--gae-lambda` 0.95; the scripts pass `--use-gae`).
    advantage_norm: "batch" normalises the advantages once over the rollout batch
      (the reference), "minibatch" inside `ppo_loss` over each mini-batch, "none" never.
    advantage_eps: added to the std when normalising advantages (ppo.py: 1e-5).
    epochs: passes over the rollout per update (scripts `--ppo-epoch` 4).
    num_envs: environments stepped in parallel (arguments `--num-processes` 1).
    num_steps: steps per environment per update (scripts `--num-steps`: 512 for
      NumberLine and Blackjack, 1024 for EZPoints and Points24).
    minibatch_size: samples per optimizer step. The reference's `--mini-batch-size 1`
      with `--grad-accum-steps 128` averages 128 one-sample losses per step, which is
      the mean over a mini-batch of 128 (up to the per-mini-batch `ratio_guard`).
    num_updates: PPO updates per run (scripts: `--num-env-steps` 15000 // num_steps
      // num_envs = 29 for NumberLine and Blackjack, 14 for EZPoints and Points24).
    learning_rate: initial learning rate (scripts `--init-lr` 1e-5).
    end_learning_rate: cosine floor (scripts `--end-lr` 1e-9).
    lr_decay_updates: updates over which the rate follows a cosine from learning_rate
      to end_learning_rate, then stays there (scripts `--lr_max_steps` 25). torch's
      CosineAnnealingLR would rise again after it, and accelerate advances a prepared
      scheduler once per process per call (2 processes in the scripts); we keep the
      intended single decay.
    adam_eps: Adam's epsilon (arguments `--eps` 1e-7; weight decay 0).
    max_grad_norm: global gradient-norm clip (arguments `--max-grad-norm` 0.01).
    temperature: sampling temperature, also applied to the logits when scoring
      log-probs, old and new (scripts `--temperature` 0.2).
    thought_coef: lambda, the weight of the thought tokens' log-probs (scripts
      `--thought-prob-coef` 0.5 for the card games; SPEC: 0.2 for embodied tasks).
    max_new_tokens: response length limit (scripts `--max-new-tokens` 256).
  """

  clip_eps: float = 0.1
  value_clip: Optional[float] = 0.1
  value_coef: float = 0.5
  ratio_guard: Optional[float] = 10.0
  gamma: float = 0.9
  gae_lambda: float = 0.95
  advantage_norm: str = "batch"
  advantage_eps: float = 1e-5
  epochs: int = 4
  num_envs: int = 1
  num_steps: int = 512
  minibatch_size: int = 128
  num_updates: int = 29
  learning_rate: float = 1e-5
  end_learning_rate: float = 1e-9
  lr_decay_updates: int = 25
  adam_eps: float = 1e-7
  max_grad_norm: float = 0.01
  temperature: float = 0.2
  thought_coef: float = 0.5
  max_new_tokens: int = 256

  def __post_init__(self):
    def need(ok, message):
      if not ok:
        raise ValueError(f"PPOConfig: {message}")

    need(self.clip_eps > 0, f"clip_eps must be > 0, got {self.clip_eps}")
    need(self.value_clip is None or self.value_clip > 0,
         f"value_clip must be > 0 or None (unclipped), got {self.value_clip}")
    need(self.value_coef >= 0, f"value_coef must be >= 0, got {self.value_coef}")
    need(self.ratio_guard is None or self.ratio_guard > 1 + self.clip_eps,
         f"ratio_guard must exceed 1 + clip_eps = {1 + self.clip_eps} or be None, "
         f"got {self.ratio_guard}")
    need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
    need(0 <= self.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
    need(self.advantage_norm in ADVANTAGE_NORMS,
         f"unknown advantage_norm {self.advantage_norm!r}; known: {', '.join(ADVANTAGE_NORMS)}")
    need(self.advantage_eps > 0, f"advantage_eps must be > 0, got {self.advantage_eps}")
    for name in ("epochs", "num_envs", "num_steps", "minibatch_size", "num_updates",
                 "lr_decay_updates", "max_new_tokens"):
      need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    need(self.batch_size % self.minibatch_size == 0,
         f"minibatch_size ({self.minibatch_size}) must divide the rollout batch num_steps * "
         f"num_envs = {self.batch_size}")
    need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
    need(0 <= self.end_learning_rate <= self.learning_rate,
         f"end_learning_rate must be in [0, learning_rate={self.learning_rate}], "
         f"got {self.end_learning_rate}")
    need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
    need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), "
         f"got {self.max_grad_norm}")
    need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
    need(0 <= self.thought_coef <= 1, f"thought_coef must be in [0, 1], got {self.thought_coef}")

  @property
  def batch_size(self) -> int:
    """Samples per update: num_steps * num_envs."""
    return self.num_steps * self.num_envs

  @property
  def optimizer_steps_per_update(self) -> int:
    """epochs * (batch_size // minibatch_size)."""
    return self.epochs * (self.batch_size // self.minibatch_size)


def ppo_optimizer_config(config: PPOConfig) -> tuple[ml_collections.ConfigDict, int]:
  """The reference's optimizer as `training.state.make_optimizer` settings, and its horizon.

  Adam (AdamW with no decay) at eps = adam_eps, gradients clipped to max_grad_norm, and
  a cosine from learning_rate to end_learning_rate over lr_decay_updates updates. The
  reference steps its rate once per update; ours moves every optimizer step along the
  same curve.

  Returns:
    (optimizer config, num_steps): pass both to `make_optimizer` (set `trainable` first).
  """
  opt = optimizer_config()
  opt.update(learning_rate=config.learning_rate, schedule="cosine", warmup_steps=0,
             final_fraction=config.end_learning_rate / config.learning_rate,
             eps=config.adam_eps, weight_decay=0.0, grad_clip_norm=config.max_grad_norm)
  return opt, config.lr_decay_updates * config.optimizer_steps_per_update


# ---------------------------------------------------------------------------------------------
# The value head.


def reference_value_widths(input_features: int) -> tuple[int, int]:
  """The reference's hidden widths scaled to the input: 4096 -> (1024, 512), i.e. (D/4, D/8)."""
  return max(input_features // 4, 1), max(input_features // 8, 1)


def _torch_linear_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ValueHead(nn.Module):
  """RL4VLM's value MLP: [Linear - ReLU] * len(hidden_features) - Linear(1).

  Reads the backbone's final hidden state at the last prompt token (the reference
  takes `hidden_states[-1]` at position prompt_length - 1, i.e. before any response
  token), so the value is V(s) of the observation + prompt alone. Computed in fp32
  whatever the backbone's dtype (the reference runs it in fp16).

  Weights are initialised as torch.nn.Linear's defaults (kernel and bias
  U(+-1/sqrt(fan_in))), as the reference's are; kernels carry logical axis names
  ("embed" -> "mlp" for the first layer, replicated after) for the sharding rules.

  Attributes:
    hidden_features: widths of the hidden layers; None means `reference_value_widths`
      of the input width (the reference hard-codes 4096 -> 1024 -> 512 for LLaVA-7B;
      a narrower backbone gets the same 1/4 and 1/8 ratios).
  """

  hidden_features: Optional[Sequence[int]] = None

  @nn.compact
  def __call__(self, hidden_nd):
    """[N, D] hidden states -> [N] fp32 values."""
    chex.assert_rank(hidden_nd, 2)
    x = hidden_nd.astype(jnp.float32)
    widths = (reference_value_widths(x.shape[-1]) if self.hidden_features is None
              else tuple(self.hidden_features))
    layers = [(w, f"hidden_{i}") for i, w in enumerate(widths)] + [(1, "out")]
    for i, (width, name) in enumerate(layers):
      axes = ("embed", "mlp") if i == 0 else (None, None)
      x = nn.Dense(
          width, name=name, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), axes),
          bias_init=nn.with_logical_partitioning(_torch_linear_bias_init(x.shape[-1]),
                                                 axes[1:]))(x)
      if name != "out":
        x = nn.relu(x)
    return x[:, 0]


# ---------------------------------------------------------------------------------------------
# Advantages.


def gae(rewards_te, values_te, dones_te, last_value_e, gamma, lam):
  """Generalised advantage estimation over T steps of E environments, as a reverse scan.

  dones[t] = 1 when the episode ended at step t (the reward r_t was its last), so
  step t does not bootstrap from step t + 1, whose observation (and value) belongs
  to the next episode after an auto-reset:

    delta_t = r_t + gamma * (1 - d_t) * V_{t+1} - V_t,   V_T = last_value
    A_t     = delta_t + gamma * lam * (1 - d_t) * A_{t+1}
    R_t     = A_t + V_t

  This is the reference's recursion with its masks[t + 1] = 1 - done_t shifted onto
  step t. lam = 1 gives discounted returns (bootstrapped from last_value, cut at
  episode ends) minus values; lam = 0 gives the TD errors delta_t.

  Args:
    rewards_te: [T, E] rewards.
    values_te: [T, E] value predictions of the observations acted on.
    dones_te: [T, E] 1 (or True) where the episode ended at that step.
    last_value_e: [E] value of the observation after the last step.
    gamma: discount.
    lam: GAE lambda.

  Returns:
    (advantages [T, E], returns [T, E]), fp32.
  """
  chex.assert_rank([rewards_te, values_te, dones_te, last_value_e], [2, 2, 2, 1])
  chex.assert_equal_shape([rewards_te, values_te, dones_te])
  chex.assert_equal_shape([values_te[0], last_value_e])
  rewards = rewards_te.astype(jnp.float32)
  values = values_te.astype(jnp.float32)
  not_done = 1.0 - dones_te.astype(jnp.float32)
  next_values = jnp.concatenate([values[1:], last_value_e.astype(jnp.float32)[None]], axis=0)

  def step(next_advantage_e, xs):
    reward_e, value_e, next_value_e, not_done_e = xs
    delta_e = reward_e + gamma * not_done_e * next_value_e - value_e
    advantage_e = delta_e + gamma * lam * not_done_e * next_advantage_e
    return advantage_e, advantage_e

  _, advantages = jax.lax.scan(step, jnp.zeros_like(last_value_e, jnp.float32),
                               (rewards, values, next_values, not_done), reverse=True)
  return advantages, advantages + values


def normalize_advantages(advantages, mask=None, *, eps: float = 1e-5):
  """(A - mean) / (std + eps) over the entries with mask, std unbiased (as torch.std).

  Args:
    advantages: advantages of any shape.
    mask: same shape, 1 on the entries that count; None counts all.
    eps: added to the std.

  Returns:
    fp32 normalised advantages; 0 where mask is 0 (and everywhere when fewer than
    two entries count, where the std is undefined).
  """
  a = advantages.astype(jnp.float32)
  w = jnp.ones_like(a) if mask is None else mask.astype(jnp.float32)
  chex.assert_equal_shape([a, w])
  a = jnp.where(w > 0, a, 0.0)
  count = jnp.sum(w)
  mean = masked_mean((jnp.sum(a * w), count))
  var = jnp.sum(w * (a - mean)**2) / jnp.maximum(count - 1.0, 1.0)
  normalized = (a - mean) / (jnp.sqrt(var) + eps)
  return jnp.where((w > 0) & (count > 1), normalized, 0.0)


def advantages_and_returns(config: PPOConfig, rewards_te, values_te, dones_te, last_value_e):
  """`gae` with the config's gamma and lambda, then the batch normalisation if configured.

  Returns:
    (advantages [T, E], returns [T, E]); the returns (the value targets) are
    A + V before any normalisation, as the reference's.
  """
  advantages, returns = gae(rewards_te, values_te, dones_te, last_value_e, config.gamma,
                            config.gae_lambda)
  if config.advantage_norm == "batch":
    advantages = normalize_advantages(advantages, eps=config.advantage_eps)
  return advantages, returns


# ---------------------------------------------------------------------------------------------
# The chain-of-thought action log-prob.


def sequence_logprob(logp_nm, thought_mask_nm, action_mask_nm, thought_coef):
  """log pi(a|s) of a whole response: thought_coef * sum(thought) + sum(action).

  `logp_nm` holds each response token's log-prob (at logits / temperature); the two
  masks pick the thought and action spans and should not overlap. Tokens in neither
  (padding, the JSON scaffolding one chooses to leave out) do not count, and may
  hold any value, -inf included. For reference, RL4VLM's spans: the action starts
  at the last '"action":' key (Llama ids 29908, 2467, 1115, hard-coded) and runs to
  the end, EOS included; the thought is everything before it except the first two
  response positions. Its search only counts the key as found when it occurs more
  than once (`> 1`), so a response with exactly one falls back to its last five
  tokens as the action.

  Args:
    logp_nm: [N, M] log-probs of the sampled response tokens.
    thought_mask_nm: [N, M] 1 on thought tokens.
    action_mask_nm: [N, M] 1 on action tokens.
    thought_coef: lambda (0.5 for the card games).

  Returns:
    [N] fp32 sequence log-probs.
  """
  chex.assert_rank(logp_nm, 2)
  chex.assert_equal_shape([logp_nm, thought_mask_nm, action_mask_nm])
  logp = logp_nm.astype(jnp.float32)

  def span_sum(mask_nm):
    # where, not a product: -inf * 0 is nan (in the value and in the gradient).
    return jnp.sum(jnp.where(mask_nm.astype(bool), logp, 0.0), axis=1)

  return thought_coef * span_sum(thought_mask_nm) + span_sum(action_mask_nm)


# ---------------------------------------------------------------------------------------------
# The loss.


def clipped_value_loss(values_n, old_values_n, returns_n, value_clip: Optional[float]):
  """Per-sample 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-value_clip) - R)^2).

  The clipped term stops the gradient once the prediction has moved more than
  value_clip from the rollout's in the direction that reduces the error; None
  gives 0.5 * (V - R)^2.

  Returns:
    (loss [N], clipped [N] bool: where the prediction moved beyond value_clip).
  """
  values = values_n.astype(jnp.float32)
  unclipped_n = (values - returns_n)**2
  if value_clip is None:
    return 0.5 * unclipped_n, jnp.zeros(values.shape, bool)
  moved_n = values - old_values_n
  clipped_values_n = old_values_n + jnp.clip(moved_n, -value_clip, value_clip)
  clipped_n = (clipped_values_n - returns_n)**2
  return 0.5 * jnp.maximum(unclipped_n, clipped_n), jnp.abs(moved_n) > value_clip


def ppo_loss(new_logp_n, old_logp_n, advantages_n, values_n, old_values_n, returns_n,
             config: PPOConfig, *, mask_n=None):
  """PPO's loss on a mini-batch of sequence-level actions: policy + value_coef * value.

  policy: mean of -min(r A, clip(r, 1 +- clip_eps) A) with r = exp(new_logp - old_logp);
  samples with r > ratio_guard take -clip(r) A alone. value: mean of
  `clipped_value_loss`. With advantage_norm "minibatch" the advantages are normalised
  here, over the samples with mask. Only new_logp_n and values_n should carry a gradient.

  Args:
    new_logp_n: [N] `sequence_logprob` under the policy being trained.
    old_logp_n: [N] the same under the policy that acted (stored in the rollout).
    advantages_n: [N] advantages (already normalised when advantage_norm is "batch").
    values_n: [N] `ValueHead` predictions under the parameters being trained.
    old_values_n: [N] the rollout's value predictions.
    returns_n: [N] value targets (`gae`'s returns).
    config: clip_eps, value_clip, value_coef, ratio_guard, advantage_norm.
    mask_n: [N] 1 on samples that count (None: all). A sample without mask may hold
      any value, NaN included (the reference skips samples whose log-prob is NaN:
      pass mask_n = jnp.isfinite(new_logp_n) for that).

  Returns:
    (loss scalar, metrics): loss, policy_loss, value_loss, clip_fraction (samples whose
    policy gradient the clip removed), value_clip_fraction, guard_fraction, approx_kl
    (k3 estimate of KL(old || new)), ratio_mean, ratio_max, value_mean,
    explained_variance (1 - Var(R - V) / Var(R); 0 when Var(R) = 0), count.
  """
  chex.assert_rank([new_logp_n, old_logp_n, advantages_n, values_n, old_values_n, returns_n],
                   1)
  chex.assert_equal_shape([new_logp_n, old_logp_n, advantages_n, values_n, old_values_n,
                           returns_n])
  real_n = jnp.ones(new_logp_n.shape, bool) if mask_n is None else mask_n.astype(bool)
  chex.assert_equal_shape([real_n, new_logp_n])
  weight_n = real_n.astype(jnp.float32)
  count = jnp.sum(weight_n)

  def real(x_n):
    # Zero the samples without mask before any exp, so they cannot put a nan in the gradient.
    return jnp.where(real_n, x_n.astype(jnp.float32), 0.0)

  def mean(x_n):
    return masked_mean((jnp.sum(jnp.where(real_n, x_n, 0.0)), count))

  log_ratio_n = real(new_logp_n) - real(old_logp_n)
  advantages = real(advantages_n)
  if config.advantage_norm == "minibatch":
    advantages = normalize_advantages(advantages, weight_n, eps=config.advantage_eps)
  policy_n, clipped_n = clipped_surrogate(log_ratio_n, advantages, config.clip_eps,
                                          config.clip_eps)
  ratio_n = jnp.exp(log_ratio_n)
  if config.ratio_guard is None:
    guarded_n = jnp.zeros(ratio_n.shape, bool)
  else:
    guarded_n = ratio_n > config.ratio_guard
    surrogate_only_n = -jnp.clip(ratio_n, 1 - config.clip_eps, 1 + config.clip_eps) * advantages
    policy_n = jnp.where(guarded_n, surrogate_only_n, policy_n)
  values, returns = real(values_n), real(returns_n)
  value_n, value_clipped_n = clipped_value_loss(values, real(old_values_n), returns,
                                                config.value_clip)
  policy_loss, value_loss = mean(policy_n), mean(value_n)
  loss = policy_loss + config.value_coef * value_loss

  returns_mean = mean(returns)
  returns_var = mean((returns - returns_mean)**2)
  residual_n = returns - values
  residual_var = mean((residual_n - mean(residual_n))**2)
  metrics = {
      "loss": loss,
      "policy_loss": policy_loss,
      "value_loss": value_loss,
      # Samples whose policy gradient is zero: clipped in the advantage's direction, or guarded.
      "clip_fraction": mean((clipped_n | guarded_n).astype(jnp.float32)),
      "value_clip_fraction": mean(value_clipped_n.astype(jnp.float32)),
      "guard_fraction": mean(guarded_n.astype(jnp.float32)),
      "approx_kl": mean(k3_kl(real(old_logp_n), real(new_logp_n))),
      "ratio_mean": mean(ratio_n),
      "ratio_max": jnp.max(jnp.where(real_n, ratio_n, -jnp.inf)),
      "value_mean": mean(values),
      "explained_variance": jnp.where(returns_var > 0,
                                      1.0 - residual_var / jnp.maximum(returns_var, 1e-30), 0.0),
      "count": count,
  }
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Mini-batches.


def minibatch_indices(rng, num_items: int, minibatch_size: int, epochs: int):
  """Shuffled mini-batch indices for `epochs` passes over a batch of `num_items` samples.

  Each epoch draws a fresh permutation and cuts it into num_items // minibatch_size
  mini-batches, dropping the remainder (the reference's
  BatchSampler(SubsetRandomSampler, drop_last=True)).

  Args:
    rng: a key.
    num_items: samples in the flattened rollout (T * E).
    minibatch_size: samples per mini-batch, in [1, num_items].
    epochs: passes.

  Returns:
    [epochs, num_items // minibatch_size, minibatch_size] int32 indices.
  """
  if not 1 <= minibatch_size <= num_items:
    raise ValueError(f"minibatch_size must be in [1, num_items={num_items}], "
                     f"got {minibatch_size}")
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  num_minibatches = num_items // minibatch_size
  keys = jax.random.split(rng, epochs)
  order_en = jax.vmap(lambda key: jax.random.permutation(key, num_items))(keys)
  used = num_minibatches * minibatch_size
  return order_en[:, :used].reshape(epochs, num_minibatches, minibatch_size).astype(jnp.int32)
