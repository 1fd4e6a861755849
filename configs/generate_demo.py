r"""Generation demo with a tiny random Qwen2.5-VL (the embedded default for now).

  python -m experiments.run --config configs/generate_demo.py --workdir workdirs/demo

Builds the model, saves it as a Hugging Face folder in workdir/model, reloads it and
decodes 16 tokens for 2 prompts with and without a synthetic image, writing
workdir/generations.json and workdir/metrics_final.json. About 30 s on a 2-core CPU,
most of it compilation. The model is untrained, so the decoded text is noise.
Real weights: --config.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct (a local folder).
"""

from latent_mca.jobs import generate_demo


def get_config(arg=None):
  del arg
  return generate_demo.default_config()
