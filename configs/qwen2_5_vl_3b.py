r"""The reference's settings (SPEC) for Qwen2.5-VL-3B-Instruct: every pipeline stage, then RL.

  python -m experiments.run --config configs/qwen2_5_vl_3b.py --workdir workdirs/qwen2_5_vl_3b \
      --config.backbone.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
      --config.data.mmrole_dir=/path/to/MMRole_dataset \
      --config.data.pcogalign_dir=/path/to/PCogAlignBench \
      --config.rl.judge.kind=llm --config.rl.judge.base_url=http://HOST:PORT/v1 \
      --config.rl.judge.model=NAME

(or `--config configs/qwen2_5_vl_3b.py:/path/to/Qwen2.5-VL-3B-Instruct`). The checkpoint
is a local Hugging Face folder (config.json, *.safetensors, tokenizer files); nothing is
downloaded. Without one the run stops at config validation with
"config.backbone.checkpoint: expected str, got NoneType None", before any compute:
the field is an unset placeholder, because an empty checkpoint would silently train
the tiny from-scratch model instead.

Stages: prepare_data, pretrain, sft, inverse_warmup, cycle_warmup, inverse_joint,
policy_bc, latent_sft, rl (GRPO and Dr.GRPO, latent and token space: SPEC section 5's
table), evaluate (every policy on test_in / test_out with the judge) and report
(report.md). The ablations (`--config.stages=ablations,report` afterwards) retrain the
latent stages from inverse_joint on three times; they are left out by default.

`pretrain` only hands the checkpoint on: the reference starts from the Instruct
model, so it runs one update at learning rate 0 with nothing trainable (the later
stages load the backbone from pretrain's checkpoint).

Data: --config.data.mmrole_dir / pcogalign_dir point the role-play / personalised task
at local copies of the benchmarks in their published layouts (the folders and the
derived sft / rl / test_in / test_out splits are described at `c.data` in
`latent_mca/jobs/pipeline.py: default_config()`). PCogAlignBench's HCMAS-train.json
needs a reference reply ("golden_response") per instance for sft and rl, which the
published file lacks; test_in / test_out are its HCMAS / HCSHR golden test files.
Images are stored at most 224 x 224 pixels' worth (64 tokens). Either flag left out
keeps that task synthetic (the world at 224 px), and paired / text-only pretraining
data is always the synthetic world's. On real data the rl stage needs the reference's
LLM judge (the flags above; it stops at the start otherwise); the synthetic world is
scored by the programmatic judge, the default.

Hardware. Every stage runs in float32 (`config.precision` offers a bf16 forward over
fp32 master weights) on `config.mesh`: by default every device on "data", each holding
the whole model; `--config.mesh.fsdp=N` shards the parameters and Adam moments over N
devices. RL rollouts split prompt groups over data x fsdp (rl.prompts_per_step a
multiple of it), the parameters gathered whole on each device. The parameters are
3.75B for the backbone (vision 0.67B, language model 3.09B, tied head) plus 1.17B for
the latent modules (policy 0.62B, IDM 0.31B, world model 0.23B, projectors 0.02B), 4.9B in all.
  sft: params + grads + Adam m, v = 16 B x 3.75B = 60 GB.
  latent_sft: 4 B x 4.9B + 12 B x 3.3B trained = 60 GB.
  Stages 1-4 and latent RL: about 30 GB (the backbone frozen, at most 0.6B trained).
Add activations (remat is on) and 5 GB of fp32 logits per 8 x 1024 tokens. One 80 GB
GPU (H100 / A100-80GB) is tight for sft and latent_sft (lower their batch_size if they
run out of memory); one 141 GB H200 has room for everything. Disk: a checkpoint is the
whole fp32 TrainState (sft and latent_sft 60 GB, the others 20-30 GB) and a stage keeps
up to 3, so the workdir grows to several hundred GB.

What it should reach (SPEC section 5, Qwen2.5-VL-3B, the judge score ratio averaged
over the 4 test sets): SFT 0.817; GRPO token 0.831 vs latent 0.893; Dr.GRPO token
0.840 vs latent 0.896. Ablations (GRPO, --config.latent.use_cycle / use_projector /
use_text_only=false): full 0.893, without the cycle loss 0.870, without the projector
0.880, without text-only data 0.865. Rollout diversity: latent ~1.25 vs token ~1.07.
These are real-benchmark numbers with the LLM judge. On the synthetic world the
programmatic judge's ratios are a different scale, and the comparison to check is the
ordering: latent above token, and the full model above each ablation.

Settings from SPEC: section 2 gives the latent constants (128 codes, Gumbel tau 2,
entropy 1e-3, IDM 4 layers, policy 8 layers, 2 merge MLPs, projector width d/2,
projector and cycle weights 1e-5), latent_sft conditioned on the policy's argmax codes,
and RL (top-k 32, temperature 1, group 8, constant learning rate 1e-6, k3 KL 0.01
against the post-SFT policy, clip 0.2). Everything else (steps, batch sizes, sequence
lengths, the sft and latent-stage learning rates, the synthetic world's sizes) is not
in SPEC and is our choice, marked "not in SPEC".
"""

import ml_collections
from ml_collections import config_dict

from latent_mca.jobs import pipeline
from latent_mca.stages import latent
from latent_mca.stages import rl
from latent_mca.training.state import optimizer_config


def reference_config(checkpoint: str | None) -> ml_collections.ConfigDict:
  """The pipeline with the reference's settings; `checkpoint` None leaves it to a flag."""
  c = pipeline.default_config()
  c.stages = pipeline.ALL_STAGES + ",rl,evaluate,report"
  # An unset placeholder, so validation fails and names the field.
  c.backbone.checkpoint = checkpoint or config_dict.placeholder(str)
  # backbone.text / vision / tie_word_embeddings come from the checkpoint's config.json.
  # No dtype field: float32 throughout (SPEC names no training dtype either).
  c.backbone.remat = "full"
  # The synthetic world; sizes not in SPEC. Dialogues: 50% sft / 40% rl / 10% test_in.
  # --config.data.mmrole_dir / pcogalign_dir replace its dialogue tasks by the benchmarks.
  c.data.update(dict(image_size=224, paired_train=20000, paired_test=200, text_train=20000,
                     text_test=200, dialogue_in=5000, dialogue_out=500))

  # pretrain only passes the Instruct checkpoint on: one update at lr 0, nothing trainable.
  passthrough = optimizer_config()
  passthrough.update(dict(learning_rate=0.0, schedule="constant", trainable=()))
  c.pretrain = ml_collections.ConfigDict(dict(
      num_steps=1, batch_size=1, seq_len=512, optimizer=passthrough, eval_every=0,
      eval_examples=16, checkpoint_every=1, log_every=1))
  # Token-level task SFT: the token-space RL runs start from it (SPEC section 5's "SFT").
  # SPEC gives no SFT learning rate, schedule or length: 1e-5 cosine, ours.
  sft_optimizer = optimizer_config()
  sft_optimizer.update(dict(learning_rate=1e-5, warmup_steps=50, final_fraction=0.1))
  c.sft = ml_collections.ConfigDict(dict(
      num_steps=1000, batch_size=8, seq_len=1024, optimizer=sft_optimizer, eval_every=200,
      eval_examples=256, checkpoint_every=500, log_every=10))

  # SPEC section 2's constants are latent_defaults() (LatentConfig's defaults); reset
  # here in case the demo's default_config ever changes them.
  c.latent = latent.latent_defaults()
  # Steps, batches, lengths and learning rates of the latent stages: not in SPEC.
  for stage, steps, batch, seq_len, lr, warmup in (
      ("inverse_warmup", 3000, 16, 512, 1e-4, 100),
      ("cycle_warmup", 1000, 16, 512, 1e-4, 0),
      ("inverse_joint", 3000, 16, 512, 5e-5, 0),  # half paired, half text-only
      ("policy_bc", 3000, 16, 512, 1e-4, 100),
      ("latent_sft", 1000, 8, 1024, 1e-5, 50)):
    c[stage] = latent.stage_defaults(steps, batch, seq_len, lr, stage, warmup_steps=warmup)
    c[stage].update(dict(eval_every=steps // 5, eval_examples=256,
                         checkpoint_every=steps // 2))
  # SPEC section 2, stage 5: the world model is conditioned on the frozen policy's argmax
  # code (the demo uses the IDM's; results/latent_sft_codes.md compares them).
  c.latent_sft.codes = "policy"

  # RL: rl_defaults() are SPEC section 2's (group 8, lr 1e-6 constant, latent top-k 32,
  # temperature 1, kl_beta -1 = the algorithm's default 0.01 for GRPO / Dr.GRPO), not the
  # demo's tiny-model values. The clip epsilon 0.2 (and DAPO's 0.2 / 0.28) has no config
  # field: it is `latent_mca.rl.algorithms.AlgorithmConfig`'s default. SPEC: the reference
  # also trains the final norm in latent space; the rl stage trains policy/ only, no switch.
  c.rl = rl.rl_defaults()
  c.rl.update(dict(
      algorithm="grpo,dr_grpo", action_space="latent,token",  # SPEC section 5's table
      # Not in SPEC: 300 steps x 8 prompts x 8 samples (the rl split has ~4000 prompts),
      # prompts up to 1024 tokens (a 224 px image is 64), replies up to 256.
      num_steps=300, prompts_per_step=8, prompt_length=1024, max_new_tokens=256,
      eval_every=25, eval_prompts=64, checkpoint_every=50))
  return c


def get_config(arg=None):
  """arg: the checkpoint folder (else give --config.backbone.checkpoint)."""
  return reference_config(arg)
