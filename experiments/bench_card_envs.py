r"""Card-game environment steps per second with rendering: JAX (ours) against PIL (reference).

  python -m experiments.bench_card_envs [--num_envs 1024] [--steps 2] [--repeats 5]
                                        [--games numberline,ezpoints,points24,blackjack]
                                        [--out_dir results]

Both sides step `num_envs` environments with uniformly random actions (indices into
`env.actions`, all of which the games accept) and auto-reset, and produce every
environment's 300x300 frame at every step:

  ours  `jit(vmap(env.step_autoreset))` of `latent_mca.cards.envs` over all
        environments, the frames drawn in JAX (`cards.render`), `block_until_ready`
        after each step;
  PIL   the reference's approach (RL4VLM's gym-cards), reimplemented minimally below:
        one gymnasium `Env` per instance with the game in Python and each frame
        drawn with PIL (a fresh canvas, card images pasted through their rounded-
        corner masks, ImageDraw text in DejaVu Sans, returned as numpy), stepped in
        a Python loop that auto-resets and stacks the frames, as
        `gymnasium.vector.SyncVectorEnv` does (whose setup alone, batching 1024
        300x300 Box spaces, takes half a minute). The card images are drawn once
        and reused, which flatters PIL: the reference reads card image files.

Each side is timed for `repeats` runs of `steps` steps after a warm-up step (ours:
its compile time is reported apart), the two sides' runs alternating so that both
see the same machine load; steps/s is the median run's environment steps per
second. Writes `results/bench_card_envs_<device>.json` and `.md`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import gymnasium
import jax
import numpy as np
from absl import app, flags
from gymnasium import spaces
from PIL import Image, ImageDraw

from latent_mca.cards import envs, glyphs, render

flags.DEFINE_integer("num_envs", 1024, "environments stepped together")
flags.DEFINE_integer("steps", 2, "steps per timed run")
flags.DEFINE_integer("repeats", 5, "timed runs of each side, interleaved (median)")
flags.DEFINE_list("games", list(envs.GAMES), "games to measure")
flags.DEFINE_integer("seed", 0, "seed of the deals and actions")
flags.DEFINE_string("out_dir", "results", "where the results go")
F = flags.FLAGS


# --- ours -----------------------------------------------------------------------------------


class OursVector:
  """`num_envs` environments stepped by one `jit(vmap(env.step_autoreset))` call per step."""

  def __init__(self, env: envs.CardEnv, num_envs: int, seed: int):

    @jax.jit
    def step(state, key):
      key, action_key, step_key = jax.random.split(key, 3)
      actions = jax.random.randint(action_key, (num_envs,), 0, env.num_actions)
      obs, state, *_ = jax.vmap(env.step_autoreset)(jax.random.split(step_key, num_envs),
                                                    state, actions)
      return obs, state, key

    self._step, self.key = step, jax.random.key(seed)
    self.obs, self.state = jax.jit(jax.vmap(env.reset))(jax.random.split(self.key, num_envs))

  def step(self) -> None:
    self.obs, self.state, self.key = self._step(self.state, self.key)
    self.obs.block_until_ready()


# --- the reference's approach: Python games drawn with PIL ----------------------------------


class PilCards:
  """Card images drawn once with PIL (RGBA, rounded corners), by (rank, suit) or "back"."""

  def __init__(self, width: int, height: int):
    self.size = (width, height)
    self.images = {}
    index_font = glyphs.font(max(10, width // 5), True)
    centre_font = glyphs.font(width // 2)
    for suit, char in enumerate(glyphs.SUIT_CHARS):
      ink = render.RED if suit in (1, 2) else render.BLACK
      for rank in range(1, 14):
        card = self._blank()
        draw = ImageDraw.Draw(card)
        index = f"{glyphs.RANK_NAMES[rank - 1]}\n{char}"
        draw.multiline_text((3, 2), index, font=index_font, fill=ink, align="center")
        corner = card.crop((0, 0, width // 2, height // 2)).rotate(180)
        card.alpha_composite(corner, (width - width // 2, height - height // 2))
        draw.text((width // 2, height // 2), char, font=centre_font, fill=ink, anchor="mm")
        self.images[rank, suit] = card
    back = self._blank()
    ImageDraw.Draw(back).rounded_rectangle((4, 4, width - 5, height - 5), 3, fill=(36, 56, 140))
    self.images["back"] = back

  def _blank(self) -> Image.Image:
    card = Image.new("RGBA", self.size, (0, 0, 0, 0))
    ImageDraw.Draw(card).rounded_rectangle((0, 0, self.size[0] - 1, self.size[1] - 1), 6,
                                           fill="white", outline=(140, 140, 140))
    return card


_PIL_CARDS = {}


def pil_cards(width: int, height: int) -> PilCards:
  if (width, height) not in _PIL_CARDS:
    _PIL_CARDS[width, height] = PilCards(width, height)
  return _PIL_CARDS[width, height]


class PilCardEnv(gymnasium.Env):
  """One card game in Python, rendered with PIL each step (the reference's design).

  The rules are the SPEC's, simplified where it does not change the work per step:
  Points24 deals are not checked for solvability, and a formula is evaluated with
  Python's `eval`, as in the reference.
  """

  observation_space = spaces.Box(0, 255, (render.SIZE, render.SIZE, 3), np.uint8)

  def __init__(self, game: str):
    self.game = game
    self.actions = envs.ACTIONS[game]
    self.action_space = spaces.Discrete(len(self.actions))

  def _card(self):
    return int(self.np_random.integers(1, 14)), int(self.np_random.integers(0, 4))

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    self.steps = 0
    if self.game == "numberline":
      self.target = int(self.np_random.integers(0, 6))
      self.current = (self.target + 1 + int(self.np_random.integers(0, 5))) % 6
    elif self.game == "blackjack":
      self.dealer, self.player = [self._card(), self._card()], [self._card(), self._card()]
      self.done = False
    else:
      self.cards = [self._card() for _ in range(envs.NUM_CARDS[self.game])]
      self.formula = []
    return self._render(), {}

  def step(self, action):
    symbol, reward, done = self.actions[action], 0.0, False
    self.steps += 1
    if self.game == "numberline":
      before = abs(self.current - self.target)
      self.current = min(max(self.current + (1 if symbol == "+" else -1), 0), 5)
      after = abs(self.current - self.target)
      reward = 1.0 if after == 0 else (-1.0 if after >= before else 0.0)
      done = after == 0 or self.steps >= 10
    elif self.game == "blackjack":
      if symbol == "hit":
        self.player.append(self._card())
        done = _total(self.player) > 21
        reward = -1.0 if done else 0.0
      else:
        while _total(self.dealer) < envs.DEALER_STANDS:
          self.dealer.append(self._card())
        score = lambda hand: 0 if _total(hand) > 21 else _total(hand)
        reward, done = float(np.sign(score(self.player) - score(self.dealer))), True
      self.done = done
    else:
      limit = envs.DEFAULT_FORMULA_LENGTH[self.game]
      values = sorted(min(rank, 10) for rank, _ in self.cards)
      if len(self.formula) > limit:
        reward, done = -1.0, True
      elif symbol == "=":
        try:
          value = eval("".join(self.formula))  # pylint: disable=eval-used
        except Exception:  # pylint: disable=broad-except  # any malformed formula fails
          value = None
        used = sorted(int(s) for s in self.formula if s.isdigit())
        done = True
        reward = 10.0 if value == envs.TARGETS[self.game] and used == values else -1.0
      elif symbol.isdigit() and self.formula.count(symbol) >= values.count(int(symbol)):
        reward = -1.0
      else:
        self.formula.append(symbol)
    return self._render(), reward, done, False, {}

  def _render(self) -> np.ndarray:
    if self.game == "numberline":
      canvas = Image.new("RGB", (render.SIZE, render.SIZE), render.WHITE)
      draw = ImageDraw.Draw(canvas)
      font = glyphs.font(render.NUMBER_TEXT, True)
      for text, top in zip((f"Target: {self.target}", f"Current: {self.current}"),
                           render.NUMBER_Y):
        draw.text((render.NUMBER_X, top), text, font=font, fill=render.BLACK)
      return np.asarray(canvas)
    canvas = Image.new("RGB", (render.SIZE, render.SIZE), render.GREEN)
    draw = ImageDraw.Draw(canvas)
    if self.game == "blackjack":
      cards, label = pil_cards(render.SMALL.width, render.SMALL.height), glyphs.font(15, True)
      hands = (("Dealer", self.dealer, render.DEALER_Y), ("Player", self.player, render.PLAYER_Y))
      for name, hand, top in hands:
        draw.text((10, top), name, font=label, fill="white")
        step = min(72, 216 // max(len(hand) - 1, 1))
        for i, card in enumerate(hand):
          image = cards.images["back" if name == "Dealer" and i == 1 and not self.done else card]
          canvas.paste(image, (10 + i * step, top + 22), image)
      return np.asarray(canvas)
    large = len(self.cards) == 2
    size = render.LARGE if large else render.SMALL
    cards = pil_cards(size.width, size.height)
    left = (render.SIZE - len(self.cards) * (size.width + 8) + 8) // 2
    top = 36 if large else 72
    for i, card in enumerate(self.cards):
      canvas.paste(cards.images[card], (left + i * (size.width + 8), top), cards.images[card])
    font, wrapped = glyphs.font(render.FORMULA_TEXT), range(0, len(self.formula), 9)
    lines = ([f"Formula: {' '.join(self.formula)}"] if large else
             ["Formula:"] + [" ".join(self.formula[i:i + 9]) for i in wrapped])
    for k, line in enumerate(lines):
      draw.text((12, top + size.height + 20 + 24 * k), line, font=font, fill=render.FORMULA_INK)
    return np.asarray(canvas)


def _total(hand) -> int:
  hard = sum(min(rank, 10) for rank, _ in hand)
  return hard + 10 if any(rank == 1 for rank, _ in hand) and hard + 10 <= 21 else hard


class PilVector:
  """`num_envs` `PilCardEnv`s stepped in a Python loop, auto-reset, frames stacked."""

  def __init__(self, game: str, num_envs: int, seed: int):
    self.instances = [PilCardEnv(game) for _ in range(num_envs)]
    self.obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.instances)])
    self.rng = np.random.default_rng(seed)
    self.num_actions = len(envs.ACTIONS[game])

  def step(self) -> None:
    actions = self.rng.integers(0, self.num_actions, len(self.instances))
    for i, (env, action) in enumerate(zip(self.instances, actions)):
      frame, _, terminated, truncated, _ = env.step(action)
      self.obs[i] = env.reset()[0] if terminated or truncated else frame


def _seconds(fn, calls: int = 1) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return time.perf_counter() - start


def bench_game(game: str, num_envs: int, steps: int, repeats: int, seed: int) -> dict:
  """Steps/s of both sides, their timed runs interleaved so that both see the same load."""
  ours = OursVector(envs.make(game), num_envs, seed)
  first = _seconds(ours.step)  # compile + one step
  pil = PilVector(game, num_envs, seed)
  pil.step()  # warm-up: fonts, card images
  times = {"ours": [], "pil": []}
  for _ in range(repeats):
    times["ours"].append(_seconds(ours.step, steps))
    times["pil"].append(_seconds(pil.step, steps))
  assert ours.obs.shape == pil.obs.shape == (num_envs, render.SIZE, render.SIZE, 3)
  median = {side: float(np.median(t)) for side, t in times.items()}
  rate = {side: num_envs * steps / m for side, m in median.items()}
  return dict(ours_steps_per_s=rate["ours"], pil_steps_per_s=rate["pil"],
              ratio=rate["ours"] / rate["pil"], ours_compile_s=first - median["ours"] / steps)


# --- main -----------------------------------------------------------------------------------


def main(argv):
  del argv
  load = os.getloadavg()[0]
  results = {}
  for game in F.games:
    results[game] = bench_game(game, F.num_envs, F.steps, F.repeats, F.seed)
    print(game, results[game], flush=True)
  name = "gpu" if jax.default_backend() == "gpu" else "cpu"
  command = "python -m experiments.bench_card_envs " + " ".join(sys.argv[1:])
  record = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                load_average_at_start=load, command=command.strip(),
                setup=dict(num_envs=F.num_envs, steps=F.steps, repeats=F.repeats, seed=F.seed),
                results=results)
  os.makedirs(F.out_dir, exist_ok=True)
  with open(os.path.join(F.out_dir, f"bench_card_envs_{name}.json"), "w") as f:
    json.dump(record, f, indent=2)
  lines = [f"# Card environments with rendering: JAX vs PIL ({record['date']}, "
           f"{record['device']}, {record['cpus']} CPUs)", "",
           f"`{record['command']}`", "",
           f"{F.num_envs} environments, random actions, auto-reset, a 300x300 frame per "
           f"environment per step; median of {F.repeats} runs of {F.steps} steps after a "
           f"warm-up step, the two sides' runs alternating. Ours: `jit(vmap(env.step_autoreset))`; PIL: the reference's "
           f"design, a Python game per environment drawn with PIL, stepped in a Python "
           f"loop. Load average at start: {load:.1f} (on a shared machine both sides slow "
           f"down; alternating their runs keeps the ratio fair). Each step writes "
           f"{F.num_envs * render.SIZE * render.SIZE * 3 / 2 ** 20:.0f} MiB of frames.", "",
           "| game | ours steps/s | PIL steps/s | ours / PIL | ours compile s |",
           "|---|---:|---:|---:|---:|"]
  for game, r in results.items():
    lines.append(f"| {game} | {r['ours_steps_per_s']:.0f} | {r['pil_steps_per_s']:.0f} | "
                 f"{r['ratio']:.1f}x | {r['ours_compile_s']:.1f} |")
  with open(os.path.join(F.out_dir, f"bench_card_envs_{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
