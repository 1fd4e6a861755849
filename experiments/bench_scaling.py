r"""Sharded train steps on simulated CPU devices: compile time and step time vs device count.

  python -m experiments.bench_scaling [--devices 1,2,4,8] [--repeats 5] [--out_dir results]

For each device count N a subprocess runs with N simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) and, for each layout that fits N
(data=N; fsdp=N; fsdp=N/2 x tensor=2; on one device also the plain jit without a
layout), builds the TrainState with `Layout.init_state` and times two train steps as
`training.train` runs them (`loop.jit_step`, batches placed by `Layout.put_batch`,
traced in `Layout.context()`):

  backbone        `stages.backbone.train_step` (pretrain / sft) of the pipeline's default
                  backbone (4 layers of width 128, a 2-block vision tower, vocabulary
                  2048) on 8 x 128 tokens, one 4x4-patch image per row;
  inverse_warmup  the first latent stage's step (`latent.steps.inverse_warmup_step`) on
                  the same backbone, frozen, with the default latent modules, on 8 paired
                  rows (with and without their image).

Measured: compile time (trace + lower + XLA compile, ahead of time), step time (median
and fastest of --repeats calls after a warm-up call) and the TrainState's bytes on one
device (parameters and Adam's moments: what fsdp and tensor split).

Simulated devices are not extra hardware: they are one process's threads sharing the
host's cores, so N devices do the same work with more partitioning and collectives.
The table measures the sharding's overhead (at compile time and per step) and how
compile time grows with the mesh, not a speedup. Writes results/scaling_cpu.json
(everything) and .md (the tables).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags
import flax
import jax
import numpy as np

from latent_mca.jobs import pipeline
from latent_mca.latent import steps as steps_lib
from latent_mca.models import qwen2_5_vl
from latent_mca.parallel import mesh as mesh_lib
from latent_mca.stages import backbone, latent
from latent_mca.training import loop, state as state_lib

_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Simulated device counts.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per step, after a warm-up call.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results", "Where scaling_cpu.{json,md} go.")
_WORKER = flags.DEFINE_integer("worker", 0, "Internal: run the measurements on this many "
                               "devices and print them (the parent sets XLA_FLAGS).")

BATCH, SEQ_LEN, GRID = 8, 128, (1, 4, 4)
STEPS = ("backbone", "inverse_warmup")
RESULT = "RESULT "  # prefix of a worker's JSON lines


def layouts(num_devices: int) -> dict[str, dict | None]:
  """name -> mesh sizes (None: the plain jit, one device) of the layouts that fit."""
  out = {"plain jit": None} if num_devices == 1 else {}
  out[f"data={num_devices}"] = dict(data=num_devices, fsdp=1, tensor=1)
  if num_devices > 1:
    out[f"fsdp={num_devices}"] = dict(data=1, fsdp=num_devices, tensor=1)
    half = f"fsdp={num_devices // 2} x " if num_devices > 2 else ""
    out[f"{half}tensor=2"] = dict(data=1, fsdp=num_devices // 2, tensor=2)
  return out


# ----------------------------------------------------------------------------- worker


def _fields(config) -> dict:
  """Config fields with lists as tuples (model configs are hashable)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _model_config():
  """The pipeline's default backbone, with a 2048-token vocabulary and its own special ids."""
  b = pipeline.default_config().backbone
  text = qwen2_5_vl.TextConfig(vocab_size=2048, **_fields(b.text))
  vision = qwen2_5_vl.VisionConfig(out_hidden_size=text.hidden_size, **_fields(b.vision))
  return qwen2_5_vl.Qwen2_5_VLConfig(
      text=text, vision=vision, tie_word_embeddings=b.tie_word_embeddings, image_token_id=2040,
      video_token_id=2041, vision_start_token_id=2042, vision_end_token_id=2043,
      bos_token_id=None, eos_token_id=(2,), pad_token_id=0)


def _batch(cfg, seed: int, image: bool = True) -> dict:
  """BATCH rows of SEQ_LEN tokens: [vision_start, image tokens, vision_end, text] (or the
  image's tokens as padding), left-padded by a few tokens per row."""
  rng = np.random.default_rng(seed)
  merged = int(np.prod(GRID)) // cfg.vision.spatial_merge_size**2
  rows = []
  for i in range(BATCH):
    head = ([cfg.vision_start_token_id] + [cfg.image_token_id] * merged +
            [cfg.vision_end_token_id]) if image else [0] * (merged + 2)
    text = rng.integers(3, 2000, size=SEQ_LEN - merged - 2 - i).tolist()
    rows.append([0] * i + head + text)
  ids = np.array(rows, np.int32)
  mask = (ids != 0).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}
  if image:
    batch["pixel_values"] = rng.normal(size=(BATCH * int(np.prod(GRID)), 1176)).astype(np.float32)
    batch["image_grid_thw"] = np.array([GRID] * BATCH, np.int32)
  return batch


def _setup(name: str):
  """(step, make_state, params, boxed params, batch) of a benchmarked step."""
  cfg = _model_config()
  params = qwen2_5_vl.init_params(cfg, jax.random.key(0))
  optimizer = state_lib.optimizer_config()
  if name == "backbone":
    step = functools.partial(backbone.train_step, model=qwen2_5_vl.Qwen2_5_VL(cfg))
    extra, boxed, batch = {}, qwen2_5_vl.abstract_params(cfg), _batch(cfg, 0)
  else:
    system = steps_lib.LatentSystem.build(cfg, latent.latent_config(pipeline.default_config()))
    optimizer.trainable = latent.TRAINABLE[name]
    step = functools.partial(steps_lib.STEPS[name], system=system)
    params, extra = system.init(params, jax.random.key(1))
    boxed = system.boxed_params()
    batch = {"paired": {"image": _batch(cfg, 0), "text": _batch(cfg, 0, image=False)}}
  tx = state_lib.make_optimizer(optimizer, 1000)
  make_state = functools.partial(state_lib.TrainState.create, tx=tx, rng=jax.random.key(2),
                                 extra=extra)
  return step, make_state, params, boxed, batch


def _bytes_on_device(tree, device) -> int:
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


def measure(name: str, sizes: dict | None, repeats: int) -> dict:
  """Compile and step times of one step on one layout (None: plain jit, one device)."""
  step, make_state, params, boxed, batch = _setup(name)
  if sizes is None:
    layout, state, placed = None, jax.jit(make_state)(params), batch
    context = contextlib.nullcontext()
  else:
    config = mesh_lib.mesh_config()
    config.update(sizes)
    layout = mesh_lib.Layout.from_config(config, make_state, boxed)
    state, placed = layout.init_state(make_state, params), layout.put_batch(batch)
    context = layout.context()
  state_bytes = _bytes_on_device(state, jax.devices()[0])
  with context:
    began = time.perf_counter()
    lowered = loop.jit_step(step, layout).lower(state, placed, 1)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    times = []
    for i in range(repeats + 1):
      start = time.perf_counter()
      state, metrics = compiled(state, placed, i + 1)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
  times = times[1:]
  return {"step": name, "devices": jax.device_count(), "mesh": sizes,
          "trace_lower_s": lowered_at - began, "xla_compile_s": compiled_at - lowered_at,
          "compile_s": compiled_at - began, "step_ms_median": 1e3 * float(np.median(times)),
          "step_ms_min": 1e3 * min(times), "state_mib_per_device": state_bytes / 2**20,
          "loss": float(metrics["loss"]), "load_average": os.getloadavg()[0]}


def worker(num_devices: int, repeats: int) -> None:
  if jax.device_count() != num_devices:
    raise RuntimeError(f"expected {num_devices} devices, got {jax.device_count()}: XLA_FLAGS="
                       f"{os.environ.get('XLA_FLAGS', '')!r}")
  for name in STEPS:
    for layout_name, sizes in layouts(num_devices).items():
      record = measure(name, sizes, repeats)
      record["layout"] = layout_name
      print(RESULT + json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- parent


def _host() -> dict:
  cpu_model = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu_model)
  return {"platform": platform.platform(), "cpu": cpu_model, "cpu_count": os.cpu_count(),
          "cpus_available": len(os.sched_getaffinity(0)),
          "versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "flax": flax.__version__, "numpy": np.__version__}}


def run_worker(num_devices: int, repeats: int) -> list[dict]:
  flags_ = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      flags_ + [f"--xla_force_host_platform_device_count={num_devices}"]))
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_scaling",
                         f"--worker={num_devices}", f"--repeats={repeats}"],
                        env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"the {num_devices}-device worker failed:\n{proc.stderr[-5000:]}")
  return [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines()
          if line.startswith(RESULT)]


def markdown(report: dict) -> str:
  host = report["host"]
  lines = [
      "# Sharded train steps on simulated CPU devices",
      "",
      f"{report['date']}, `{report['command']}`; {host['cpu']} ({host['cpus_available']} "
      f"cores available), {host['platform']}, jax {host['versions']['jax']}, flax "
      f"{host['versions']['flax']}. Load average (1 min) at start/end: "
      f"{report['load_average'][0]:.2f}/{report['load_average'][1]:.2f}. XLA_FLAGS: "
      f"`{report['xla_flags'] or '(none)'}` plus the device count.",
      "",
      "**Simulated devices share the same cores**: N devices are N threads of one process "
      "on the host's cores, doing the same total work as one device plus the partitioning "
      "and collectives of the layout. These numbers measure the sharding's overhead (compile "
      "time and per step) and how compile time grows with the mesh, not a speedup.",
      "",
      f"Steps: `backbone` = `stages.backbone.train_step` of the pipeline's default backbone "
      f"(4 x 128 decoder, 2-block vision tower, vocabulary 2048) and `inverse_warmup` = the "
      f"first latent stage's step on it (default latent modules, backbone frozen); "
      f"{BATCH} x {SEQ_LEN} tokens per batch, one {GRID[1]}x{GRID[2]}-patch image per row. "
      f"Compile = trace + lower + XLA compile (ahead of time); step = median (fastest) of "
      f"{report['repeats']} calls after a warm-up call; state = the TrainState's MiB on one "
      "device (parameters + Adam moments); load = the host's 1-minute load average after "
      "the row's measurement, the benchmark's own busy cores included (the host is shared: "
      "a load well above the core count means other processes slowed the row down).",
  ]
  for name in STEPS:
    lines += ["", f"## {name}", "",
              "| devices | layout | compile, s (XLA part) | step, ms: median (min) | "
              "state MiB/device | load |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in report["results"]:
      if r["step"] == name:
        lines.append(f"| {r['devices']} | {r['layout']} | {r['compile_s']:.1f} "
                     f"({r['xla_compile_s']:.1f}) | {r['step_ms_median']:.0f} "
                     f"({r['step_ms_min']:.0f}) | {r['state_mib_per_device']:.2f} | "
                     f"{r['load_average']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _WORKER.value:
    worker(_WORKER.value, _REPEATS.value)
    return
  command = "python -m experiments.bench_scaling " + " ".join(shlex.quote(a)
                                                               for a in sys.argv[1:])
  load_start = os.getloadavg()[0]
  results = []
  for n in [int(d) for d in _DEVICES.value]:
    results += run_worker(n, _REPEATS.value)
    print(f"{n} devices done", flush=True)
  report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command.strip(), "host": _host(), "repeats": _REPEATS.value,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average": [load_start, os.getloadavg()[0]], "results": results}
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUT_DIR.value, "scaling_cpu")
  with open(path + ".json", "w") as f:
    json.dump(report, f, indent=2)
  with open(path + ".md", "w") as f:
    f.write(markdown(report))
  print(markdown(report))


if __name__ == "__main__":
  app.run(main)
