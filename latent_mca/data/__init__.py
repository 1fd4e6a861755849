"""Data: image preprocessing (and, later, the synthetic world and task datasets)."""
