"""Validation of experiment configs against a job's default config (schema).

A job's `default_config()` doubles as its schema: every valid key and the type
of its value. `validate_config` checks a user config against it, fills in the
missing keys from the schema and reports every problem at once, so a typo in a
sweep is caught before any compute is spent rather than silently ignored.
"""

import copy
import difflib
import os
from typing import Any

from absl import logging
import ml_collections
from ml_collections import config_dict

_ROOT = "config"


class ConfigError(ValueError):
  """A config does not match its job's schema (or names no valid job)."""


def validate_config(
    config: ml_collections.ConfigDict,
    schema: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """Checks `config` against `schema` and returns the resolved config.

  Rules, applied recursively:
    * a key of `config` missing from `schema` is an error (with a suggestion);
    * a value must have the schema value's type, except that an int is
      accepted (and converted) where a float is expected, tuples and lists are
      interchangeable (element types are not checked), a ConfigDict schema
      value accepts a ConfigDict or dict, and a None schema value (or an
      `ml_collections.config_dict.placeholder(T)`, which is None by default)
      accepts anything (respectively a T or None);
    * an empty ConfigDict schema value is an open group (e.g. the cards job's
      `per_game`): it accepts any ConfigDict or dict, whose contents the job
      checks itself;
    * a key of `schema` missing from `config` takes the schema's value.

  Args:
    config: the user config (ConfigDict or dict).
    schema: the job's default config.

  Returns:
    A new, locked ConfigDict with all schema keys present.

  Raises:
    ConfigError: listing every problem found, one per line.
  """
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise ConfigError(
        f"{_ROOT}: expected a ConfigDict, got {_type_name(config)}"
        " (does get_config() return its config?)")
  errors = []
  resolved = _validate_dict(config, schema, _ROOT, errors)
  if errors:
    raise ConfigError(
        f"Invalid config ({len(errors)} problem(s)):\n"
        + "\n".join(f"  {e}" for e in errors))
  resolved.lock()
  return resolved


def add_missing_defaults(
    config: ml_collections.ConfigDict,
    schema: ml_collections.ConfigDict,
) -> None:
  """Adds, in place, every field of `schema` that `config` lacks.

  Unlike `validate_config` this never fails: unknown or ill-typed fields are
  kept for `validate_config` to report. It lets `--config.*` overrides reach
  (and be parsed with the type of) fields a config file leaves out; the
  config's own values and FieldReferences are left untouched.

  Args:
    config: the config to complete; unlocked for the additions.
    schema: the job's default config.
  """
  with config.unlocked():
    for key in schema:
      value = schema[key]
      if key not in config:
        if value is None and schema.get_type(key) is not type(None):
          # Keep a typed placeholder typed, so that it can still be overridden.
          value = config_dict.placeholder(schema.get_type(key))
        config[key] = copy.deepcopy(value)
      elif (isinstance(value, ml_collections.ConfigDict)
            and isinstance(config[key], ml_collections.ConfigDict)):
        add_missing_defaults(config[key], value)


def _validate_dict(config, schema, path, errors):
  """Validates one (sub)dict, appending problems to `errors`."""
  resolved = ml_collections.ConfigDict()
  for key in config:
    if key not in schema:
      errors.append(_unknown_key_message(key, schema, path))
  for key in schema:
    key_path = f"{path}.{key}"
    if key in config:
      value = _validate_value(
          config[key], schema[key], schema.get_type(key), key_path, errors)
    else:
      value = schema[key]
      if isinstance(value, ml_collections.ConfigDict):
        # Copy so that the result never shares (and later locks) schema state.
        value = _validate_dict(value, value, key_path, errors)
    resolved[key] = value
  return resolved


def _validate_value(value, schema_value, schema_type, path, errors) -> Any:
  """Returns `value` normalised to the schema's type, or records a problem."""
  if isinstance(schema_value, ml_collections.ConfigDict):
    if isinstance(value, (ml_collections.ConfigDict, dict)) and not schema_value:
      return ml_collections.ConfigDict(copy.deepcopy(value))  # an open group
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      return _validate_dict(value, schema_value, path, errors)
    errors.append(_type_message(path, "ConfigDict (or dict)", value))
    return value
  if schema_value is None:
    # A plain None accepts anything; a typed placeholder accepts T or None.
    if (value is None or schema_type is type(None)
        or _matches(value, schema_type)):
      return _coerce(value, schema_type)
    errors.append(_type_message(path, f"{schema_type.__name__} or None", value))
    return value
  if _matches(value, type(schema_value)):
    return _coerce(value, type(schema_value))
  errors.append(_type_message(path, _expected_name(type(schema_value)), value))
  return value


def _matches(value, expected: type) -> bool:
  """Whether `value` is acceptable where the schema holds an `expected`."""
  if isinstance(value, bool) or expected is bool:
    # bool subclasses int, but a flag given as 1 (or a count as True) is a bug.
    return isinstance(value, bool) and expected is bool
  if expected is float:
    return isinstance(value, (int, float))
  if expected in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, expected)


def _coerce(value, expected: type):
  """Converts an accepted value to the schema's exact type where they differ."""
  if value is None:
    return value
  if expected is float and not isinstance(value, float):
    return float(value)
  if expected in (tuple, list) and not isinstance(value, expected):
    return expected(value)
  return value


def _unknown_key_message(key, schema, path) -> str:
  valid = [str(k) for k in schema]
  close = difflib.get_close_matches(str(key), valid, n=1)
  if close:
    hint = f"did you mean {path}.{close[0]}?"
  elif valid:
    hint = "valid fields here: " + ", ".join(sorted(valid))
  else:
    hint = "no fields are allowed here"
  return f"{path}.{key}: unknown field; {hint}"


def _type_message(path, expected: str, value) -> str:
  shown = repr(value)
  if len(shown) > 60:
    shown = shown[:57] + "..."
  return f"{path}: expected {expected}, got {_type_name(value)} {shown}"


def _expected_name(expected: type) -> str:
  if expected in (tuple, list):
    return "tuple or list"
  if expected is float:
    return "float (or int)"
  return expected.__name__


def _type_name(value) -> str:
  return type(value).__name__


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config` to `workdir/config.json`, keeping any different old one.

  An existing different config.json (from an earlier run in the same workdir)
  is renamed to the first free `config.<N>.json`, N >= 1, so no record of
  what produced earlier outputs is lost.

  Args:
    config: the resolved config.
    workdir: an existing directory.

  Returns:
    The path of the written config.json.
  """
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2) + "\n"
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.rename(path, os.path.join(workdir, f"config.{n}.json"))
    logging.info("Kept the previous config as config.%d.json", n)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path
