"""Training stages of the embedded pipeline, each `stage(config, workdir) -> metrics`.

  data:     prepared datasets -> static-shape model batches with a loss mask.
  backbone: `pretrain` (from scratch or a local checkpoint) and task `sft` of Qwen2.5-VL,
            with the pure `train_step` they share.

`latent_mca.jobs.pipeline.STAGES` runs them by name.
"""
