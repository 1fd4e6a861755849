r"""The embedded default pipeline on the synthetic world (stages grow as they land).

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo \
      --config.stages=prepare_data,pretrain,sft

prepare_data renders the paired set (2,200 scenes), the text-only corpus (2,200 texts)
and both dialogue tasks (1,100 examples each: sft / rl / test_in / test_out), written
as ArrayRecord under workdir/data, and trains the BPE tokenizer (workdir/tokenizer):
about 30 s on a 2-core CPU. pretrain (400 steps) trains the tiny Qwen2.5-VL from
scratch: held-out loss 7.7 -> 1.3, about 2 min; sft (200 steps) fine-tunes it on the
dialogue tasks: test_in loss 5.0 -> 1.1, about 1 min (measured on a shared 2-core
machine, ±50%). A second run reuses everything; a killed stage resumes.
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  config = pipeline.default_config()
  config.stages = pipeline.ALL_STAGES
  return config
