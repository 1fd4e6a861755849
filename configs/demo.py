r"""The embedded default pipeline on the synthetic world: the whole study, in one command.

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo

Stages, in order (`pipeline.STUDY_STAGES`):
  prepare_data   the paired set (2,200 scenes), the text-only corpus (2,200 texts) and both
                 dialogue tasks (1,100 examples each: sft / rl / test_in / test_out) as
                 ArrayRecord under workdir/data, and the BPE tokenizer;
  pretrain, sft  the tiny Qwen2.5-VL from scratch (400 steps), then token SFT (200 steps);
  inverse_warmup, cycle_warmup, inverse_joint, policy_bc, latent_sft
                 the latent action model (`latent_mca.stages.latent`);
  rl             GRPO, Dr.GRPO, DAPO and BNPO in token and latent space (`stages.rl`);
  evaluate       every policy on the held-out test_in / test_out sets with the judge;
  ablations      no cycle loss, no projector, no text-only data: each retrained from the
                 first stage it changes, latent GRPO, evaluated as the full run's row;
  report         workdir/report.md: the results table, the ablation and diversity tables,
                 the paper's three claims answered, and report/*.png plots.

On a fresh 2-core machine the README's main command (install included) took 23 min 16 s
(results/study_demo_cpu/). A second run reuses everything finished and a killed stage
resumes. Three seeds (the first reuses this run; the others go to workdir/seed_<s>/, and
report.md then gives mean ± standard deviation over seeds):

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo \
      --config.seeds=0,1,2
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  config = pipeline.default_config()
  config.stages = pipeline.STUDY_STAGES
  config.rl.algorithm = "grpo,dr_grpo,dapo,bnpo"
  config.rl.action_space = "token,latent"
  return config
