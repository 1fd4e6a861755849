"""Pure train steps of the latent action model's stages (SPEC section 2), and their evaluation.

Everything trains one parameter tree,

    params = {"backbone": <Qwen2.5-VL params>, "inverse_dynamics": ..., "codebook": ...,
              "world_model": ..., "policy": ..., "projector": ..., "inverse_projector": ...}

(no "codebook" with the VQ quantiser, whose statistics are `state.extra["codebook_ema"]`).
A stage's optimizer (`make_optimizer` with the stage's `trainable` patterns) decides which
of them move; the steps compute the losses of SPEC section 2:

  inverse_warmup_step  paired: next-token CE through the world model fed the IDM's code,
                       plus the anti-collapse term.
  cycle_warmup_step    paired: NLL(P(h_T) -> h_TV) + NLL(P'(h_TV) -> h_T).
  inverse_joint_step   half paired, half text-only: L_ntp(paired) + 1e-5 L_proj(paired)
                       + L_ntp(text-only, IDM and world model fed mean P(h_T))
                       + 1e-5 L_cycle(text-only) + the anti-collapse terms.
  policy_bc_step       CE of the policy's code logits against the IDM's argmax code, at
                       every step of paired and text-only data.
  latent_sft_step      task dialogues: next-token CE of the world model conditioned on the
                       frozen policy's argmax code, or with codes="idm" the frozen IDM's
                       (the backbone and world model train).

Each is `step(state, batch, rng, *, system) -> (state, metrics)`; bind `system` with
functools.partial to get the `(state, batch, rng)` step that `training.train` jits.
Batches: the latent stages read {"paired": {"image": b, "text": b}, "text_only": b}
(`stages.data.latent_data`: "image" and "text" are the same samples with and without
their image, aligned token by token; "text_only" is absent in the no-text-only
ablation), latent_sft a plain dialogue batch. A batch b has input_ids, attention_mask,
loss_mask [B, T] and, with images, pixel_values and image_grid_thw.

Step t is the transition x_t -> x_{t+1}; it counts where x_t is real and x_{t+1} is a
learned token (`step_targets`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from latent_mca.latent.codebook import CODEBOOK_STATE, GUMBEL_RNG, RESTART_RNG, CodebookOutput
from latent_mca.latent.config import LatentConfig
from latent_mca.latent.heads import backbone_lm_head
from latent_mca.latent.losses import cross_entropy, masked_mean
from latent_mca.latent.model import LatentModules
from latent_mca.latent.projector import cycle_loss, gaussian_nll
from latent_mca.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from latent_mca.models.qwen2_5_vl.model import Qwen2_5_VL, abstract_params
from latent_mca.models.qwen2_5_vl.positions import mrope_positions
from latent_mca.training.state import TrainState

BACKBONE = "backbone"


class States(NamedTuple):
  """The backbone's view of a batch: h [B, T, D] (final-normed), positions [3, B, T],
  attention_mask [B, T]."""

  h: Any
  positions: Any
  attention_mask: Any


def _params_and_extra(backbone_params, variables: dict) -> tuple[dict, dict]:
  """(params, extra) of the backbone's params and the latent modules' variables
  ({module: {collection: tree}}): every module's "params", and the VQ codebook's state."""
  params, extra = {BACKBONE: backbone_params}, {}
  for name, collections in variables.items():
    if CODEBOOK_STATE in collections:
      extra[CODEBOOK_STATE] = collections[CODEBOOK_STATE]
    else:
      params[name] = collections["params"]
  return params, extra


# The ablation switches of `LatentConfig`, and those each stage's step reads (directly or
# through `LatentSystem.text_states`). A step must list every switch it reads: the others
# are turned on before it is compiled (`LatentSystem.for_step`).
SWITCHES = ("use_cycle", "use_projector", "use_text_only")
SWITCHES_READ = {
    "inverse_warmup": (),
    "cycle_warmup": (),
    "inverse_joint": SWITCHES,
    "policy_bc": ("use_projector", "use_text_only"),
    "latent_sft": (),
}


@dataclasses.dataclass(frozen=True)
class LatentSystem:
  """The backbone and the latent modules, with the functions every step composes.

  Hashable (frozen configs and modules), so it can be bound into a jitted step.
  """

  backbone: Qwen2_5_VL
  modules: LatentModules

  @classmethod
  def build(cls, backbone_config: Qwen2_5_VLConfig, config: LatentConfig) -> "LatentSystem":
    modules = LatentModules.build(backbone_config.text, config, dtype=backbone_config.dtype,
                                  param_dtype=backbone_config.param_dtype,
                                  remat=backbone_config.remat)
    return cls(Qwen2_5_VL(backbone_config), modules)

  @property
  def config(self) -> LatentConfig:
    return self.modules.world_model.config

  def with_switches_on(self, switches=SWITCHES) -> "LatentSystem":
    """This system with the given ablation switches on (`SWITCHES` by default)."""
    config = dataclasses.replace(self.config, **dict.fromkeys(switches, True))
    return self if config == self.config else LatentSystem.build(self.backbone.config, config)

  def for_acting(self) -> "LatentSystem":
    """This system with every ablation switch on. They change training only: acting
    (rollouts, the RL step) reads the policy, codebook and world model, so an ablation's
    acting programs become the full run's, and compile once."""
    return self.with_switches_on()

  def for_step(self, stage: str) -> "LatentSystem":
    """This system with the switches `STEPS[stage]` does not read (`SWITCHES_READ`) on:
    the step computes the same, and an ablation's step is the full run's program (its
    latent_sft always; its policy_bc without the cycle loss)."""
    read = SWITCHES_READ[stage]
    return self.with_switches_on([s for s in SWITCHES if s not in read])

  @property
  def vq(self) -> bool:
    return self.config.quantizer == "vq"

  # --------------------------------------------------------------------------- variables

  def init(self, backbone_params, rng) -> tuple[dict, dict]:
    """(params, extra): the given backbone and freshly initialised latent modules."""
    return _params_and_extra(backbone_params, self.modules.init(rng))

  def boxed_params(self) -> dict:
    """The shapes of `init`'s params (backbone and latent modules), boxed with their
    logical axis names (nn.Partitioned): what `latent_mca.parallel.mesh` shards by."""
    return _params_and_extra(abstract_params(self.backbone.config), self.modules.abstract())[0]

  def abstract(self, abstract_backbone) -> tuple[dict, dict]:
    """`init`'s (params, extra) as ShapeDtypeStructs (restore targets)."""
    return _params_and_extra(abstract_backbone, nn.meta.unbox(self.modules.abstract()))

  # --------------------------------------------------------------------------- pieces

  def backbone_states(self, backbone_params, batch) -> States:
    """The backbone's final-normed hidden states of a batch, with its M-RoPE positions."""
    grid = batch.get("image_grid_thw")
    positions, _ = mrope_positions(batch["input_ids"], batch["attention_mask"], grid,
                                   self.backbone.config)
    out = self.backbone.apply({"params": backbone_params}, batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              pixel_values=batch.get("pixel_values"), image_grid_thw=grid,
                              position_ids=positions, compute_logits=False)
    return States(out.hidden_states, positions, batch["attention_mask"])

  def infer_codes(self, params, extra, states: States, weights_bt,
                  rng=None) -> tuple[CodebookOutput, dict]:
    """The IDM's code for every step, quantised: (CodebookOutput, extra).

    rng None is deterministic (argmax, no Gumbel noise, no VQ update); otherwise the
    Gumbel noise (or the VQ EMA update and restarts, returned in extra) draw from it.
    """
    idm_out = self.modules.inverse_dynamics.apply({"params": params["inverse_dynamics"]},
                                                  states.h, states.positions,
                                                  states.attention_mask)
    deterministic = rng is None
    if self.vq:
      out, mutated = self.modules.codebook.apply(
          {CODEBOOK_STATE: extra[CODEBOOK_STATE]}, idm_out, weights_bt, deterministic,
          rngs={} if deterministic else {RESTART_RNG: rng}, mutable=[CODEBOOK_STATE])
      return out, {**extra, CODEBOOK_STATE: mutated[CODEBOOK_STATE]}
    out = self.modules.codebook.apply({"params": params["codebook"]}, idm_out, weights_bt,
                                      deterministic,
                                      rngs={} if deterministic else {GUMBEL_RNG: rng})
    return out, extra

  def code_embedding(self, params, extra, codes_bt):
    """codebook[codes]: [B, T] int -> [B, T, D]."""
    if self.vq:
      variables = {CODEBOOK_STATE: extra[CODEBOOK_STATE]}
    else:
      variables = {"params": params["codebook"]}
    return self.modules.codebook.apply(variables, codes_bt, method="lookup")

  def world_model_logits(self, params, h_btd, action_btd):
    """Logits [B, T, V] of x_{t+1} from (h_t, action_t), through the backbone's norm and head."""
    lm_head = backbone_lm_head(self.backbone, params[BACKBONE])
    return self.modules.world_model.apply({"params": params["world_model"]}, h_btd, action_btd,
                                          lm_head)

  def code_logits(self, params, extra, h_btd, codes_bt):
    """`world_model_logits` with the codes' embeddings as the actions: [B, T, V]."""
    return self.world_model_logits(params, h_btd, self.code_embedding(params, extra, codes_bt))

  def policy_logits(self, params, states: States):
    """The policy's code logits [B, T, C] of every step."""
    logits, _ = self.modules.policy.apply({"params": params["policy"]}, states.h,
                                          states.positions, states.attention_mask)
    return logits

  def project(self, params, h_btd, inverse: bool = False):
    """(mu, logvar) of P(h) (text -> image+text), or of P'(h) with inverse=True."""
    name = "inverse_projector" if inverse else "projector"
    module = self.modules.inverse_projector if inverse else self.modules.projector
    return module.apply({"params": params[name]}, h_btd)

  def text_states(self, params, states: States) -> States:
    """Text-only states as the latent model reads them: mean P(h_T), or raw without a projector.

    Stop-gradient: the projectors learn only from their NLL and cycle terms.
    """
    if not self.config.use_projector:
      return states
    mu, _ = self.project(params, jax.lax.stop_gradient(states.h))
    return states._replace(h=jax.lax.stop_gradient(mu))


def step_targets(batch):
  """(targets [B, T], weights [B, T]) of the steps: x_{t+1}, where x_t is real and
  x_{t+1} a real, learned token."""
  mask = batch["attention_mask"].astype(jnp.float32)
  learn = batch["loss_mask"].astype(jnp.float32) * mask
  targets = jnp.concatenate([batch["input_ids"][:, 1:],
                             jnp.zeros_like(batch["input_ids"][:, :1])], axis=1)
  weights = jnp.concatenate([mask[:, :-1] * learn[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return targets, weights


def token_weights(batch):
  """[B, T] float: the real, learned tokens (the projector losses' tokens)."""
  return batch["loss_mask"].astype(jnp.float32) * batch["attention_mask"].astype(jnp.float32)


def _correct(logits_btv, targets_bt, weights_bt):
  return jnp.sum((jnp.argmax(logits_btv, -1) == targets_bt) * weights_bt)


def _frozen_backbone(params):
  """params with the backbone under stop_gradient (its gradient is never computed)."""
  return {**params, BACKBONE: jax.lax.stop_gradient(params[BACKBONE])}


def world_model_ntp(system: LatentSystem, params, extra, states: States, targets, weights,
                    rng=None):
  """Next-token CE of the world model fed the IDM's codes.

  Returns ((ce_sum, count), correct, CodebookOutput, extra).
  """
  codes, extra = system.infer_codes(params, extra, states, weights, rng)
  logits = system.world_model_logits(params, states.h, codes.embedding)
  return cross_entropy(logits, targets, weights), _correct(logits, targets, weights), codes, extra


def _projection_nll(system: LatentSystem, params, h_text, h_image, weights):
  """(NLL(P(h_T) -> h_TV), NLL(P'(h_TV) -> h_T)), each (sum, count); inputs stop-gradient."""
  h_text, h_image = jax.lax.stop_gradient(h_text), jax.lax.stop_gradient(h_image)
  forward = gaussian_nll(*system.project(params, h_text), h_image, weights)
  backward = gaussian_nll(*system.project(params, h_image, inverse=True), h_text, weights)
  return forward, backward


def _update(state: TrainState, loss_fn, extra_out: bool = True):
  """value_and_grad of loss_fn(params) -> (loss, (metrics, extra)), then one update."""
  (loss, (metrics, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}
  return state.apply_gradients(grads, extra=extra if extra_out else state.extra), metrics


# ----------------------------------------------------------------------------- steps


def inverse_warmup_step(state: TrainState, batch, rng, *, system: LatentSystem):
  """Stage 1 on paired data: world-model next-token CE with the IDM's Gumbel code + entropy term.

  Metrics: loss, ntp_loss, ntp_accuracy, code_aux (the weighted anti-collapse or
  commitment term), perplexity and codes_used of the batch's codes, grad_norm.
  """
  image = batch["paired"]["image"]
  states = system.backbone_states(jax.lax.stop_gradient(state.params[BACKBONE]), image)
  targets, weights = step_targets(image)

  def loss_fn(params):
    params = _frozen_backbone(params)
    ntp, correct, codes, extra = world_model_ntp(system, params, state.extra, states, targets,
                                                 weights, rng)
    aux = masked_mean(codes.aux_loss)
    metrics = {"ntp_loss": masked_mean(ntp), "ntp_accuracy": correct / jnp.maximum(ntp[1], 1.0),
               "code_aux": aux, **codes.metrics}
    return masked_mean(ntp) + aux, (metrics, extra)

  return _update(state, loss_fn)


def cycle_warmup_step(state: TrainState, batch, rng, *, system: LatentSystem):
  """Stage 2 on paired data: NLL(P(h_T) -> h_TV) + NLL(P'(h_TV) -> h_T), per token.

  Metrics: loss, nll_forward (P), nll_inverse (P'), grad_norm.
  """
  del rng
  backbone = jax.lax.stop_gradient(state.params[BACKBONE])
  h_image = system.backbone_states(backbone, batch["paired"]["image"]).h
  h_text = system.backbone_states(backbone, batch["paired"]["text"]).h
  weights = token_weights(batch["paired"]["text"])

  def loss_fn(params):
    forward, backward = _projection_nll(system, params, h_text, h_image, weights)
    metrics = {"nll_forward": masked_mean(forward), "nll_inverse": masked_mean(backward)}
    return masked_mean(forward) + masked_mean(backward), (metrics, state.extra)

  return _update(state, loss_fn, extra_out=False)


def inverse_joint_step(state: TrainState, batch, rng, *, system: LatentSystem):
  """Stage 3: inverse dynamics, world model and projectors together (SPEC section 2).

  L = L_ntp(paired) + proj_nll_coef * L_proj(paired) + L_ntp(text-only, fed mean P(h_T))
      + cycle_coef * L_cycle(text-only) + the anti-collapse terms,
  with L_proj dropped without a projector, the text-only terms without text-only data,
  and L_cycle without the cycle loss (`LatentConfig.cycle_enabled`).

  Metrics: loss, ntp_loss_paired, ntp_loss_text_only, proj_nll, cycle_nll, code_aux,
  perplexity, codes_used (paired), grad_norm; the terms an ablation drops are absent.
  """
  cfg = system.config
  backbone = jax.lax.stop_gradient(state.params[BACKBONE])
  image = batch["paired"]["image"]
  states = system.backbone_states(backbone, image)
  targets, weights = step_targets(image)
  if cfg.use_projector:
    h_text = system.backbone_states(backbone, batch["paired"]["text"]).h
    align_weights = token_weights(batch["paired"]["text"])
  if cfg.use_text_only:
    text_only = batch["text_only"]
    text_states = system.backbone_states(backbone, text_only)
    text_targets, text_weights = step_targets(text_only)
  rng_paired, rng_text = jax.random.split(rng)

  def loss_fn(params):
    params = _frozen_backbone(params)
    ntp, _, codes, extra = world_model_ntp(system, params, state.extra, states, targets,
                                           weights, rng_paired)
    aux = masked_mean(codes.aux_loss)
    loss = masked_mean(ntp) + aux
    metrics = {"ntp_loss_paired": masked_mean(ntp), **codes.metrics}
    if cfg.use_projector:
      forward, backward = _projection_nll(system, params, h_text, states.h, align_weights)
      proj = masked_mean(forward) + masked_mean(backward)
      loss += cfg.proj_nll_coef * proj
      metrics["proj_nll"] = proj
    if cfg.use_text_only:
      fed = system.text_states(params, text_states)
      text_ntp, _, text_codes, extra = world_model_ntp(system, params, extra, fed, text_targets,
                                                       text_weights, rng_text)
      text_aux = masked_mean(text_codes.aux_loss)
      loss += masked_mean(text_ntp) + text_aux
      aux += text_aux
      metrics["ntp_loss_text_only"] = masked_mean(text_ntp)
      if cfg.cycle_enabled:
        cycle = masked_mean(cycle_loss(
            lambda h: system.project(params, h),
            lambda h: system.project(params, h, inverse=True),
            text_states.h, token_weights(text_only)))
        loss += cfg.cycle_coef * cycle
        metrics["cycle_nll"] = cycle
    metrics["code_aux"] = aux
    return loss, (metrics, extra)

  return _update(state, loss_fn)


def _bc_parts(system: LatentSystem, params, extra, batch):
  """[(states, IDM argmax codes, targets, weights)] of the paired part and, if any, the
  text-only part."""
  backbone = jax.lax.stop_gradient(params[BACKBONE])
  parts = []
  image = batch["paired"]["image"]
  parts.append((system.backbone_states(backbone, image), image))
  if "text_only" in batch and system.config.use_text_only:
    states = system.backbone_states(backbone, batch["text_only"])
    parts.append((system.text_states(params, states), batch["text_only"]))
  out = []
  for states, b in parts:
    targets, weights = step_targets(b)
    codes, _ = system.infer_codes(params, extra, states, weights)
    out.append((states, jax.lax.stop_gradient(codes.codes), targets, weights))
  return out


def policy_bc_step(state: TrainState, batch, rng, *, system: LatentSystem):
  """Stage 4: CE of the policy's code logits against the IDM's argmax code at every step.

  Paired states are the backbone's; text-only states are fed as the IDM saw them in
  stage 3 (mean P(h_T)). Metrics: loss, bc_accuracy (both parts), bc_accuracy_paired,
  bc_accuracy_text_only, token_accuracy_paired / _text_only (the world model's next-token
  accuracy fed the policy's argmax codes, before this step's update), grad_norm.
  """
  del rng
  parts = _bc_parts(system, state.params, state.extra, batch)
  names = ["paired", "text_only"][:len(parts)]
  frozen = jax.lax.stop_gradient(state.params)

  def loss_fn(params):
    total, count, correct, metrics = 0.0, 0.0, 0.0, {}
    for name, (states, codes, targets, weights) in zip(names, parts):
      logits = system.policy_logits(params, states._replace(h=jax.lax.stop_gradient(states.h)))
      ce_sum, n = cross_entropy(logits, codes, weights)
      hits = _correct(logits, codes, weights)
      total, count, correct = total + ce_sum, count + n, correct + hits
      metrics[f"bc_accuracy_{name}"] = hits / jnp.maximum(n, 1.0)
      # the tokens the policy's argmax codes decode to (other codes than the IDM's may
      # decode to the same token); no gradient
      written = system.code_logits(frozen, state.extra, jax.lax.stop_gradient(states.h),
                                   jnp.argmax(jax.lax.stop_gradient(logits), -1))
      metrics[f"token_accuracy_{name}"] = _correct(written, targets, weights) / jnp.maximum(
          n, 1.0)
    metrics["bc_accuracy"] = correct / jnp.maximum(count, 1.0)
    return total / jnp.maximum(count, 1.0), (metrics, state.extra)

  return _update(state, loss_fn, extra_out=False)


def policy_codes(system: LatentSystem, params, states: States):
  """The frozen policy's argmax code of every step: [B, T] int32, no gradient."""
  frozen = jax.lax.stop_gradient(params)
  logits = system.policy_logits(frozen, states._replace(h=jax.lax.stop_gradient(states.h)))
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


SFT_CODES = ("policy", "idm")


def latent_sft_sums(system: LatentSystem, params, extra, batch, codes: str = "policy") -> dict:
  """Sums of the world model's next-token CE on a dialogue batch, conditioned on the frozen
  policy's argmax code (codes="policy", SPEC) or the frozen IDM's (codes="idm": inferred
  from the next token, as in stages 1-3, so the world model keeps decoding each code its
  own way): {"loss_sum", "correct", "count"} plus "code_counts" [C] of those codes."""
  if codes not in SFT_CODES:
    raise ValueError(f"latent_sft codes must be one of {SFT_CODES}, got {codes!r}")
  states = system.backbone_states(params[BACKBONE], batch)
  targets, weights = step_targets(batch)
  if codes == "policy":
    codes = policy_codes(system, params, states)
  else:
    frozen = jax.lax.stop_gradient(params)
    idm, _ = system.infer_codes(frozen, extra, states._replace(h=jax.lax.stop_gradient(states.h)),
                                weights)
    codes = jax.lax.stop_gradient(idm.codes)
  action = system.code_embedding(jax.lax.stop_gradient(params), extra, codes)
  logits = system.world_model_logits(params, states.h, action)
  (loss_sum, count) = cross_entropy(logits, targets, weights)
  one_hot = jax.nn.one_hot(codes, system.config.num_codes)
  return {"loss_sum": loss_sum, "correct": _correct(logits, targets, weights), "count": count,
          "code_counts": jnp.sum(one_hot * weights[..., None], axis=(0, 1))}


def latent_sft_step(state: TrainState, batch, rng, *, system: LatentSystem,
                    codes: str = "policy"):
  """Stage 5 on task dialogues: world-model CE on the assistant tokens, with the frozen
  policy's argmax code as the action (or the IDM's: `latent_sft_sums`). Metrics: loss,
  accuracy, codes_used, grad_norm."""
  del rng

  def loss_fn(params):
    sums = latent_sft_sums(system, params, state.extra, batch, codes)
    count = jnp.maximum(sums["count"], 1.0)
    metrics = {"accuracy": sums["correct"] / count,
               "codes_used": jnp.sum(sums["code_counts"] > 0)}
    return sums["loss_sum"] / count, (metrics, state.extra)

  return _update(state, loss_fn, extra_out=False)


STEPS = {
    "inverse_warmup": inverse_warmup_step,
    "cycle_warmup": cycle_warmup_step,
    "inverse_joint": inverse_joint_step,
    "policy_bc": policy_bc_step,
    "latent_sft": latent_sft_step,
}


# ----------------------------------------------------------------------------- evaluation


def _resampled_codes(rng, codes_bt, weights_bt):
  """Codes drawn independently from the batch's weighted codes (their marginal): [B, T]."""
  flat_codes, flat_w = codes_bt.reshape(-1), weights_bt.reshape(-1)
  picks = jax.random.choice(rng, flat_codes.shape[0], flat_codes.shape,
                            p=flat_w / jnp.maximum(jnp.sum(flat_w), 1.0))
  return flat_codes[picks].reshape(codes_bt.shape)


def _most_frequent(codes_bt, weights_bt, num_codes: int):
  counts = jnp.sum(jax.nn.one_hot(codes_bt, num_codes) * weights_bt[..., None], axis=(0, 1))
  return jnp.argmax(counts), counts


def latent_eval_sums(system: LatentSystem, params, extra, batch, rng, *,
                     text_only: bool) -> dict:
  """Held-out sums of every latent measurement on one batch (deterministic codes).

  batch: a paired part {"image": b, "text": b} (text_only=False) or a text-only batch
  (text_only=True, fed as in stage 3). Sums, each over the batch's steps ("count"):
    wm_idm, wm_shuffled, wm_fixed  world-model CE with the IDM's codes, with codes
                                   resampled from their marginal over the batch, and
                                   with the batch's most frequent code for every step;
    wm_correct                     argmax hits with the IDM's codes;
    wm_policy_correct              argmax hits with the policy's argmax codes (the tokens
                                   the latent policy would write);
    bc_correct                     policy argmax == IDM code;
    code_counts [C]                how often each code is the IDM's;
  and for a paired part, over its text tokens ("tokens"): proj_nll (P), proj_nll_inverse
  (P'), proj_identity (the NLL of predicting h_TV by h_T with unit variance: the
  projector's baseline).
  """
  backbone = params[BACKBONE]
  b = batch if text_only else batch["image"]
  states = system.backbone_states(backbone, b)
  if text_only:
    states = system.text_states(params, states)
  targets, weights = step_targets(b)
  codes, _ = system.infer_codes(params, extra, states, weights)
  num_codes = system.config.num_codes
  fixed, counts = _most_frequent(codes.codes, weights, num_codes)

  def ce(code_ids):
    logits = system.code_logits(params, extra, states.h, code_ids)
    return logits, cross_entropy(logits, targets, weights)[0]

  logits, wm_idm = ce(codes.codes)
  _, wm_shuffled = ce(_resampled_codes(rng, codes.codes, weights))
  _, wm_fixed = ce(jnp.full_like(codes.codes, fixed))
  policy = policy_codes(system, params, states)
  out = {"wm_idm": wm_idm, "wm_shuffled": wm_shuffled, "wm_fixed": wm_fixed,
         "wm_correct": _correct(logits, targets, weights),
         "wm_policy_correct": _correct(system.code_logits(params, extra, states.h, policy),
                                       targets, weights),
         "bc_correct": jnp.sum((policy == codes.codes) * weights), "count": jnp.sum(weights),
         "code_counts": counts}
  if not text_only and system.config.use_projector:
    h_text = system.backbone_states(backbone, batch["text"]).h
    tokens = token_weights(batch["text"])
    forward, backward = _projection_nll(system, params, h_text, states.h, tokens)
    zeros = jnp.zeros_like(h_text)
    identity, _ = gaussian_nll(h_text, zeros, states.h, tokens)
    out.update(proj_nll=forward[0], proj_nll_inverse=backward[0], proj_identity=identity,
               tokens=forward[1])
  return out


def summarize_eval(sums: dict) -> dict:
  """Per-step / per-token means and codebook usage from summed `latent_eval_sums`."""
  count = max(float(sums["count"]), 1.0)
  out = {"wm_loss_idm": sums["wm_idm"] / count, "wm_loss_shuffled": sums["wm_shuffled"] / count,
         "wm_loss_fixed": sums["wm_fixed"] / count, "wm_accuracy": sums["wm_correct"] / count,
         "wm_accuracy_policy": sums["wm_policy_correct"] / count,
         "bc_accuracy": sums["bc_correct"] / count}
  counts = jnp.asarray(sums["code_counts"], jnp.float32)
  usage = counts / jnp.maximum(jnp.sum(counts), 1.0)
  out["perplexity"] = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(usage, usage)))
  out["codes_used"] = jnp.sum(counts > 0)
  out["bc_majority"] = jnp.max(usage)  # BC accuracy of always predicting the top code
  if "tokens" in sums:
    tokens = max(float(sums["tokens"]), 1.0)
    out.update(proj_nll=sums["proj_nll"] / tokens,
               proj_nll_inverse=sums["proj_nll_inverse"] / tokens,
               proj_identity=sums["proj_identity"] / tokens)
  return {k: float(v) for k, v in out.items()}


__all__ = ["LatentSystem", "States", "STEPS", "SWITCHES", "SWITCHES_READ", "step_targets",
           "token_weights", "world_model_ntp", "policy_codes", "latent_sft_sums", "latent_eval_sums",
           "summarize_eval", "inverse_warmup_step", "cycle_warmup_step", "inverse_joint_step",
           "policy_bc_step", "latent_sft_step"]
