r"""The embedded default pipeline on the synthetic world (stages grow as they land).

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo \
      --config.stages=prepare_data

prepare_data renders the paired set (2,200 scenes), the text-only corpus (2,200 texts)
and both dialogue tasks (1,100 examples each: sft / rl / test_in / test_out), written
as ArrayRecord under workdir/data, and trains the BPE tokenizer (workdir/tokenizer):
about 30 s on a 2-core CPU. A second run reuses everything.
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  return pipeline.default_config()
