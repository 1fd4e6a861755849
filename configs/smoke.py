r"""Every stage of the pipeline at tiny sizes, to check the whole graph quickly.

  python -m experiments.run --config configs/smoke.py --workdir workdirs/smoke

Tiny world (40 examples per split), a 2-layer backbone of width 32, a few steps per
stage; the tests run it. Nearly all of its time is compiling the stages' programs.
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  return pipeline.smoke_config()
