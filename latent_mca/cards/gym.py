"""The card games behind gymnasium's familiar API, one environment at a time.

`CardGymEnv` drives a pure `envs.CardEnv` from Python: numpy frames, a
`Discrete(len(actions))` action space, seeding through `reset(seed=...)` (the JAX key
comes from gymnasium's `np_random` and is split once per step, so a seed fixes the
episode), and `render()` giving the last frame (`render_mode="rgb_array"`). `step`
returns `terminated` for an episode the rules ended and `truncated` for one a length
limit ended (NumberLine's 10 steps, a formula grown too long); info holds the step's
flags and `describe` of the new state under "state". The jitted reset and step take
the `CardEnv` as a static argument, so every wrapper of one game shares one compilation.

Batched training should use `envs` directly (`vmap` over environments); this wrapper
is for tools that expect gymnasium. `register()` adds the ids in `GYM_IDS`
(e.g. `gymnasium.make("latent_mca/Points24-v0", solvable_only=False)`); it is not
called at import.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium
import jax
import numpy as np
from gymnasium import spaces

from latent_mca.cards import envs
from latent_mca.cards.render import SIZE

GYM_IDS = {
    "numberline": "latent_mca/NumberLine-v0",
    "ezpoints": "latent_mca/EZPoints-v0",
    "points24": "latent_mca/Points24-v0",
    "blackjack": "latent_mca/Blackjack-v0",
}


@functools.partial(jax.jit, static_argnums=0)
def _reset(env: envs.CardEnv, key):
  return env.reset(key)


@functools.partial(jax.jit, static_argnums=0)
def _step(env: envs.CardEnv, key, state, action):
  return env.step(key, state, action)


class CardGymEnv(gymnasium.Env):
  """A gymnasium environment for one card game.

  Args:
    game: a name in `envs.GAMES` or a `CardEnv`.
    render_mode: None or "rgb_array".
    **options: `CardEnv` options when `game` is a name (e.g. solvable_only=False).
  """

  metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

  def __init__(self, game: str | envs.CardEnv = "numberline", render_mode: str | None = None,
               **options):
    if render_mode not in (None, "rgb_array"):
      raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
    if isinstance(game, envs.CardEnv):
      if options:
        raise ValueError("options are for a game given by name, not for a CardEnv")
      self.env = game
    else:
      self.env = envs.make(game, **options)
    self.render_mode = render_mode
    self.action_space = spaces.Discrete(self.env.num_actions)
    self.observation_space = spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
    self._key = None
    self._state = None
    self._obs = None

  def _next_key(self):
    self._key, key = jax.random.split(self._key)
    return key

  def reset(self, *, seed: int | None = None, options: dict | None = None):
    """(obs uint8 [300, 300, 3], info with the new state's `describe` under "state")."""
    super().reset(seed=seed, options=options)
    self._key = jax.random.key(int(self.np_random.integers(0, 2 ** 32)))
    obs, self._state = _reset(self.env, self._next_key())
    self._obs = np.asarray(obs)
    return self._obs, {"state": self.env.describe(self._state)}

  def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
    """(obs, reward, terminated, truncated, info); reset after either ends the episode."""
    if self._state is None:
      raise RuntimeError("call reset() before step()")
    if not self.action_space.contains(action):
      raise ValueError(f"action {action!r} is not in {self.action_space}")
    obs, self._state, reward, done, info = _step(self.env, self._next_key(), self._state,
                                                 np.int32(action))
    info = {k: v.item() for k, v in jax.device_get(info).items()}
    truncated = bool(info["truncated"])
    self._obs = np.asarray(obs)
    info["state"] = self.env.describe(self._state)
    return self._obs, float(reward), bool(done) and not truncated, truncated, info

  def render(self):
    """The last frame (uint8 [300, 300, 3]) in "rgb_array" mode, else None."""
    return self._obs if self.render_mode == "rgb_array" else None


def register() -> None:
  """Registers the games with gymnasium under `GYM_IDS` (idempotent)."""
  for game, gym_id in GYM_IDS.items():
    if gym_id not in gymnasium.registry:
      gymnasium.register(id=gym_id, entry_point=f"{__name__}:CardGymEnv", kwargs={"game": game})
