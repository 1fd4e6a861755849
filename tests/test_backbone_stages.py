"""The backbone stages (pretrain, sft) and the batches they read, on a tiny world.

The `smoke` fixture (conftest) runs every stage of `pipeline.smoke_config()` once.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from latent_mca.data.processor import Processor
from latent_mca.jobs import pipeline
from latent_mca.models import qwen2_5_vl
from latent_mca.stages import backbone
from latent_mca.stages import data as data_lib
from latent_mca.training import checkpoint, metrics as metrics_lib, state as state_lib

def smoke_config():
  return pipeline.smoke_config()


def _workdir_with_data(smoke_workdir: str, tmp_path) -> str:
  """A fresh workdir sharing the smoke run's prepared data and tokenizer."""
  for name in ("data", "tokenizer"):
    os.symlink(os.path.join(smoke_workdir, name), tmp_path / name)
  return str(tmp_path)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_smoke_pipeline_trains_and_writes_its_outputs(smoke):
  config, workdir, metrics, _ = smoke
  for stage in ("pretrain", "sft"):
    assert metrics[f"{stage}/step"] == config[stage].num_steps
    # A few steps at a high rate already move the held-out loss well below its start.
    assert metrics[f"{stage}/eval/loss"] < metrics[f"{stage}/eval_initial/loss"] - 0.3, stage
    assert metrics[f"{stage}/tokens_per_s"] > 0
    folder = os.path.join(workdir, stage)
    for name in ("metrics.jsonl", "curves.png", "eval_initial.json", "hf/config.json",
                 "hf/model.safetensors", "hf/tokenizer.json"):
      assert os.path.isfile(os.path.join(folder, name)), (stage, name)
    records = metrics_lib.read_metrics(os.path.join(folder, "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r] == list(
        range(2, config[stage].num_steps + 1, 2))
  assert {"pretrain/eval/loss_paired", "pretrain/eval/loss_text_only", "sft/eval/loss_roleplay",
          "sft/eval/loss_personalised", "sft/accuracy"} <= set(metrics)
  # About ln(vocabulary) before training: the initial eval is of the random model.
  vocabulary = len(data_lib.load_tokenizer(config, workdir))
  with open(os.path.join(workdir, "pretrain", "eval_initial.json")) as f:
    assert abs(json.load(f)["loss"] - np.log(vocabulary)) < 0.5


def test_pretrain_rerun_reuses_its_final_checkpoint(smoke):
  config, workdir, metrics, _ = smoke
  config = config.copy_and_resolve_references()
  config.stages = "pretrain"
  again = pipeline.run(config, workdir)
  # Nothing trains again, so no throughput is measured; everything else is the first run's.
  assert "pretrain/tokens_per_s" not in again
  assert again == {k: v for k, v in metrics.items()
                   if k.startswith("pretrain/") and k != "pretrain/tokens_per_s"}


def test_train_step_overfits_a_fixed_batch(smoke):
  config, workdir, _, _ = smoke
  data = data_lib.pretrain_data(config, workdir)
  model_config = backbone.model_config(config, data.processor)
  model = qwen2_5_vl.Qwen2_5_VL(model_config)
  optimizer = state_lib.optimizer_config()
  optimizer.update(dict(learning_rate=1e-2, schedule="constant"))
  state = state_lib.TrainState.create(qwen2_5_vl.init_params(model_config, jax.random.key(1)),
                                      state_lib.make_optimizer(optimizer, 40), jax.random.key(0))
  batch = next(data_lib.train_loader(data, seed=0))
  assert batch["image_grid_thw"].shape[0] == config.pretrain.batch_size + 1
  step = jax.jit(functools.partial(backbone.train_step, model=model))
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.25 * losses[0], losses
  assert float(metrics["accuracy"]) > 0.5
  assert step._cache_size() == 1  # one compile for all steps


def test_batches_have_static_shapes(smoke):
  config, workdir, _, _ = smoke
  for stage, make in (("pretrain", data_lib.pretrain_data), ("sft", data_lib.sft_data)):
    data = make(config, workdir)
    loader = data_lib.train_loader(data, seed=0)
    batches = [next(loader) for _ in range(8)]
    shapes = {tuple((k, v.shape) for k, v in sorted(b.items())) for b in batches}
    assert len(shapes) == 1, shapes
    assert batches[0]["input_ids"].shape == (data.batch_size, config[stage].seq_len)
    if stage == "pretrain":
      # Paired and text-only examples mix, so the number of real images varies.
      images = {int((b["input_ids"] == data.processor.image_token_id).sum()) for b in batches}
      assert len(images) > 1, images


def test_sft_without_pretrain_names_the_missing_checkpoint(smoke, tmp_path):
  config, workdir, _, _ = smoke
  fresh = _workdir_with_data(workdir, tmp_path)
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"pretrain.*stages=pretrain"):
    backbone.sft(config, fresh)


def test_stages_without_prepared_data_say_so(tmp_path):
  with pytest.raises(data_lib.DataNotPreparedError, match="prepare_data"):
    backbone.pretrain(smoke_config(), str(tmp_path))


def _learned_and_context(processor: Processor, example: dict) -> tuple[str, str]:
  ids, mask = example["input_ids"], example["loss_mask"]
  return processor.decode(ids[mask == 1]), processor.decode(ids[mask == 0])


def test_loss_mask_covers_exactly_the_tokens_to_learn(smoke):
  config, workdir, _, _ = smoke
  processor = Processor(data_lib.load_tokenizer(config, workdir))
  image = np.zeros((56, 56, 3), np.uint8)  # 4 x 4 patches: 4 image tokens

  paired = data_lib.pretrain_example(
      processor, "paired", {"prompt": "How many stars?", "answer": "2", "image": image}, 96)
  learned, context = _learned_and_context(processor, paired)
  assert learned == "2<|endoftext|>"
  assert context == "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>How many stars?\n"
  assert paired["image_grid_thw"].tolist() == [[1, 4, 4]]
  document = "<|vision_start|><|image_pad|><|vision_end|>How many stars?\n2<|endoftext|>"
  whole = processor(document, images=[image])  # tokenized in one go
  np.testing.assert_array_equal(paired["input_ids"], whole["input_ids"][0])

  text = data_lib.pretrain_example(processor, "text_only", {"text": "A red circle."}, 96)
  assert text["loss_mask"].all() and processor.decode(text["input_ids"]) == (
      "A red circle.<|endoftext|>")
  cut = data_lib.pretrain_example(processor, "text_only", {"text": "A red circle. " * 20}, 7)
  assert len(cut["input_ids"]) == 7

  # Role-play with two exchanges: both assistant turns are learned, nothing else.
  source = data_lib.load_sources(config, workdir, ["roleplay/sft"])["roleplay/sft"]
  example = next(e for e in map(data_lib.decode_example, (source[i] for i in range(len(source))))
                 if len(e["dialogue"]) == 4)
  encoded = data_lib.sft_example(processor, "roleplay", example, 4096)
  replies = [t["text"] for t in example["dialogue"] if t["role"] == "assistant"]
  learned, context = _learned_and_context(processor, encoded)
  assert learned == "".join(r + "<|im_end|>" for r in replies)
  assert replies[0] not in context and example["dialogue"][2]["text"] in context
  # The segments tokenize exactly as the processor tokenizes the whole conversation.
  whole = processor(data_lib.DIALOGUE_MESSAGES["roleplay"](example, include_reply=True),
                    images=[example["image"]])
  np.testing.assert_array_equal(encoded["input_ids"], whole["input_ids"][0])
  np.testing.assert_array_equal(encoded["pixel_values"], whole["pixel_values"])

  # In a batch, padding and image tokens are never learned.
  encoded = data_lib.sft_example(processor, "roleplay", example, config.sft.seq_len)
  batch = data_lib.sft_data(config, workdir).collate_fn([encoded, paired])
  assert not (batch["loss_mask"] * (1 - batch["attention_mask"])).any()
  assert not batch["loss_mask"][batch["input_ids"] == processor.image_token_id].any()
  assert batch["loss_mask"].sum() == encoded["loss_mask"].sum() + paired["loss_mask"].sum()


def test_seq_len_that_cuts_an_image_is_an_error(smoke):
  config, workdir, _, _ = smoke
  processor = Processor(data_lib.load_tokenizer(config, workdir))
  example = {"prompt": "How many stars?", "answer": "2", "image": np.zeros((56, 56, 3), np.uint8)}
  with pytest.raises(ValueError, match="seq_len=3"):
    data_lib.pretrain_example(processor, "paired", example, 3)


def test_decode_example_restores_the_task_schema():
  raw = {"id": b"x", "dialogue": {"role": [b"user", b"assistant"], "text": [b"hi", b"yo"]},
         "character": {"name": b"Pip"}, "image": np.zeros((2, 2, 3), np.uint8)}
  out = data_lib.decode_example(raw)
  assert out["dialogue"] == [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]
  assert out["character"] == {"name": "Pip"} and out["id"] == "x"
  assert out["image"].shape == (2, 2, 3)


def test_hf_folder_gives_the_trained_logits(smoke):
  config, workdir, _, _ = smoke
  data = data_lib.sft_data(config, workdir)
  model_config = backbone.model_config(config, data.processor)
  trained = checkpoint.load_params(os.path.join(workdir, "sft"))
  loaded_model, loaded = qwen2_5_vl.from_pretrained(os.path.join(workdir, "sft", "hf"))
  assert loaded_model.config.text == model_config.text
  assert loaded_model.config.image_token_id == data.processor.image_token_id
  example = data.eval["roleplay"][0]
  inputs = dict(input_ids=example["input_ids"][None], pixel_values=example["pixel_values"],
                image_grid_thw=example["image_grid_thw"])
  want = qwen2_5_vl.Qwen2_5_VL(model_config).apply({"params": trained}, **inputs).logits
  got = loaded_model.apply({"params": loaded}, **inputs).logits
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The folder holds the fine-tuned model, not pretrain's.
  pretrained = checkpoint.load_params(os.path.join(workdir, "pretrain"))
  assert not np.allclose(pretrained["embed_tokens"]["embedding"],
                         loaded["embed_tokens"]["embedding"])

  import torch
  import transformers
  reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      os.path.join(workdir, "sft", "hf"), dtype=torch.float32).eval()
  is_image = inputs["input_ids"] == data.processor.image_token_id  # transformers 5 needs it
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(inputs["input_ids"], dtype=torch.long),
                    pixel_values=torch.tensor(inputs["pixel_values"]),
                    image_grid_thw=torch.tensor(inputs["image_grid_thw"], dtype=torch.long),
                    mm_token_type_ids=torch.tensor(is_image.astype(np.int64)))
  np.testing.assert_allclose(out.logits.numpy(), np.asarray(want), atol=1e-4, rtol=1e-4)


class _Killed(Exception):
  """Stands in for the process dying."""


class _DiesAt:
  """A loader that dies when asked for batch `at` (1-based), as a kill between two steps."""

  def __init__(self, loader, at: int):
    self.loader, self.at, self.served = loader, at, 0

  def __next__(self):
    self.served += 1
    if self.served == self.at:
      raise _Killed
    return next(self.loader)

  def state(self):
    return self.loader.state()

  def restore(self, position):
    self.loader.restore(position)


def test_killed_pretrain_resumes_to_the_uninterrupted_params(smoke, tmp_path, monkeypatch):
  config, workdir, _, _ = smoke
  resumed = _workdir_with_data(workdir, tmp_path)
  make_loader = data_lib.train_loader

  def dies_at_step_13(data, seed):
    return _DiesAt(make_loader(data, seed), at=13)  # after steps 1-12; the last checkpoint is 8

  monkeypatch.setattr(data_lib, "train_loader", dies_at_step_13)
  with pytest.raises(_Killed):
    backbone.pretrain(config, resumed)
  monkeypatch.setattr(data_lib, "train_loader", make_loader)
  backbone.pretrain(config, resumed)

  straight = _host(checkpoint.load_params(os.path.join(workdir, "pretrain")))
  again = _host(checkpoint.load_params(os.path.join(resumed, "pretrain")))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(straight)[0],
                          jax.tree.leaves(again)):
    assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
  assert (metrics_lib.read_metrics(os.path.join(resumed, "pretrain", "metrics.jsonl")) ==
          metrics_lib.read_metrics(os.path.join(workdir, "pretrain", "metrics.jsonl")))
