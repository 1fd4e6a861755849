r"""Single entry point for all experiment jobs (big_vision style).

  python -m experiments.run --config configs/NAME.py[:ARG] --workdir DIR \
      [--config.a.b=value ...]

The config file defines `get_config(arg=None)`; `config.job` names the job
(see `latent_mca.jobs`). The job's `default_config()` fills in every field the
config file leaves out (so `--config.*` can override any of them, parsed with
the default's type) and is the schema the final config is validated against.
The resolved config is written to `DIR/config.json` (an earlier, different
one is kept as `DIR/config.<N>.json`), then the job runs and its final
metrics are written to `DIR/metrics_final.json`.

Multi-host: every process runs the same command; `latent_mca.parallel.distributed`
starts JAX's distributed runtime first, from the config's `distributed` block
(`distributed.distributed_config()`, for jobs that declare one) or the environment
(LATENT_MCA_COORDINATOR, LATENT_MCA_NUM_PROCESSES, LATENT_MCA_PROCESS_ID), and
process 0 alone writes config.json and metrics_final.json.

Config problems (unknown or ill-typed fields, unknown job, missing config
file, bad flags) are printed to stderr without a traceback, exit status 2.
"""

import json
import os
import sys
from typing import Any, Mapping, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from latent_mca import jobs
from latent_mca.compilation_cache import enable_compilation_cache
from latent_mca.config_schema import add_missing_defaults
from latent_mca.config_schema import ConfigError
from latent_mca.config_schema import validate_config
from latent_mca.config_schema import write_config
from latent_mca.parallel import distributed

_USAGE_ERROR_STATUS = 2


class _JobDefaultsParser(flags.ArgumentParser):
  """Wraps the config file parser to complete configs with job defaults.

  config_flags applies `--config.*` overrides to what this returns, so with
  the defaults added every schema field can be overridden, and is parsed with
  its schema type, even when the config file leaves it out.
  """

  def __init__(self, file_parser: flags.ArgumentParser):
    self._file_parser = file_parser

  def flag_type(self) -> str:
    return self._file_parser.flag_type()

  def parse(self, argument):
    config = self._file_parser.parse(argument)
    # Anything unusable here is reported with context by resolve_config().
    if (isinstance(config, ml_collections.ConfigDict)
        and isinstance(config.get("job"), str)):
      try:
        job = jobs.get_job(config.job)
      except ConfigError:
        return config
      add_missing_defaults(config, job_schema(job, config.job))
    return config


# accept_new_attributes lets `--config.typo=1` through flag parsing so that
# validate_config reports it with its dotted path, a suggestion and all other
# problems; otherwise config_flags dies with a bare AttributeError traceback.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file defining get_config(arg=None); `path.py:arg` passes arg.",
    lock_config=False, accept_new_attributes=True)
# DEFINE_config_file takes no parser argument; absl flags parse through their
# public `parser` attribute, before config_flags applies the overrides.
flags.FLAGS["config"].parser = _JobDefaultsParser(flags.FLAGS["config"].parser)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the resolved config, outputs and metrics.")
# Not --config: a get_config() returning None would pass for a missing flag.
flags.mark_flags_as_required(["workdir"])
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.environ.get("LATENT_MCA_COMPILATION_CACHE",
                   os.path.join(os.path.expanduser("~"), ".cache", "latent_mca", "jax")),
    "Directory of JAX's persistent compilation cache (empty: none). A rerun, a resumed "
    "job, another seed and a stage that compiles a program an earlier one did (the "
    "ablations' RL, for one) load the compiled program instead of compiling it again.")


def job_schema(job: Any, name: str) -> ml_collections.ConfigDict:
  """Returns the job's default config, with `job` set to `name` if absent."""
  schema = job.default_config()
  if "job" not in schema:
    # Jobs need not declare `job` themselves; it is part of every config.
    schema = ml_collections.ConfigDict(schema)
    with schema.unlocked():
      schema.job = name
  return schema


def resolve_config(
    raw_config: ml_collections.ConfigDict,
) -> tuple[Any, ml_collections.ConfigDict]:
  """Finds the job named by `raw_config.job` and validates the config.

  Args:
    raw_config: the config as loaded from the config file and overrides.

  Returns:
    (job module, validated locked config).

  Raises:
    ConfigError: if the job is unknown or the config does not match its
      schema.
  """
  if not isinstance(raw_config, (ml_collections.ConfigDict, dict)):
    raise ConfigError(
        "config: get_config() must return a ConfigDict, got "
        f"{type(raw_config).__name__}.")
  name = raw_config.get("job")
  if not isinstance(name, str):
    raise ConfigError(
        "config.job: must be a string naming the job, one of "
        f"{', '.join(sorted(jobs.JOBS))} or a module path; got {name!r}.")
  job = jobs.get_job(name)
  return job, validate_config(raw_config, job_schema(job, name))


def write_metrics(metrics: Mapping[str, Any], workdir: str) -> str:
  """Writes the job's final metrics to `workdir/metrics_final.json`."""
  if not isinstance(metrics, Mapping):
    raise TypeError(
        f"job.run() must return a dict of metrics, got {type(metrics)}.")
  path = os.path.join(workdir, "metrics_final.json")
  text = json.dumps(dict(metrics), indent=2, default=_to_json)
  _write_text(path, text + "\n")
  return path


def _to_json(value: Any) -> Any:
  """JSON fallback for array scalars/arrays (numpy, jax) and anything else."""
  if hasattr(value, "tolist"):
    return value.tolist()
  # Losing a long run's final metrics to one odd value would be worse.
  return repr(value)


def _write_text(path: str, text: str) -> None:
  """Writes atomically so that an interrupted run never leaves a torn file."""
  tmp_path = path + ".tmp"
  with open(tmp_path, "w") as f:
    f.write(text)
  os.replace(tmp_path, path)


def _fail(message: str) -> NoReturn:
  sys.stderr.write(f"ERROR: {message}\n")
  sys.exit(_USAGE_ERROR_STATUS)


def _load_raw_config() -> Any:
  """Returns the loaded config, or raises ConfigError for a missing file."""
  # config_flags defers a load failure until the config is first accessed, and
  # then raises a wrapped OSError; check up front for a clear message.
  if not flags.FLAGS["config"].present:
    raise ConfigError("--config is required: a config file, `path.py[:arg]`.")
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  path = path.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  return _CONFIG.value


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses flags, turning config_flags failures into one-line errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"bad flags: {e}")
  except OSError as e:
    # Overrides force loading the config file during parsing; the original
    # error (the cause) names the path that was tried.
    _fail(f"could not load the config file: {e.__cause__ or e}")
  except (AttributeError, KeyError) as e:
    # Raised by config_flags for `--config.a.b=...` when `a` does not exist.
    overrides = [a for a in argv if a.startswith("--config.")]
    field, _, hint = _innermost(e).partition("\n")
    _fail(f"cannot apply {' '.join(overrides)}: unknown field {field} (not in "
          f"the config file nor in its job's defaults). {hint}".rstrip())


def _innermost(error: BaseException) -> str:
  """The message of the KeyError that config_flags wraps in AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def main(argv: Sequence[str]) -> None:
  """Validates the config, records it, runs the job and records its metrics."""
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = _WORKDIR.value
  try:
    job, config = resolve_config(_load_raw_config())
  except ConfigError as e:
    _fail(str(e))

  try:
    # Before anything starts JAX's backends; a no-op for a single process.
    distributed.initialize(config.get("distributed"))
  except ValueError as e:
    _fail(str(e))
  # Every process runs the job; process 0 alone writes the run's own files.
  is_main = distributed.is_main_process()

  if _CACHE.value:
    enable_compilation_cache(_CACHE.value)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    config_path = write_config(config, workdir)
    logging.info("Job %s, workdir %s, config (%s):\n%s",
                 config.job, workdir, config_path, config)
  metrics = job.run(config, workdir)
  if is_main:
    metrics_path = write_metrics(metrics, workdir)
    logging.info("Final metrics (%s): %s", metrics_path, metrics)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
