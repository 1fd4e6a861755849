"""Training infrastructure shared by every stage (pretrain, SFT, latent model, RL).

  state:      `TrainState`, `make_optimizer` (AdamW, schedules, clipping, trainable subsets).
  checkpoint: orbax checkpoints of state + loader position + metrics; `load_params`.
  loop:       `train`, the resumable jitted loop.
  metrics:    metrics.jsonl records and `plot_metrics`.
"""
