"""The latent action model's stages on the smoke world: data, steps, parameters, resume."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.data.batching import DataLoader, ZipLoader
from latent_mca.data.processor import Processor
from latent_mca.latent import steps as steps_lib
from latent_mca.latent.losses import cross_entropy, masked_mean
from latent_mca.stages import backbone as backbone_lib
from latent_mca.stages import data as data_lib
from latent_mca.stages import latent
from latent_mca.training import checkpoint, metrics as metrics_lib, state as state_lib
from tests.test_backbone_stages import _DiesAt, _host, _Killed, _workdir_with_data

STAGES = latent.ORDER


def _setup(config, workdir, stage, **latent_changes):
  """(system, initial (params, extra), one training batch) of a stage on the smoke world."""
  config = config.copy_and_resolve_references()
  config.latent.update(latent_changes)
  cfg = latent.latent_config(config)
  processor = Processor(data_lib.load_tokenizer(config, workdir))
  model_cfg = backbone_lib.model_config(config, processor)
  system = steps_lib.LatentSystem.build(model_cfg, cfg)
  params, extra = latent.initial_variables(config, workdir, stage, system, model_cfg)
  c = config[stage]
  if stage == "latent_sft":
    batch = next(data_lib.train_loader(data_lib.sft_data(config, workdir, c), seed=0))
  else:
    parts = ["paired"] + (["text_only"] if stage in ("inverse_joint", "policy_bc") and
                          cfg.use_text_only else [])
    data = data_lib.latent_data(config, workdir, c.seq_len, c.batch_size // len(parts))
    batch = {p: next(DataLoader(data[p].train, data[p].batch_size,
                                collate_fn=data[p].collate_fn)) for p in parts}
  return config, system, params, extra, batch


def _one_step(config, system, params, extra, batch, stage, frozen=(), **static):
  optimizer = config[stage].optimizer.copy_and_resolve_references()
  optimizer.update(dict(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                        grad_clip_norm=0.0))
  tx = state_lib.make_optimizer(optimizer, 10, frozen=frozen)
  state = state_lib.TrainState.create(params, tx, jax.random.key(0), extra)
  step = jax.jit(functools.partial(steps_lib.STEPS[stage], system=system, **static))
  return step(state, batch, jax.random.key(1))


def _changed_paths(before, after) -> set[str]:
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_after = jax.tree.leaves(after)
  return {state_lib.param_path(path) for (path, a), b in zip(flat_before, flat_after)
          if not np.array_equal(np.asarray(a), np.asarray(b))}


def _paths(params) -> set[str]:
  return {state_lib.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


# ----------------------------------------------------------------------------- the smoke run


def test_every_latent_stage_finishes_and_writes_its_measurements(smoke):
  config, workdir, metrics, _ = smoke
  for stage in STAGES:
    assert metrics[f"{stage}/step"] == config[stage].num_steps, stage
    folder = os.path.join(workdir, stage)
    for name in ("metrics.jsonl", "curves.png", "eval_initial.json"):
      assert os.path.isfile(os.path.join(folder, name)), (stage, name)
    records = metrics_lib.read_metrics(os.path.join(folder, "metrics.jsonl"))
    assert records[-1]["step"] == config[stage].num_steps
  for stage in STAGES[:-1]:
    for name in ("wm_loss_idm", "wm_loss_shuffled", "wm_loss_fixed", "wm_accuracy",
                 "wm_accuracy_policy", "perplexity",
                 "codes_used", "bc_accuracy", "bc_majority"):
      for part in ("paired", "text_only"):
        assert f"{stage}/eval/{name}_{part}" in metrics, (stage, name, part)
    for name in ("proj_nll", "proj_nll_inverse", "proj_identity"):
      assert f"{stage}/eval/{name}_paired" in metrics, (stage, name)
    assert 1 <= metrics[f"{stage}/eval/codes_used_paired"] <= config.latent.num_codes
    assert 1.0 <= metrics[f"{stage}/eval/perplexity_paired"] <= config.latent.num_codes + 1e-3
  # Each stage's training metrics are its own losses.
  assert {"inverse_warmup/ntp_loss", "inverse_warmup/perplexity", "cycle_warmup/nll_forward",
          "cycle_warmup/nll_inverse", "inverse_joint/proj_nll", "inverse_joint/cycle_nll",
          "inverse_joint/ntp_loss_text_only", "policy_bc/bc_accuracy_text_only",
          "latent_sft/accuracy", "latent_sft/eval/loss_roleplay"} <= set(metrics)
  # A few steps at a high rate already fit the projectors and the policy.
  assert (metrics["cycle_warmup/eval/proj_nll_paired"] <
          metrics["cycle_warmup/eval_initial/proj_nll_paired"])
  assert (metrics["policy_bc/eval/bc_accuracy_paired"] >
          metrics["policy_bc/eval_initial/bc_accuracy_paired"])
  assert metrics["latent_sft/eval/loss"] < metrics["latent_sft/eval_initial/loss"]


def test_a_stage_without_its_predecessor_names_it(smoke, tmp_path):
  config, workdir, _, _ = smoke
  fresh = _workdir_with_data(workdir, tmp_path)
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"inverse_joint.*stages=inverse_joint"):
    latent.run_stage(config, fresh, "policy_bc")
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"pretrain"):
    latent.run_stage(config, fresh, "inverse_warmup")


def test_no_projector_skips_cycle_warmup_and_starts_joint_from_inverse_warmup(smoke):
  config, _, _, _ = smoke
  config = config.copy_and_resolve_references()
  config.latent.use_projector = False
  cfg = latent.latent_config(config)
  assert not latent.enabled("cycle_warmup", cfg)
  assert latent.source_stage("inverse_joint", config, cfg) == "inverse_warmup"
  assert latent.run_stage(config, "/nonexistent", "cycle_warmup") == {}
  assert latent.source_stage("inverse_warmup", config, cfg) == "pretrain"


def test_bad_latent_config_is_named(smoke):
  config, workdir, _, _ = smoke
  config = config.copy_and_resolve_references()
  config.latent.quantizer = "kmeans"
  with pytest.raises(ValueError, match="quantizer='kmeans'"):
    latent.run_stage(config, workdir, "inverse_warmup")


# ----------------------------------------------------------------------------- data


def test_paired_views_are_aligned_token_by_token(smoke):
  config, workdir, _, _ = smoke
  data = data_lib.latent_data(config, workdir, seq_len=64, batch_size=4)
  batch = next(DataLoader(data["paired"].train, 4, collate_fn=data["paired"].collate_fn))
  image, text = batch["image"], batch["text"]
  assert image["input_ids"].shape == text["input_ids"].shape == (4, 64)
  real = text["attention_mask"] == 1
  np.testing.assert_array_equal(image["input_ids"][real], text["input_ids"][real])
  processor = data["paired"].processor
  # The text view has no image tokens; the image view has the text view's tokens plus them.
  assert not np.any(text["input_ids"][real] == processor.image_token_id)
  extra = image["attention_mask"].sum(1) - text["attention_mask"].sum(1)
  assert np.all(extra == (image["input_ids"] == processor.image_token_id).sum(1) + 2)
  # All of the text is learned, nothing of the image block.
  assert np.all(text["loss_mask"][real] == 1)
  assert np.all(image["loss_mask"][image["input_ids"] == processor.image_token_id] == 0)


def test_zip_loader_resumes_every_part():
  a = DataLoader(list(range(10)), 2, collate_fn=list, seed=1)
  b = DataLoader(list(range(7)), 3, collate_fn=list, seed=2)
  zipped = ZipLoader({"a": a, "b": b})
  next(zipped)
  position = zipped.state()
  expected = [next(zipped) for _ in range(4)]
  again = ZipLoader({"a": DataLoader(list(range(10)), 2, collate_fn=list),
                     "b": DataLoader(list(range(7)), 3, collate_fn=list)})
  again.restore(position)
  assert [next(again) for _ in range(4)] == expected
  with pytest.raises(ValueError, match="loaders"):
    again.restore({"a": position["a"]})


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_changes_exactly_its_parameters(smoke, stage):
  config, workdir, _, _ = smoke
  config, system, params, extra, batch = _setup(config, workdir, stage)
  state, metrics = _one_step(config, system, params, extra, batch, stage)
  assert np.isfinite(float(metrics["loss"]))
  intended = set(state_lib.trainable_paths(params, config[stage].optimizer.trainable))
  changed = _changed_paths(params, state.params)
  assert changed == intended, (sorted(changed ^ intended))
  expected_modules = {
      "inverse_warmup": {"inverse_dynamics", "codebook", "world_model"},
      "cycle_warmup": {"projector", "inverse_projector"},
      "inverse_joint": {"inverse_dynamics", "codebook", "world_model", "projector",
                        "inverse_projector"},
      "policy_bc": {"policy"},
      "latent_sft": {"backbone", "world_model"},
  }[stage]
  assert {p.split("/")[0] for p in changed} == expected_modules
  if stage == "latent_sft":  # the language model trains, the vision tower does not
    assert not any(p.startswith("backbone/visual/") for p in changed)
    assert any(p.startswith("backbone/decoder/") for p in changed)


def test_latent_sft_conditions_on_the_policys_or_the_idms_codes(smoke):
  config, workdir, _, _ = smoke
  config, system, params, extra, batch = _setup(config, workdir, "latent_sft")
  # Jitted: the batch's dummy images fail the eager-only image check (`batching`).
  states = jax.jit(system.backbone_states)(params["backbone"], batch)
  targets, weights = steps_lib.step_targets(batch)
  idm = system.infer_codes(params, extra, states, weights)[0].codes
  policy = steps_lib.policy_codes(system, params, states)
  for name, codes in (("policy", policy), ("idm", idm)):
    sums = jax.jit(functools.partial(steps_lib.latent_sft_sums, system, codes=name))(
        params, extra, batch)
    counts = np.bincount(np.asarray(codes).ravel(), np.asarray(weights).ravel(),
                         minlength=system.config.num_codes)
    np.testing.assert_allclose(np.asarray(sums["code_counts"]), counts, err_msg=name)
    logits = system.world_model_logits(params, states.h,
                                       system.code_embedding(params, extra, codes))
    loss_sum, _ = cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(float(sums["loss_sum"]), float(loss_sum), rtol=1e-5)
  assert not np.array_equal(np.asarray(idm), np.asarray(policy))
  # Either way the IDM and the policy stay frozen: the stage trains the same parameters.
  state, _ = _one_step(config, system, params, extra, batch, "latent_sft", codes="idm")
  assert _changed_paths(params, state.params) == set(
      state_lib.trainable_paths(params, config.latent_sft.optimizer.trainable))
  with pytest.raises(ValueError, match="latent_sft codes"):
    steps_lib.latent_sft_sums(system, params, extra, batch, codes="argmax")


def test_no_projector_ablation_freezes_the_projectors(smoke):
  config, workdir, _, _ = smoke
  config, system, params, extra, batch = _setup(config, workdir, "inverse_joint",
                                                use_projector=False)
  state, metrics = _one_step(config, system, params, extra, batch, "inverse_joint",
                             frozen=latent._PROJECTORS)
  changed = {p.split("/")[0] for p in _changed_paths(params, state.params)}
  assert changed == {"inverse_dynamics", "codebook", "world_model"}
  assert "proj_nll" not in metrics and "cycle_nll" not in metrics
  assert "ntp_loss_text_only" in metrics


def _step_jaxpr(config, system, params, extra, batch, stage) -> str:
  tx = state_lib.make_optimizer(config[stage].optimizer, 10)
  state = state_lib.TrainState.create(params, tx, jax.random.key(0), extra)
  step = functools.partial(steps_lib.STEPS[stage], system=system)
  return str(jax.make_jaxpr(step)(state, batch, jax.random.key(1)))


@pytest.mark.parametrize("stage", STAGES)
def test_a_step_reads_no_switch_beyond_its_switches_read(smoke, stage):
  # `for_step` turns the unread switches on, so that an ablation shares the full run's
  # program: turning them off must leave the step's computation (its jaxpr) unchanged.
  config, workdir, _, _ = smoke
  config, system, params, extra, batch = _setup(config, workdir, stage)
  unread = [s for s in steps_lib.SWITCHES if s not in steps_lib.SWITCHES_READ[stage]]
  ablated = steps_lib.LatentSystem.build(system.backbone.config,
                                         system.config.replace(**dict.fromkeys(unread, False)))
  assert ablated.for_step(stage) == system and latent.train_step(stage, ablated) is (
      latent.train_step(stage, system))
  expected = _step_jaxpr(config, system, params, extra, batch, stage)
  if unread:
    assert _step_jaxpr(config, ablated, params, extra, batch, stage) == expected
  if stage == "policy_bc":  # a switch it reads does change it (the check can fail)
    raw = steps_lib.LatentSystem.build(system.backbone.config,
                                       system.config.replace(use_projector=False))
    assert _step_jaxpr(config, raw, params, extra, batch, stage) != expected


def test_joint_loss_is_the_sum_of_its_terms(smoke):
  config, workdir, _, _ = smoke
  for changes, terms in (
      ({}, ("ntp_loss_paired", "ntp_loss_text_only", "proj_nll", "cycle_nll")),
      ({"use_cycle": False}, ("ntp_loss_paired", "ntp_loss_text_only", "proj_nll")),
      ({"use_text_only": False}, ("ntp_loss_paired", "proj_nll")),
      ({"use_projector": False}, ("ntp_loss_paired", "ntp_loss_text_only"))):
    cfg, system, params, extra, batch = _setup(config, workdir, "inverse_joint", **changes)
    _, m = _one_step(cfg, system, params, extra, batch, "inverse_joint")
    m = {k: float(v) for k, v in m.items()}
    coef = {"proj_nll": cfg.latent.proj_nll_coef, "cycle_nll": cfg.latent.cycle_coef}
    expected = sum(coef.get(t, 1.0) * m[t] for t in terms) + m["code_aux"]
    assert m["loss"] == pytest.approx(expected, rel=1e-5), changes
    absent = {"ntp_loss_text_only", "proj_nll", "cycle_nll"} - set(terms)
    assert not absent & set(m), changes


def test_text_only_states_go_through_the_projector_mean(smoke):
  config, workdir, _, _ = smoke
  _, system, params, _, batch = _setup(config, workdir, "policy_bc")
  states = system.backbone_states(params["backbone"], batch["text_only"])
  fed = system.text_states(params, states)
  mu, _ = system.project(params, states.h)
  np.testing.assert_allclose(fed.h, mu, rtol=1e-6)
  _, system_raw, _, _, _ = _setup(config, workdir, "policy_bc", use_projector=False)
  assert system_raw.text_states(params, states).h is states.h


def test_vq_quantiser_trains_through_its_ema_statistics(smoke):
  config, workdir, _, _ = smoke
  config = config.copy_and_resolve_references()
  config.latent.quantizer = "vq"
  cfg = latent.latent_config(config)
  processor = Processor(data_lib.load_tokenizer(config, workdir))
  model_cfg = backbone_lib.model_config(config, processor)
  system = steps_lib.LatentSystem.build(model_cfg, cfg)
  backbone = checkpoint.load_params(os.path.join(workdir, "pretrain"))
  params, extra = system.init(backbone, jax.random.key(0))
  assert "codebook" not in params and "codebook_ema" in extra
  _, _, _, _, batch = _setup(config, workdir, "inverse_warmup")
  state, metrics = _one_step(config, system, params, extra, batch, "inverse_warmup")
  assert {p.split("/")[0] for p in _changed_paths(params, state.params)} == {
      "inverse_dynamics", "world_model"}
  assert not np.array_equal(state.extra["codebook_ema"]["counts"], extra["codebook_ema"]["counts"])
  assert float(metrics["code_aux"]) > 0  # the commitment term


def test_policy_bc_targets_are_the_idm_argmax_codes(smoke):
  config, workdir, _, _ = smoke
  _, system, params, extra, batch = _setup(config, workdir, "policy_bc")
  # Jitted: a padded image budget fails the model's eager host-side check by design.
  parts = jax.jit(functools.partial(steps_lib._bc_parts, system))(params, extra, batch)
  states, codes, targets, weights = parts[0]
  step_targets, step_weights = steps_lib.step_targets(batch["paired"]["image"])
  idm = system.modules.inverse_dynamics.apply({"params": params["inverse_dynamics"]},
                                              states.h, states.positions, states.attention_mask)
  np.testing.assert_array_equal(codes, jnp.argmax(idm, -1))
  assert len(parts) == 2  # paired and text-only
  np.testing.assert_array_equal(weights, step_weights)
  np.testing.assert_array_equal(targets, step_targets)
  # The BC loss by hand: mean over weighted steps of -log softmax(policy)[IDM code].
  logits = system.policy_logits(params, states)
  log_p = jax.nn.log_softmax(logits, -1)
  picked = np.take_along_axis(np.asarray(log_p), np.asarray(codes)[..., None], -1)[..., 0]
  w = np.asarray(weights)
  paired_ce = -(picked * w).sum() / w.sum()
  total, count = steps_lib.cross_entropy(logits, codes, weights)
  assert float(masked_mean((total, count))) == pytest.approx(paired_ce, rel=1e-5)


def test_policy_bc_reports_the_tokens_its_codes_decode_to(smoke):
  """token_accuracy_<part>: the world model's next-token hits fed the policy's argmax codes,
  as latent_sft_sums(codes="policy") counts them, before the step's update."""
  config, workdir, _, _ = smoke
  config, system, params, extra, batch = _setup(config, workdir, "policy_bc")
  _, metrics = _one_step(config, system, params, extra, batch, "policy_bc")
  sums = jax.jit(functools.partial(steps_lib.latent_sft_sums, system, codes="policy"))(
      params, extra, batch["paired"]["image"])
  expected = float(sums["correct"]) / float(sums["count"])
  assert float(metrics["token_accuracy_paired"]) == pytest.approx(expected, abs=1e-6)
  assert 0.0 <= float(metrics["token_accuracy_text_only"]) <= 1.0


def test_step_targets_count_learned_transitions():
  batch = {"input_ids": jnp.array([[0, 5, 6, 7, 8]]),
           "attention_mask": jnp.array([[0, 1, 1, 1, 1]]),
           "loss_mask": jnp.array([[0, 0, 1, 1, 0]])}
  targets, weights = steps_lib.step_targets(batch)
  np.testing.assert_array_equal(targets, [[5, 6, 7, 8, 0]])
  # Step t counts where x_t is real and x_{t+1} is learned: t = 1 (-> 6) and t = 2 (-> 7).
  np.testing.assert_array_equal(weights, [[0, 1, 1, 0, 0]])


# ----------------------------------------------------------------------------- resume


# Slow (~1 min alone, the suite's second longest): the latent stages resume through
# `training.loop.train`, whose bit-exact resume CI tests in test_training_loop.py and with
# pretrain in test_backbone_stages.py.
@pytest.mark.slow
def test_killed_latent_stage_resumes_to_the_uninterrupted_params(smoke, tmp_path, monkeypatch):
  config, workdir, _, _ = smoke
  stage = "inverse_joint"  # Gumbel noise, two zipped loaders, the projector terms
  resumed = _workdir_with_data(workdir, tmp_path)
  for name in ("pretrain", "inverse_warmup", "cycle_warmup"):
    os.symlink(os.path.join(workdir, name), os.path.join(resumed, name))
  make_zip = latent.ZipLoader
  monkeypatch.setattr(latent, "ZipLoader", lambda loaders: _DiesAt(make_zip(loaders), at=5))
  with pytest.raises(_Killed):  # after steps 1-4; the last checkpoint is 4 (every 2)
    latent.run_stage(config, resumed, stage)
  monkeypatch.setattr(latent, "ZipLoader", make_zip)
  latent.run_stage(config, resumed, stage)

  def final(folder):
    return _host(checkpoint.load_final(os.path.join(folder, stage), {"params": None}))

  straight, again = final(workdir), final(resumed)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(straight)[0],
                          jax.tree.leaves(again)):
    assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
  assert (metrics_lib.read_metrics(os.path.join(resumed, stage, "metrics.jsonl")) ==
          metrics_lib.read_metrics(os.path.join(workdir, stage, "metrics.jsonl")))
  with open(os.path.join(resumed, stage, "eval_initial.json")) as f:
    assert json.load(f)["wm_loss_idm_paired"] > 0
