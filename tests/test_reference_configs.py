"""The reference configs (configs/qwen2_5_vl_{3b,7b}.py): they load as the runner loads
them, pass its validation against the pipeline's schema and hold SPEC's values. No model
is built and nothing runs."""

import os

from absl import flags
from ml_collections import config_flags
import pytest

from experiments import run
from latent_mca.config_schema import ConfigError
from latent_mca.jobs import pipeline
from latent_mca.stages import rl

_CONFIGS = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         f"qwen2_5_vl_{size}.py") for size in ("3b", "7b")]
_CHECKPOINT = "/models/Qwen2.5-VL-Instruct"


def _load(argument: str, *overrides: str):
  """The raw config of `--config=argument overrides...`, parsed by config_flags as the runner
  does (on a private FlagValues, so the runner's own flags are untouched)."""
  argv = ["test", f"--config={argument}", *overrides]
  values = flags.FlagValues()
  # config_flags reads the override flags from sys_argv when the flag is defined.
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=False,
                                  sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("path", _CONFIGS)
@pytest.mark.parametrize("how", ["arg", "flag"])
def test_validates_with_a_checkpoint(path, how):
  raw = _load(f"{path}:{_CHECKPOINT}") if how == "arg" else _load(
      path, f"--config.backbone.checkpoint={_CHECKPOINT}")
  job, config = run.resolve_config(raw)  # the runner's validation, against default_config()
  assert job is pipeline
  assert config.backbone.checkpoint == _CHECKPOINT
  assert config.backbone.remat == "full"
  assert config.stages.split(",") == pipeline.ALL_STAGES.split(",") + [
      "rl", "evaluate", "report"]


@pytest.mark.parametrize("path", _CONFIGS)
def test_without_a_checkpoint_validation_names_the_field(path):
  raw = _load(path)  # get_config() itself still returns a config
  with pytest.raises(ConfigError, match=r"config\.backbone\.checkpoint: expected str"):
    run.resolve_config(raw)


@pytest.mark.parametrize("path", _CONFIGS)
def test_holds_spec_values(path):
  _, c = run.resolve_config(_load(f"{path}:{_CHECKPOINT}"))
  # SPEC section 2, the latent action model's table and "Quantisation".
  assert c.latent.num_codes == 128
  assert c.latent.quantizer == "gumbel" and c.latent.gumbel_tau == 2.0
  assert c.latent.entropy_coef == 1e-3
  assert (c.latent.idm_layers, c.latent.policy_layers, c.latent.world_model_merge_layers) == (
      4, 8, 2)
  # SPEC section 2, stage 3: L_proj and L_cycle weighted 1e-5; the ablations start on.
  assert c.latent.proj_nll_coef == 1e-5 and c.latent.cycle_coef == 1e-5
  assert c.latent.use_cycle and c.latent.use_projector and c.latent.use_text_only
  # SPEC section 2, stage 5: the world model conditioned on the frozen policy's argmax code.
  assert c.latent_sft.codes == "policy"
  # SPEC section 2, "RL in latent space": group 8, lr 1e-6 constant, top-k 32, temperature 1.
  assert c.rl.group_size == 8
  assert c.rl.optimizer.learning_rate == 1e-6 and c.rl.optimizer.schedule == "constant"
  assert c.rl.latent_top_k == 32 and c.rl.temperature == 1.0
  # SPEC section 5's table: GRPO and Dr.GRPO, token and latent.
  assert set(c.rl.algorithm.split(",")) == {"grpo", "dr_grpo"}
  assert set(c.rl.action_space.split(",")) == {"latent", "token"}
  for name in c.rl.algorithm.split(","):
    one = c.copy_and_resolve_references()
    one.rl.algorithm = name
    algorithm = rl._algorithm(one)  # what the rl stage runs
    # SPEC section 2: k3 KL beta 0.01, clip epsilon 0.2.
    assert algorithm.kl_beta == 0.01
    assert algorithm.eps_low == algorithm.eps_high == 0.2


def test_3b_and_7b_share_the_settings():
  configs = [run.resolve_config(_load(f"{path}:{_CHECKPOINT}"))[1].to_dict() for path in _CONFIGS]
  assert configs[0] == configs[1]
