"""Multi-host training for real: two JAX processes on this machine against one.

`tests/multihost_worker.py` trains the tiny backbone for a few steps on 8 simulated CPU
devices, once as two processes of 4 devices (coordinator on loopback, each process
reading its own half of every global batch) and once as one process of 8. The test
checks that the losses agree, and that the checkpoint the two processes wrote restores
in this (single-device) process to exactly their final params. `experiments.run`
starts the runtime from the environment in two processes, and only process 0 writes
the run's files. The `resolve` tests check the settings `initialize` starts the
runtime with, without starting it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from latent_mca.data.batching import process_rows
from latent_mca.parallel import distributed
from latent_mca.training import checkpoint
from tests import multihost_worker as worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a stuck process (e.g. waiting for a peer that died) fails the test here


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Worker:
  name: str
  proc: subprocess.Popen
  log: pathlib.Path  # stdout and stderr, to files: a full pipe would stall a process

  def output(self) -> str:
    return self.log.read_text()


def process_env(num_devices: int, coordinator: str = "", num_processes: int = 1,
                process_id: int = 0) -> dict[str, str]:
  """The environment of a process with `num_devices` CPU devices, one of `num_processes`."""
  env = {key: value for key, value in os.environ.items() if not key.startswith("LATENT_MCA_")}
  env.update({
      "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
      "JAX_PLATFORMS": "cpu",
      # Optimisation level 0 halves the compile time; every run here uses it, so they compare.
      "XLA_FLAGS": (f"--xla_force_host_platform_device_count={num_devices} "
                    "--xla_backend_optimization_level=0"),
  })
  if num_processes > 1:
    env.update({distributed.ENV_COORDINATOR: coordinator,
                distributed.ENV_NUM_PROCESSES: str(num_processes),
                distributed.ENV_PROCESS_ID: str(process_id)})
  return env


def start(name: str, module_args: list[str], env: dict[str, str],
          log_dir: pathlib.Path) -> Worker:
  """Starts `python -m <module_args>` with `env`, its output to log_dir/<name>.log."""
  log = log_dir / f"{name.replace(' ', '_')}.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
  return Worker(name, proc, log)


def start_worker(name: str, workdir: pathlib.Path, env: dict[str, str]) -> Worker:
  return start(name, ["tests.multihost_worker", "--workdir", str(workdir)], env, workdir.parent)


def wait_all(workers: list[Worker]) -> dict[str, str]:
  """Waits for every worker; their outputs by name. When one fails, or TIMEOUT_S passes,
  kills the rest (a dead peer leaves the others waiting in collectives) and fails the
  test with every worker's exit status and output."""
  deadline = time.monotonic() + TIMEOUT_S
  while True:
    codes = [w.proc.poll() for w in workers]
    failed = any(code not in (None, 0) for code in codes)
    timed_out = time.monotonic() > deadline
    if None not in codes or failed or timed_out:
      break
    time.sleep(0.2)
  for w in workers:
    if w.proc.poll() is None:
      w.proc.kill()
    w.proc.wait()
  if any(w.proc.returncode != 0 for w in workers):
    report = "\n".join(f"===== {w.name}: exit status {w.proc.returncode}\n{w.output()[-8000:]}"
                       for w in workers)
    reason = f"still running after {TIMEOUT_S} s, killed" if timed_out else "a worker failed"
    pytest.fail(f"{reason}:\n{report}")
  return {w.name: w.output() for w in workers}


def printed(output: str, tag: str) -> list[str]:
  """The rest of each line of `output` that starts with `tag`."""
  return [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(tag + " ")]


def printed_json(output: str, tag: str):
  """The JSON value of the one line of `output` that starts with `tag`."""
  lines = printed(output, tag)
  assert len(lines) == 1, f"expected one {tag} line in:\n{output}"
  return json.loads(lines[0])


def test_two_processes_train_as_one_and_their_checkpoint_restores_in_one(tmp_path):
  two, one = tmp_path / "two_processes", tmp_path / "one_process"
  two.mkdir()
  one.mkdir()
  coordinator = f"127.0.0.1:{free_port()}"
  outputs = wait_all([start_worker("process 0 of 2", two, process_env(4, coordinator, 2, 0)),
                      start_worker("process 1 of 2", two, process_env(4, coordinator, 2, 1)),
                      start_worker("single process", one, process_env(8))])

  # Each process read its own half of every global batch: together, the single process's.
  read = {name: printed_json(out, "READ") for name, out in outputs.items()}
  assert len(read["single process"]) == worker.NUM_STEPS
  for step, batch in enumerate(read["single process"]):
    halves = [read[f"process {p} of 2"][step] for p in range(2)]
    assert [len(h) for h in halves] == [worker.GLOBAL_BATCH // 2] * 2, read
    assert halves[0] + halves[1] == batch, read

  # Both processes report the global batch's loss, identical; one process on the same
  # global batches gets the same losses up to float rounding (another reduction order).
  losses = {name: printed_json(out, "LOSSES") for name, out in outputs.items()}
  two_losses = losses["process 0 of 2"]
  assert losses["process 1 of 2"] == two_losses
  assert len(two_losses) == worker.NUM_STEPS and len(set(two_losses)) == worker.NUM_STEPS
  np.testing.assert_allclose(two_losses, losses["single process"], rtol=1e-5)

  # global_batch refused, in each process, the layouts that would misplace rows.
  for name in ("process 0 of 2", "process 1 of 2"):
    refused = [line.split(" | ")[0] for line in printed(outputs[name], "REFUSED")]
    assert refused == ["alternating", "images"], outputs[name]

  # The two-process checkpoint restores in this process, on one device, to the bits.
  result = json.loads((two / "result.json").read_text())
  assert result["losses"] == two_losses
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        worker.abstract_state(worker.make_tx()))
  with checkpoint.Checkpointer(str(two / worker.STAGE)) as checkpointer:
    restored = checkpointer.restore(target)
  assert restored.step == worker.NUM_STEPS == int(restored.state.step)
  assert restored.loader_state == result["loader_state"]
  assert restored.loader_state["step"] == worker.NUM_STEPS  # the next global batch
  assert restored.history == result["history"]
  saved = dict(np.load(two / "params.npz"))
  restored_params = worker.flat_params(restored.state.params)
  assert restored_params.keys() == saved.keys()
  for name, value in saved.items():
    np.testing.assert_array_equal(restored_params[name], value, err_msg=name)
  # ...and the single process trained to the same params, up to float rounding.
  single = dict(np.load(one / "params.npz"))
  for name, value in saved.items():
    np.testing.assert_allclose(single[name], value, atol=1e-5, err_msg=name)


FAKE_JOB_CONFIG = """
import ml_collections

def get_config(arg=None):
  return ml_collections.ConfigDict({"job": "tests.fake_job"})
"""


def test_run_starts_the_runtime_from_the_environment_and_process_0_writes(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(FAKE_JOB_CONFIG)
  coordinator = f"127.0.0.1:{free_port()}"
  # A workdir per process, to see which process wrote what (a real run shares one).
  workdirs = [tmp_path / f"workdir_{p}" for p in range(2)]
  outputs = wait_all([
      start(f"process {p} of 2", ["experiments.run", f"--config={config}",
                                  f"--workdir={workdirs[p]}", "--compilation_cache="],
            process_env(1, coordinator, 2, p), tmp_path)
      for p in range(2)])
  for p, output in enumerate(outputs.values()):
    assert f"Distributed runtime started: Settings(coordinator_address='{coordinator}', " \
           f"num_processes=2, process_id={p}," in output, output
  assert sorted(os.listdir(workdirs[0])) == ["config.json", "metrics_final.json", "ran.txt"]
  assert os.listdir(workdirs[1]) == ["ran.txt"]  # it ran the job, and wrote nothing of run's


def test_run_names_a_missing_setting(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(FAKE_JOB_CONFIG)
  env = {**process_env(1), distributed.ENV_NUM_PROCESSES: "2"}
  result = subprocess.run([sys.executable, "-m", "experiments.run", f"--config={config}",
                           f"--workdir={tmp_path / 'workdir'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert ("distributed.coordinator_address (or $LATENT_MCA_COORDINATOR), "
          "distributed.process_id (or $LATENT_MCA_PROCESS_ID) not given") in result.stderr
  assert "Traceback" not in result.stderr


def test_resolve_is_single_process_without_settings():
  assert distributed.resolve(environ={}) is None
  assert distributed.resolve({"mode": "off"},
                             environ={distributed.ENV_COORDINATOR: "h:1"}) is None
  # One process in all needs no runtime either.
  assert distributed.resolve({"coordinator_address": "h:1", "num_processes": 1,
                              "process_id": 0}, environ={}) is None


def test_resolve_reads_the_environment_and_the_config_wins():
  environ = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
             distributed.ENV_PROCESS_ID: "3", distributed.ENV_LOCAL_DEVICE_IDS: "0,1"}
  assert distributed.resolve(environ=environ) == distributed.Settings(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
      local_device_ids=(0, 1), initialization_timeout=300)
  settings = distributed.resolve({"process_id": 0, "local_device_ids": [2, 3]}, environ=environ)
  assert (settings.process_id, settings.local_device_ids) == (0, (2, 3))


def test_resolve_cluster_mode_leaves_the_rest_to_jax():
  assert distributed.resolve({"mode": "cluster"}, environ={}) == distributed.Settings(
      coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
      initialization_timeout=300)


@pytest.mark.parametrize("config, environ, message", [
    ({"mode": "sometimes"}, {}, "distributed.mode must be one of"),
    ({"coordinator_address": "10.0.0.1"}, {}, "distributed.coordinator_address must be host:port"),
    ({}, {distributed.ENV_NUM_PROCESSES: "two"}, "$LATENT_MCA_NUM_PROCESSES='two'"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {},
     "distributed.num_processes must be at least 1"),
    ({"coordinator_address": "h:1", "num_processes": 2}, {distributed.ENV_PROCESS_ID: "2"},
     "$LATENT_MCA_PROCESS_ID='2' (distributed.process_id unset) must be in [0, num_processes=2)"),
    ({"coordinator_address": "h:1"}, {},
     "distributed.num_processes (or $LATENT_MCA_NUM_PROCESSES), "
     "distributed.process_id (or $LATENT_MCA_PROCESS_ID) not given"),
    ({"local_device_ids": (-1,)}, {}, "distributed.local_device_ids must be non-negative"),
    ({"initialization_timeout": 0}, {}, "distributed.initialization_timeout must be positive"),
    ({"coordinator": "h:1"}, {}, "unknown fields ['coordinator']"),
])
def test_resolve_names_the_bad_setting(config, environ, message):
  with pytest.raises(ValueError) as error:
    distributed.resolve(config, environ=environ)
  assert message in str(error.value)


def test_initialize_is_a_no_op_for_one_process():
  distributed.initialize({"mode": "off"})
  assert jax.process_count() == 1


@pytest.mark.parametrize("batch_size, process_count", [(8, 1), (8, 2), (12, 4), (0, 2)])
def test_process_rows_tile_the_batch_in_order(batch_size, process_count):
  rows = [process_rows(batch_size, p, process_count) for p in range(process_count)]
  assert np.concatenate([np.arange(batch_size)[r] for r in rows]).tolist() == list(
      range(batch_size))
  assert len({r.stop - r.start for r in rows}) == 1


def test_process_rows_refuse_an_unequal_share():
  with pytest.raises(ValueError, match="cannot be shared equally by 4 processes"):
    process_rows(6, 0, 4)
  with pytest.raises(ValueError, match="process_index"):
    process_rows(8, 2, 2)


def test_global_batch_of_one_process_is_the_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  local = {"input_ids": np.arange(12, dtype=np.int32).reshape(4, 3), "pixel_values": None}
  batch = distributed.global_batch(local, sharding)
  assert batch["pixel_values"] is None
  assert batch["input_ids"].sharding == sharding
  np.testing.assert_array_equal(batch["input_ids"], local["input_ids"])
  assert distributed.process_batch_slice(4) == slice(0, 4)
  assert distributed.process_shard() == {"process_index": 0, "process_count": 1}
