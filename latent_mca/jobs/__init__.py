"""Registry of experiment jobs runnable through `python -m experiments.run`.

A job is a module defining:
  * `default_config() -> ml_collections.ConfigDict`: the job's defaults, which
    are also its schema (see `latent_mca.config_schema.validate_config`);
  * `run(config, workdir) -> dict`: runs the job and returns final metrics.

`config.job` names the job: either a key of `JOBS`, or the fully qualified
path of any importable module (anything containing a dot, e.g.
`"my_research.jobs.probe"`). The latter is how research code and tests plug in
their own jobs without editing this registry.
"""

import difflib
import importlib
import types

from latent_mca.config_schema import ConfigError

JOBS: dict[str, str] = {
    "cards": "latent_mca.jobs.cards",
    "generate_demo": "latent_mca.jobs.generate_demo",
    "pipeline": "latent_mca.jobs.pipeline",
}


def get_job(name: str) -> types.ModuleType:
  """Imports and returns the job module for `name`.

  Args:
    name: a registered job name (key of `JOBS`) or a dotted module path.

  Returns:
    The imported job module.

  Raises:
    ConfigError: if `name` is neither a registered job nor an importable
      module, or the module lacks `default_config` / `run`.
  """
  if name in JOBS:
    module_path = JOBS[name]
  elif "." in name:
    module_path = name
  else:
    close = difflib.get_close_matches(name, JOBS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"config.job: unknown job {name!r}.{hint} Known jobs: "
        f"{', '.join(sorted(JOBS))}; or give a module path such as "
        "'my_package.my_job'.")
  try:
    module = importlib.import_module(module_path)
  except ModuleNotFoundError as e:
    # Only a missing job module is a config problem; a missing dependency of
    # an existing job module is a real bug and keeps its traceback.
    if e.name is None or not _is_prefix(e.name, module_path):
      raise
    raise ConfigError(
        f"config.job: cannot import job module {module_path!r} ({e})."
        f" Known jobs: {', '.join(sorted(JOBS))}.") from e
  missing = [a for a in ("default_config", "run")
             if not callable(getattr(module, a, None))]
  if missing:
    raise ConfigError(
        f"config.job: module {module_path!r} is not a job: it does not "
        f"define {' and '.join(missing)}().")
  return module


def _is_prefix(package: str, module_path: str) -> bool:
  """Whether `package` is `module_path` or one of its parent packages."""
  return module_path == package or module_path.startswith(package + ".")
