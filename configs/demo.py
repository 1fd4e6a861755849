r"""The embedded default pipeline on the synthetic world: every stage, in order.

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo

prepare_data renders the paired set (2,200 scenes), the text-only corpus (2,200 texts)
and both dialogue tasks (1,100 examples each: sft / rl / test_in / test_out) as
ArrayRecord under workdir/data, and trains the BPE tokenizer. pretrain (400 steps)
trains the tiny Qwen2.5-VL from scratch; sft (200 steps) fine-tunes it on the dialogue
tasks. The latent action model's five stages follow (inverse_warmup, cycle_warmup,
inverse_joint, policy_bc, latent_sft; see `latent_mca.stages.latent`). All of it took
9 min 19 s on a shared 2-core CPU; a second run reuses everything, and a killed stage
resumes. RL runs separately for now, every listed algorithm in every listed space
(40 steps each; results/rl_demo_cpu/ has the last table and curves):

  python -m experiments.run --config configs/demo.py --workdir workdirs/demo \
      --config.stages=rl --config.rl.algorithm=grpo,dr_grpo,dapo,bnpo \
      --config.rl.action_space=token,latent
"""

from latent_mca.jobs import pipeline


def get_config(arg=None):
  del arg
  config = pipeline.default_config()
  config.stages = pipeline.ALL_STAGES
  return config
