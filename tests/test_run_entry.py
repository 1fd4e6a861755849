"""Tests for config validation and the `experiments.run` entry point."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
from ml_collections import config_dict
import pytest

from latent_mca import jobs
from latent_mca.config_schema import add_missing_defaults
from latent_mca.config_schema import ConfigError
from latent_mca.config_schema import validate_config

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schema():
  return ml_collections.ConfigDict({
      "lr": 0.1,
      "steps": 10,
      "use_bias": True,
      "name": "demo",
      "shape": (2, 3),
      "anything": None,
      "model": {"hidden_size": 8, "depth": 2},
  })


def _config(**kwargs):
  return ml_collections.ConfigDict(kwargs)


def test_unknown_key_is_reported_with_suggestion():
  with pytest.raises(ConfigError) as e:
    validate_config(_config(stesp=3), _schema())
  assert ("config.stesp: unknown field; did you mean config.steps?"
          in str(e.value))


def test_unknown_key_without_close_match_lists_valid_fields():
  with pytest.raises(ConfigError, match="valid fields here: .*steps"):
    validate_config(_config(zzz=1), _schema())


def test_nested_unknown_key_names_full_path():
  with pytest.raises(ConfigError) as e:
    validate_config(_config(model={"hiden_size": 4}), _schema())
  assert ("config.model.hiden_size: unknown field; did you mean "
          "config.model.hidden_size?") in str(e.value)


@pytest.mark.parametrize("key,value,expected", [
    ("steps", "10", "expected int, got str"),
    ("steps", 1.5, "expected int, got float"),
    ("lr", "0.1", "expected float (or int), got str"),
    ("use_bias", 1, "expected bool, got int"),
    ("steps", True, "expected int, got bool"),
    ("shape", 3, "expected tuple or list, got int"),
    ("model", 3, "expected ConfigDict (or dict), got int"),
])
def test_ill_typed_value_names_path_and_types(key, value, expected):
  with pytest.raises(ConfigError) as e:
    validate_config(_config(**{key: value}), _schema())
  assert f"config.{key}: {expected}" in str(e.value)


def test_int_accepted_for_float_and_converted():
  config = validate_config(_config(lr=1), _schema())
  assert config.lr == 1.0 and isinstance(config.lr, float)


def test_list_accepted_for_tuple():
  assert validate_config(_config(shape=[4, 5]), _schema()).shape == (4, 5)


@pytest.mark.parametrize("value", [None, 3, "x", [1, 2], {"a": 1}])
def test_none_schema_accepts_anything(value):
  config = validate_config(_config(anything=value), _schema())
  if isinstance(value, dict):
    assert config.anything.to_dict() == value
  else:
    assert config.anything == value


def test_an_empty_group_is_open_to_any_fields_the_job_checks():
  schema = ml_collections.ConfigDict({"per_game": ml_collections.ConfigDict(), "steps": 1})
  given = {"points24": {"ppo": {"learning_rate": 1e-5}}}
  config = validate_config(_config(per_game=given), schema)
  assert config.per_game.to_dict() == given and config.steps == 1
  assert validate_config(_config(), schema).per_game.to_dict() == {}
  with pytest.raises(ConfigError, match="config.per_game: expected ConfigDict"):
    validate_config(_config(per_game=3), schema)
  # a group with fields is not open
  with pytest.raises(ConfigError, match="config.model.width: unknown field"):
    validate_config(_config(model={"width": 4}), _schema())


def test_typed_placeholder_accepts_its_type_or_none():
  schema = ml_collections.ConfigDict({"seed": config_dict.placeholder(int)})
  assert validate_config(_config(seed=3), schema).seed == 3
  assert validate_config(_config(seed=None), schema).seed is None
  with pytest.raises(ConfigError, match="config.seed: expected int or None"):
    validate_config(_config(seed="3"), schema)


def test_all_problems_reported_together():
  config = _config(stesp=3, lr="fast", model={"hiden_size": 4, "depth": "2"})
  with pytest.raises(ConfigError) as e:
    validate_config(config, _schema())
  message = str(e.value)
  assert "4 problem(s)" in message
  for path in ("config.stesp", "config.lr", "config.model.hiden_size",
               "config.model.depth"):
    assert path in message
  assert len(message.splitlines()) == 5  # Header plus one line per problem.


def test_defaults_filled_in_and_result_locked():
  schema = _schema()
  config = validate_config(_config(steps=3, model={"depth": 5}), schema)
  assert config.steps == 3
  assert config.lr == 0.1 and config.name == "demo"
  assert config.model.depth == 5 and config.model.hidden_size == 8
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.new_field = 1
  # The schema is not shared with (nor locked by) the result.
  assert not schema.model.is_locked


def test_add_missing_defaults_keeps_config_values_and_unknown_keys():
  schema = ml_collections.ConfigDict({
      "seed": config_dict.placeholder(int),
      "model": {"depth": 2, "act": "relu"},
  })
  config = _config(model={"depth": "3", "typo": 1})
  add_missing_defaults(config, schema)
  assert config.model.to_dict() == {"depth": "3", "typo": 1, "act": "relu"}
  assert config.seed is None and config.get_type("seed") is int
  schema.model.act = "gelu"  # The defaults are copied, not shared.
  assert config.model.act == "relu"


def test_non_configdict_config_is_an_error():
  with pytest.raises(ConfigError, match="expected a ConfigDict, got NoneType"):
    validate_config(None, _schema())


def test_get_job_resolves_module_paths_and_rejects_unknown_names():
  assert jobs.get_job("tests.fake_job").run is not None
  with pytest.raises(ConfigError, match="Known jobs: .*generate_demo"):
    jobs.get_job("no_such_job")
  with pytest.raises(ConfigError, match="cannot import job module"):
    jobs.get_job("tests.no_such_module")
  with pytest.raises(ConfigError, match="not a job"):
    jobs.get_job("tests.test_run_entry")


# End-to-end tests of the CLI.


def _write_config(tmp_path, body, name="cfg.py"):
  """Writes a config file whose get_config(arg) returns the given body."""
  path = tmp_path / name
  path.write_text(textwrap.dedent("""\
      import ml_collections

      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.job = "tests.fake_job"
      """) + textwrap.indent(textwrap.dedent(body), "  ") + "  return c\n")
  return str(path)


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", *args],
      cwd=_REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def test_cli_success_writes_config_and_metrics(tmp_path):
  config = _write_config(tmp_path, "c.steps = int(arg) if arg else 4\n")
  workdir = tmp_path / "wd"
  result = _run_cli(f"--config={config}:5", f"--workdir={workdir}",
                    "--config.scale=3", "--config.model.name=007")
  assert result.returncode == 0, result.stderr
  # model.name is not in the config file: the job defaults filled it in
  # before the override, which was parsed as the default's type (str).
  written = _read_json(workdir / "config.json")
  assert written == {"job": "tests.fake_job", "scale": 3.0, "steps": 5,
                     "model": {"hidden_size": 8, "name": "007"}}
  assert _read_json(workdir / "metrics_final.json") == {"value": 15.0}
  assert (workdir / "ran.txt").read_text() == "007"


def test_cli_compilation_cache_holds_the_jobs_programs(tmp_path):
  config = _write_config(tmp_path, "")
  cache = tmp_path / "cache"
  result = _run_cli(f"--config={config}", f"--workdir={tmp_path / 'a'}",
                    f"--compilation_cache={cache}")
  assert result.returncode == 0, result.stderr
  assert any(name.startswith("jit__lambda") for name in os.listdir(cache))


def test_cli_unknown_override_fails_naming_field(tmp_path):
  config = _write_config(tmp_path, "c.steps = 4\n")
  result = _run_cli(f"--config={config}", f"--workdir={tmp_path / 'wd'}",
                    "--config.typo=1", "--config.model.hiden_size=3")
  assert result.returncode == 2
  assert "config.typo: unknown field" in result.stderr
  assert "did you mean config.model.hidden_size?" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "wd").exists()


def test_cli_override_under_unknown_parent_fails_cleanly(tmp_path):
  config = _write_config(tmp_path, "c.steps = 4\n")
  result = _run_cli(f"--config={config}", f"--workdir={tmp_path / 'wd'}",
                    "--config.modle.depth=3")
  assert result.returncode == 2
  assert "--config.modle.depth=3" in result.stderr
  assert "unknown field 'modle'" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_ill_typed_override_fails(tmp_path):
  config = _write_config(tmp_path, "c.steps = 4\n")
  result = _run_cli(f"--config={config}", f"--workdir={tmp_path / 'wd'}",
                    "--config.steps=many")
  assert result.returncode == 2
  assert "--config.steps=many" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_config_file_with_unknown_and_ill_typed_fields(tmp_path):
  config = _write_config(tmp_path, """\
      c.model = ml_collections.ConfigDict({"hiden_size": 4})
      c.steps = "4"
      """)
  result = _run_cli(f"--config={config}", f"--workdir={tmp_path / 'wd'}")
  assert result.returncode == 2
  assert "config.model.hiden_size: unknown field" in result.stderr
  assert "config.steps: expected int, got str" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_unknown_job_lists_known_jobs(tmp_path):
  config = _write_config(tmp_path, "")
  result = _run_cli(f"--config={config}", f"--workdir={tmp_path / 'wd'}",
                    "--config.job=nope")
  assert result.returncode == 2
  assert "unknown job 'nope'" in result.stderr
  assert "generate_demo" in result.stderr


def test_cli_rerun_keeps_previous_config(tmp_path):
  config = _write_config(tmp_path, "c.steps = 4\n")
  workdir = tmp_path / "wd"
  for scale in ("1", "2"):
    result = _run_cli(f"--config={config}", f"--workdir={workdir}",
                      f"--config.scale={scale}")
    assert result.returncode == 0, result.stderr
  assert _read_json(workdir / "config.1.json")["scale"] == 1.0
  assert _read_json(workdir / "config.json")["scale"] == 2.0
  # An identical rerun has nothing new to record.
  result = _run_cli(f"--config={config}", f"--workdir={workdir}",
                    "--config.scale=2")
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(workdir)) == [
      "config.1.json", "config.json", "metrics_final.json", "ran.txt"]


@pytest.mark.parametrize("overrides", [[], ["--config.steps=2"]])
def test_cli_missing_config_file(tmp_path, overrides):
  missing = str(tmp_path / "nope.py")
  result = _run_cli(f"--config={missing}", f"--workdir={tmp_path / 'wd'}",
                    *overrides)
  assert result.returncode == 2
  assert missing in result.stderr
  assert "Traceback" not in result.stderr


def test_an_optional_xla_flag_is_added_only_if_jaxlib_names_it():
  from latent_mca import compilation_cache
  assert compilation_cache._jaxlib_knows("--xla_backend_optimization_level=0")
  assert not compilation_cache._jaxlib_knows("--xla_cpu_no_such_flag_latent_mca=true")


def test_fast_compile_sets_xla_flags_only_before_the_backends_start(tmp_path):
  script = textwrap.dedent("""
      import os, jax
      from latent_mca.compilation_cache import FAST_COMPILE_FLAGS, fast_compile, fast_compile_flags
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
      assert fast_compile()
      flags = os.environ["XLA_FLAGS"].split()
      assert fast_compile_flags()[:len(FAST_COMPILE_FLAGS)] == FAST_COMPILE_FLAGS
      assert flags == ["--xla_force_host_platform_device_count=2", *fast_compile_flags()], flags
      assert fast_compile() and os.environ["XLA_FLAGS"].split() == flags  # idempotent
      assert jax.device_count() == 2  # XLA read the combined flags
      os.environ["XLA_FLAGS"] = ""
      assert not fast_compile()  # too late: the backends have started
      assert os.environ["XLA_FLAGS"] == ""
      print("ok")
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=_REPO_ROOT), timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "ok"
