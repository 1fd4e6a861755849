r"""The reference's settings (SPEC) for Qwen2.5-VL-7B-Instruct: every pipeline stage, then RL.

  python -m experiments.run --config configs/qwen2_5_vl_7b.py --workdir workdirs/qwen2_5_vl_7b \
      --config.backbone.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct \
      --config.data.mmrole_dir=/path/to/MMRole_dataset \
      --config.data.pcogalign_dir=/path/to/PCogAlignBench \
      --config.rl.judge.kind=llm --config.rl.judge.base_url=http://HOST:PORT/v1 \
      --config.rl.judge.model=NAME

(or `--config configs/qwen2_5_vl_7b.py:/path/to/Qwen2.5-VL-7B-Instruct`). Run it from
the repository root: the settings are those of configs/qwen2_5_vl_3b.py, imported as
`configs.qwen2_5_vl_3b`. Its docstring covers the stages, the checkpoint placeholder
(without a checkpoint, validation fails naming config.backbone.checkpoint), the data
(MMRole / PCogAlignBench from the --config.data.mmrole_dir / pcogalign_dir folders,
scored by the LLM judge; a task left without its flag is the synthetic world's at
224 px) and which values come from SPEC. SPEC gives one set of
settings for both sizes, so this config differs from the 3B one only in the checkpoint.

Hardware. Float32 throughout (the schema has no dtype field), with each stage on one
device. The parameters are 8.29B for the backbone (vision 0.68B, decoder 6.53B,
embeddings 0.54B, untied head 0.54B) plus 3.53B for the latent modules, which are
sized by d = 3584 (policy 1.86B, IDM 0.93B, world model 0.68B, projectors 0.05B):
11.8B in all.
  sft: 16 B x 8.29B = 133 GB.
  latent_sft: 4 B x 11.8B + 12 B x 8.3B trained = 147 GB.
  Stages 1-4 and latent RL: 70-80 GB (47 GB of parameters, the policy's 1.86B trained).
  Token RL: about 60 GB.
So sft and latent_sft fit no single accelerator (an H200 has 141 GB) until the stages
shard the weights over devices. `latent_mca.parallel.sharding` has the FSDP / tensor
rules, but the pipeline's training loop does not apply them yet. With that sharding
(and activations, remat on), they need about 4 x 80 GB GPUs or 2 x H200; a TPU v5p-8
has 4 x 95 GB. The other stages run on one 141 GB H200, or, tightly, on one 80 GB GPU.
Disk: checkpoints are whole fp32 TrainStates (up to ~150 GB each, up to 3 kept per
stage), so plan for about 1 TB.

What it should reach: SPEC has reference results for Qwen2.5-VL-3B only (section 5:
SFT 0.817, GRPO token 0.831 vs latent 0.893, Dr.GRPO token 0.840 vs latent 0.896) and
none for 7B, so there is no 7B number to match. What to check is the 3B ordering:
latent above token for GRPO and Dr.GRPO, the full model above its ablations, and more
diverse latent rollouts.
"""

from configs.qwen2_5_vl_3b import reference_config


def get_config(arg=None):
  """arg: the checkpoint folder (else give --config.backbone.checkpoint)."""
  return reference_config(arg)
