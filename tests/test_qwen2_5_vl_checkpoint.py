"""Checkpoint I/O: key layouts, shards, dtypes, a transformers round trip and error messages."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from latent_mca.models import qwen2_5_vl
from tests.conftest import IMAGE, image_prompt, left_pad, random_pixels

GRID = np.array([[1, 8, 12]])


def _inputs():
  ids, mask = left_pad([image_prompt(24), [3, 4, 5]])
  return ids, mask, random_pixels(GRID), GRID


def _logits(model, params):
  ids, mask, pixels, grid = _inputs()
  out = model.apply({"params": params}, ids, attention_mask=mask, pixel_values=pixels,
                    image_grid_thw=grid)
  return np.asarray(out.logits, np.float32), mask.astype(bool)


def _reference_logits(ref):
  ids, mask, pixels, grid = _inputs()
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
               mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64))).logits.numpy()


def test_save_then_transformers_load_round_trip(reference, tmp_path):
  _, folder = reference
  model, params = qwen2_5_vl.from_pretrained(folder)
  # Perturb the weights so the round trip cannot pass by re-reading the original files.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  qwen2_5_vl.save_pretrained(model, params, str(tmp_path / "saved"))
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "saved"))
  ours, mask = _logits(model, params)
  np.testing.assert_allclose(ours[mask], _reference_logits(ref.eval())[mask], atol=1e-4, rtol=0)


def test_new_key_layout_loads(reference, tmp_path):
  _, folder = reference
  state = load_file(os.path.join(folder, "model.safetensors"))
  renamed = {}
  for k, v in state.items():
    if k.startswith("model."):
      k = "model.language_model." + k[len("model."):]
    elif k.startswith("visual."):
      k = "model." + k
    renamed[k] = v
  assert any(k.startswith("model.language_model.layers.") for k in renamed)
  os.makedirs(tmp_path / "new")
  save_file(renamed, str(tmp_path / "new" / "model.safetensors"))
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "new")
  model, params = qwen2_5_vl.from_pretrained(folder)
  _, params_new = qwen2_5_vl.from_pretrained(str(tmp_path / "new"))
  jax.tree.map(np.testing.assert_array_equal, params, params_new)


def test_sharded_save_loads_in_both_implementations(reference, tmp_path):
  ref, folder = reference
  model, params = qwen2_5_vl.from_pretrained(folder)
  out = str(tmp_path / "sharded")
  qwen2_5_vl.save_pretrained(model, params, out, max_shard_bytes=64 * 1024)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and os.path.isfile(os.path.join(out, qwen2_5_vl.checkpoint.INDEX_NAME))
  _, params_back = qwen2_5_vl.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, params, params_back)
  ref_back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_array_equal(_reference_logits(ref_back), _reference_logits(ref))


def test_bf16_load_and_save(reference, tmp_path):
  _, folder = reference
  model32, params32 = qwen2_5_vl.from_pretrained(folder)
  model, params = qwen2_5_vl.from_pretrained(folder, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  got, mask = _logits(model, params)
  want, _ = _logits(model32, params32)
  scale = np.abs(want[mask]).max()
  assert np.abs(got[mask] - want[mask]).max() < 0.1 * scale  # bf16 rounding, not a wrong mapping
  qwen2_5_vl.save_pretrained(model, params, str(tmp_path / "bf16"))
  assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "bf16"))
  assert ref.lm_head.weight.dtype == torch.bfloat16


def test_missing_and_misshapen_tensors_are_all_named(reference, tmp_path):
  _, folder = reference
  state = load_file(os.path.join(folder, "model.safetensors"))
  del state["model.layers.1.mlp.up_proj.weight"]
  del state["visual.merger.mlp.0.bias"]
  state["model.layers.0.self_attn.k_proj.bias"] = state["model.layers.0.self_attn.k_proj.bias"][:3]
  os.makedirs(tmp_path / "bad")
  save_file(state, str(tmp_path / "bad" / "model.safetensors"))
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "bad")
  with pytest.raises(qwen2_5_vl.CheckpointError) as e:
    qwen2_5_vl.from_pretrained(str(tmp_path / "bad"))
  msg = str(e.value)
  assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
  assert "missing tensor visual.merger.mlp.0.bias" in msg
  assert "model.layers.0.self_attn.k_proj.bias has shape [3]" in msg


def test_missing_folder_config_and_shard_are_named(reference, tmp_path):
  _, folder = reference
  with pytest.raises(FileNotFoundError, match="does not exist"):
    qwen2_5_vl.from_pretrained(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "noconfig")
  with pytest.raises(FileNotFoundError, match="config.json"):
    qwen2_5_vl.from_pretrained(str(tmp_path / "noconfig"))
  os.makedirs(tmp_path / "noweights")
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "noweights")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    qwen2_5_vl.from_pretrained(str(tmp_path / "noweights"))
  with open(tmp_path / "noweights" / qwen2_5_vl.checkpoint.INDEX_NAME, "w") as f:
    json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
  with pytest.raises(qwen2_5_vl.CheckpointError, match="model-00001-of-00002"):
    qwen2_5_vl.from_pretrained(str(tmp_path / "noweights"))


def test_corrupt_shard_and_bad_config_are_named(reference, tmp_path):
  _, folder = reference
  os.makedirs(tmp_path / "corrupt")
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "corrupt")
  with open(tmp_path / "corrupt" / "model.safetensors", "wb") as f:
    f.write(b"\x10\x00\x00\x00not a header")
  with pytest.raises(qwen2_5_vl.CheckpointError, match="cannot read"):
    qwen2_5_vl.from_pretrained(str(tmp_path / "corrupt"))
  config = json.load(open(os.path.join(folder, "config.json")))
  config["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
  os.makedirs(tmp_path / "badcfg")
  json.dump(config, open(tmp_path / "badcfg" / "config.json", "w"))
  with pytest.raises(qwen2_5_vl.ConfigError, match="mrope_section"):
    qwen2_5_vl.read_config(str(tmp_path / "badcfg"))


def test_flat_released_config_layout_is_read():
  """The released checkpoints' config.json is flat, with `rope_scaling` and `type: mrope`."""
  flat = {"model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008,
          "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
          "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
          "tie_word_embeddings": True, "eos_token_id": 151645, "bos_token_id": 151643,
          "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                            "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048,
                            "spatial_patch_size": 14, "window_size": 112,
                            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}}
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_dict(flat)
  assert cfg == qwen2_5_vl.Qwen2_5_VLConfig.qwen2_5_vl_3b()
