r"""Puts games' saved results back into a cards workdir, so one report covers jobs whose
workdirs are gone beside ones run again.

  python -m experiments.cards_restore_results --config configs/cards.py:cpu \
      --workdir W --results results/cards_cpu_separate/cards_results.json \
      --games numberline,ezpoints,points24

Each listed game's rows of the saved table (a cards report's cards_results.json: the
result files as the jobs wrote them) are written back to where the job with --config
wrote them (`stages.cards.restore_results`); a file already there is kept, one that
differs is an error. Then run each restored game's expert stage in its workdir (the
expert row; deterministic, seconds) and the report:

  python -m experiments.run --config configs/cards.py:points24 --workdir W/points24 \
      --config.stages=expert
  python -m experiments.run --config configs/cards.py:cpu --workdir W --config.stages=report
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from latent_mca.stages import cards


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", "configs/cards.py:cpu", "The cards config of the report to be made.")
  flags.DEFINE_string("workdir", None, "The workdir the report will be made over.",
                      required=True)
  flags.DEFINE_string("results", None, "A cards report's cards_results.json.", required=True)
  flags.DEFINE_list("games", None, "The games whose results to restore.", required=True)


def main(argv):
  del argv
  opts = flags.FLAGS
  written = cards.restore_results(opts.config, opts.results, opts.workdir, opts.games)
  print(f"restored {len(written)} result files from {opts.results}:")
  print("\n".join(written))


if __name__ == "__main__":
  define_flags()
  app.run(main)
