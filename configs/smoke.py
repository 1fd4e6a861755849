r"""The demo's whole graph (`pipeline.STUDY_STAGES`: every stage, the 8 RL runs, evaluate,
the 3 ablations and the report) at tiny sizes, to check it quickly.

  python -m experiments.run --config configs/smoke.py --workdir workdirs/smoke

Tiny world (40 examples per split), a 2-layer backbone of width 32, a few steps per
stage; the tests run it. Nearly all of its time is compiling the stages' programs:
8 min 12 s on 2 CPU cores with an empty compilation cache (the first run on a machine;
the ablations then load most of their programs from it).
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  return pipeline.smoke_config()
