"""The RL4VLM card games: environments, prompts, response parsing, experts and the CoT agent.

The games themselves are pure JAX (`envs`: `make(name)` -> `CardEnv`), drawn by
`render`, with exact formula arithmetic and the 24 solver in `arith` and a
gymnasium wrapper in `gym`.
"""

from latent_mca.cards.envs import GAMES, CardEnv, make

__all__ = ["GAMES", "CardEnv", "make"]
