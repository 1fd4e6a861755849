r"""The embedded default pipeline on the synthetic world (stages grow as they land).

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo \
      --config.stages=prepare_data

prepare_data renders 2,200 scenes and writes the paired and text-only datasets
(ArrayRecord, under workdir/data) and the BPE tokenizer (workdir/tokenizer):
about a minute on a 2-core CPU. A second run reuses everything.
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  return pipeline.default_config()
