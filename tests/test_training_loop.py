"""The training loop, optimizer and checkpoints on a toy regression MLP (CPU, seconds)."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_mca.data.batching import DataLoader
from latent_mca.training import checkpoint, loop, metrics, state as state_lib

NUM_EXAMPLES, BATCH = 24, 4  # 6 batches per epoch: 10 steps cross an epoch boundary


class ToyMLP(nn.Module):
  """A frozen `trunk` under a trainable `head`, as a policy head on a frozen backbone."""

  @nn.compact
  def __call__(self, x):  # x [B, 3] -> [B]
    h = nn.tanh(nn.Dense(8, name="trunk")(x))
    return nn.Dense(1, name="head")(h)[:, 0]


def toy_source():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(NUM_EXAMPLES, 3)).astype(np.float32)
  return [{"index": i, "x": x, "y": np.float32(x.sum())} for i, x in enumerate(xs)]


def collate(examples):
  return {"index": np.array([e["index"] for e in examples], np.int32),  # [B]
          "x": np.stack([e["x"] for e in examples]),  # [B, 3]
          "y": np.array([e["y"] for e in examples])}  # [B]


def make_loader():
  return DataLoader(toy_source(), BATCH, collate_fn=collate, seed=1)


def make_state(num_steps=10, trainable=("head/.*",)):
  model = ToyMLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
  config = state_lib.optimizer_config()
  config.learning_rate, config.warmup_steps, config.trainable = 0.05, 2, trainable
  tx = state_lib.make_optimizer(config, num_steps)
  return state_lib.TrainState.create(params, tx, jax.random.key(1),
                                     extra={"examples_seen": jnp.zeros((), jnp.int32)})


def train_step(state, batch, rng):
  """MSE on noised inputs (so the step's key matters); also counts examples in `extra`."""
  x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)

  def loss_fn(params):
    return jnp.mean((ToyMLP().apply({"params": params}, x) - batch["y"]) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  seen = state.extra["examples_seen"] + batch["index"].shape[0]
  # Which examples the step saw, as one exact integer: catches any change of data order.
  batch_key = jnp.sum(batch["index"] * 100 ** jnp.arange(BATCH, dtype=jnp.int32))
  new_state = state.apply_gradients(grads, extra={"examples_seen": seen})
  return new_state, {"loss": loss, "batch_key": batch_key}


class Killed(Exception):
  """Stands in for the process dying."""


class KilledAt:
  """Wraps a loader; dies when asked for batch `at` (1-based), as a kill between steps."""

  def __init__(self, loader, at):
    self.loader, self.at, self.served = loader, at, 0

  def __next__(self):
    if self.served + 1 == self.at:
      raise Killed
    self.served += 1
    return next(self.loader)

  def state(self):
    return self.loader.state()

  def restore(self, position):
    self.loader.restore(position)


def host(tree):
  """Numpy copies of every leaf (typed keys as their key data)."""
  def to_numpy(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(to_numpy, tree)


def bits_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(leaves_a, leaves_b))


def run(workdir, num_steps=10, loader=None, train_step_fn=None, **kwargs):
  kwargs = {"checkpoint_every": 3, "log_every": 1, **kwargs}
  return loop.train("toy", str(workdir), make_state(), train_step_fn or train_step,
                    make_loader() if loader is None else loader, num_steps, **kwargs)


def test_only_trainable_params_change(tmp_path):
  initial = make_state()
  assert state_lib.trainable_paths(initial.params, ("head/.*",)) == ["head/bias", "head/kernel"]
  # The frozen trunk has no optimizer moments: Adam's mu and nu cover the head only.
  head_size = sum(x.size for x in jax.tree.leaves(initial.params["head"]))
  assert sum(x.size for x in jax.tree.leaves(initial.opt_state) if x.ndim) == 2 * head_size
  before = host(initial.params)

  final, _ = run(tmp_path, num_steps=5)
  after = host(final.params)
  assert bits_equal(after["trunk"], before["trunk"])
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])
  assert int(final.step) == 5 and int(final.extra["examples_seen"]) == 5 * BATCH


def test_trainable_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match="polciy"):
    make_state(trainable=("polciy/.*",))


def test_resume_is_bit_identical(tmp_path):
  straight_loader = make_loader()
  straight, straight_history = run(tmp_path / "straight", loader=straight_loader)

  # Killed while fetching batch 9: checkpoints at 3 and 6; steps 7 and 8 logged but lost.
  resumed_dir = tmp_path / "resumed"
  with pytest.raises(Killed):
    run(resumed_dir, loader=KilledAt(make_loader(), at=9))
  jsonl = resumed_dir / "toy" / "metrics.jsonl"
  assert [r["step"] for r in metrics.read_metrics(jsonl)] == list(range(1, 9))
  with checkpoint.Checkpointer(str(resumed_dir / "toy")) as checkpointer:
    assert checkpointer.latest_step() == 6

  # The same call again, as after a restart: a fresh loader and a fresh init state.
  resumed_loader = make_loader()
  resumed, resumed_history = run(resumed_dir, loader=resumed_loader)

  assert bits_equal(host(resumed.params), host(straight.params))
  assert bits_equal(host(resumed.opt_state), host(straight.opt_state))
  assert int(resumed.extra["examples_seen"]) == 10 * BATCH
  assert resumed_loader.state() == straight_loader.state() == {
      "seed": 1, "epoch": 1, "step": 4, "batch_size": BATCH, "num_examples": NUM_EXAMPLES}
  records = metrics.read_metrics(jsonl)
  assert [r["step"] for r in records] == list(range(1, 11))
  # Same batches, same keys, same losses at every step, in the file and the returned history.
  assert records == resumed_history == straight_history
  assert records == metrics.read_metrics(tmp_path / "straight" / "toy" / "metrics.jsonl")

  # A finished stage run again returns its final state without training.
  again, again_history = run(resumed_dir)
  assert bits_equal(host(again.params), host(straight.params)) and again_history == records


def test_load_params_and_missing_checkpoints(tmp_path):
  missing = tmp_path / "pretrain"
  with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
    checkpoint.load_params(str(missing))
  assert str(missing / "checkpoints") in str(error.value) and "'pretrain'" in str(error.value)

  with pytest.raises(Killed):
    run(tmp_path, loader=KilledAt(make_loader(), at=5))
  with pytest.raises(checkpoint.CheckpointNotFoundError, match="step 3 of 10, not final"):
    checkpoint.load_params(str(tmp_path / "toy"))

  final, _ = run(tmp_path)
  params = checkpoint.load_params(str(tmp_path / "toy"))
  assert bits_equal(host(params), host(final.params))


def test_restore_or_init(tmp_path):
  fresh = checkpoint.restore_or_init(str(tmp_path / "toy"), make_state)
  assert fresh.step == 0 and fresh.loader_state is None and fresh.history == []
  final, history = run(tmp_path, num_steps=4)
  restored = checkpoint.restore_or_init(str(tmp_path / "toy"), lambda: make_state(num_steps=4))
  assert restored.step == 4 and restored.history == history
  assert restored.loader_state == {"seed": 1, "epoch": 0, "step": 4, "batch_size": BATCH,
                                   "num_examples": NUM_EXAMPLES}
  assert bits_equal(host(restored.state), host(final))
  assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)


def test_learning_rate_schedule():
  config = state_lib.optimizer_config()
  config.learning_rate, config.warmup_steps, config.final_fraction = 1.0, 4, 0.1
  cosine = state_lib.learning_rate_schedule(config, 20)
  np.testing.assert_allclose([cosine(0), cosine(2), cosine(4), cosine(20)], [0, 0.5, 1, 0.1],
                             atol=1e-6)
  config.schedule = "constant"
  constant = state_lib.learning_rate_schedule(config, 20)
  np.testing.assert_allclose([constant(2), constant(4), constant(20)], [0.5, 1, 1], atol=1e-6)
  config.schedule = "linear"
  with pytest.raises(ValueError, match="linear"):
    state_lib.learning_rate_schedule(config, 20)


def test_plot_metrics_writes_a_png(tmp_path):
  run(tmp_path, num_steps=4, eval_fn=lambda s: {"seen": s.extra["examples_seen"]}, eval_every=2)
  jsonl = str(tmp_path / "toy" / "metrics.jsonl")
  assert [r.get("eval/seen") for r in metrics.read_metrics(jsonl)] == [None, 8, None, 16]
  png = str(tmp_path / "curves.png")
  metrics.plot_metrics(jsonl, png, ["loss", "eval/seen"])
  with open(png, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  with pytest.raises(ValueError, match="accuracy"):
    metrics.plot_metrics(jsonl, png, ["accuracy"])
  # Grouped panels; skip_missing drops what was not logged instead of failing.
  grouped = str(tmp_path / "grouped.png")
  metrics.plot_metrics(jsonl, grouped, [["loss", "accuracy"], "eval/seen", ["accuracy"]],
                       skip_missing=True)
  with open(grouped, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  first = run("relative", num_steps=4)
  again = run("relative", num_steps=4)  # restores the final checkpoint instead of training
  assert os.path.isdir(tmp_path / "relative" / "toy" / "checkpoints" / "4")
  for a, b in zip(jax.tree.leaves(first[0].params), jax.tree.leaves(again[0].params)):
    np.testing.assert_array_equal(a, b)
  assert first[1] == again[1]


def test_equal_optimizer_configs_share_one_transformation_and_one_trace():
  config = state_lib.optimizer_config()
  config.update(dict(learning_rate=1e-2, schedule="constant", trainable=("w",)))
  again = state_lib.optimizer_config()
  again.update(dict(learning_rate=1e-2, schedule="constant", trainable=["w"]))
  tx = state_lib.make_optimizer(config, 4)
  assert state_lib.make_optimizer(again, 4) is tx
  assert state_lib.make_optimizer(config, 5) is not tx  # another horizon
  assert state_lib.make_optimizer(config, 4, frozen=("w",)) is not tx
  again.learning_rate = 2e-2
  assert state_lib.make_optimizer(again, 4) is not tx

  traces = []

  @jax.jit
  def step(state):
    traces.append(1)
    return state.apply_gradients({"w": jnp.ones(3)})

  for _ in range(2):  # two runs, each building its optimizer and state afresh
    state = state_lib.TrainState.create({"w": jnp.zeros(3)}, state_lib.make_optimizer(config, 4),
                                        jax.random.key(0))
    state = step(step(state))
    np.testing.assert_allclose(state.params["w"], -0.02, rtol=1e-5)
  assert len(traces) == 1


def test_one_step_function_is_traced_once_across_runs(tmp_path):
  # Two stages running the same step object (an ablation's and the full run's) share
  # the jitted program: `jit_step` hands back the same function.
  traces = []

  def counted(state, batch, rng):
    traces.append(1)
    return train_step(state, batch, rng)

  first, _ = run(tmp_path / "a", num_steps=2, train_step_fn=counted)
  second, _ = run(tmp_path / "b", num_steps=2, train_step_fn=counted)
  assert len(traces) == 1
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
    np.testing.assert_array_equal(a, b)
  assert loop.jit_step(counted) is loop.jit_step(counted)
  assert loop.jit_step(train_step) is not loop.jit_step(counted)


def test_plots_in_the_background_are_all_drawn_on_leaving_the_context(tmp_path):
  jsonl = str(tmp_path / "metrics.jsonl")
  with open(jsonl, "w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
  pngs = [str(tmp_path / f"curves_{i}.png") for i in range(3)]
  with metrics.background_plots():
    for png in pngs:
      metrics.plot_metrics(jsonl, png, ["loss"])
    with pytest.raises(ValueError, match="no metric"):  # checked now, not in the background
      metrics.plot_metrics(jsonl, str(tmp_path / "bad.png"), ["accuracy"])
  for png in pngs:
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not os.path.exists(tmp_path / "bad.png")


def test_a_background_plot_that_fails_raises_on_leaving_the_context(tmp_path):
  missing_folder = str(tmp_path / "no_such_folder" / "curves.png")
  jsonl = str(tmp_path / "metrics.jsonl")
  with open(jsonl, "w") as f:
    f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")
  with pytest.raises(FileNotFoundError):
    with metrics.background_plots():
      metrics.plot_metrics(jsonl, missing_folder, ["loss"])
