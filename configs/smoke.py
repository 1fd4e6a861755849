r"""The demo's whole graph (`pipeline.STUDY_STAGES`: every stage, the 8 RL runs, evaluate,
the 3 ablations and the report) at tiny sizes, to check it quickly.

  python -m experiments.run --config configs/smoke.py --workdir workdirs/smoke

Tiny world (40 examples per split), a 2-layer backbone of width 32, a few steps per
stage; the tests run it. It compiles with XLA's fast-compile settings
(`config.xla_fast_compile`), the RL runs share their programs (one per action space),
and the ablations share the full run's where their switch plays no part; still, most
of its time is tracing and compiling the stages' programs, while a second process draws
the plots: 2 min 37 s on 2 CPU cores with an empty compilation cache (the first run on a
machine).
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  return pipeline.smoke_config()
