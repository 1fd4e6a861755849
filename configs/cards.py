r"""Chain-of-thought PPO on the RL4VLM card games (SPEC section 4), one config per game.

  python -m experiments.run --config configs/cards.py:GAME --workdir workdirs/cards

GAME is numberline, ezpoints, points24 or blackjack; `numberline` is the defaults with the
reading stage of a game alone on 2 CPU cores (`cards.numberline_recipe`: 1000 glyph and
4000 reading steps); `points24` the defaults with the
Points24 recipe that wins above the reference on 2 CPU cores (`cards.points24_recipe`:
32768 expert transitions, 4000 SFT steps half of them readings of formulas up to 15
symbols, 1000 latent BC steps, PPO at lr 1e-5; results/points24_plans/README.md);
`blackjack` the defaults with the Blackjack recipe (`cards.blackjack_recipe`: 4096 expert
transitions, 1000 glyph and 4000 reading steps, 2000 SFT steps, as the Blackjack warm
start that won above the reference had, and 16 PPO updates). `all` (the default) runs the
four in one workdir, which is how the results table is made: the expert plays each game,
one tiny Qwen2.5-VL is warm-started on all four games' expert chain-of-thought, the
latent action model is fitted on the same data, then PPO runs per game in token space
and in latent space, and workdir/cards_results.md puts the success rates beside the
reference's. Runs in one workdir share the expert data, tokenizer, warm start and
latent model; each game's PPO runs are its own. `smoke` is the same graph at toy sizes
(what the tests run). `gpu` is `all` with a GPU's budget for the warm start
(`cards.gpu_budget`: 4096 expert transitions per game, 1000 glyph steps and 8000 reading
steps at batch 32) and one warm start per game, as the reference trains one model per
task (`warm_start=per_game`: 2000 SFT steps at batch 32 and the latent model, each game's
in workdir/<game>/), Points24's with its recipe as `config.per_game.points24` (a game's
expert, sft, latent_idm, latent_bc and ppo values in place of the job's; the report names
them). With one shared warm start (`--config.warm_start=shared`) the whole
job took 7 to 13 minutes on one H100 and its warm start reads the frames far better than
the CPU job's (results/cards_gpu_h100/); Blackjack trained alone reads them better still
(results/cards_gpu_h100/blackjack_alone_cpu/). `cpu` runs the four games on 2 CPU cores as
four jobs of their own (`warm_start=separate`), each in workdir/<game>/ with its own
expert data, tokenizer, reading stage and warm start: exactly the job
configs/cards.py:<game> runs (NumberLine's, Points24's and Blackjack's with their recipes,
`config.per_game.<game>`),
so a finished workdir of one of those copied to workdir/<game> is reused as it is; then
one report over the four in workdir/cards_results.md.

The PPO settings are the reference's (clip 0.1, value clip 0.1, value coef 0.5, gamma 0.9,
GAE lambda 0.95, 4 epochs, temperature 0.2, thought coefficient 0.5, gradient norm 0.01)
except the learning rate: 1e-5 moves a 7B LoRA; the from-scratch model here trains all
its weights at 1e-4 (see results/cards_cpu_reading/ for what that reaches).

From scratch the warm start never learns to read its frames (results/cards_reading/), so
the `reading` stage (after the tokenizer, before sft) runs first: a glyph curriculum
(`reading.glyph_steps`, 300), then the games' readings (`reading.steps`, 1200). It writes
W/reading/ (checkpoints, metrics.jsonl, result.json with each game's value-token accuracy
on held-out frames, true and shuffled), and sft starts from its params. With it
NumberLine's warm start wins 98% of its episodes, without it 66.5%
(results/cards_cpu_reading/ against results/cards_cpu/). `--config.reading.glyph_steps=0
--config.reading.steps=0` turns it off. A workdir whose sft finished reuses that sft as
it is. `--config.sft.reading_every=N` also makes every N-th SFT batch one of the games'
readings, so SFT keeps (or, with `--config.sft.from_reading=visual`, learns) the reading
while it learns the responses (results/points24_plans/README.md). The points games'
reading rows show formulas of at most 4 symbols unless `--config.reading.formula_symbols=N`
makes them random legal formulas of 0..N symbols (a workdir's reading stage keeps the
value it was trained with: another is a ConfigError);
`--config.sft.reading_formula_symbols=N` sets SFT's reading rows' alone (-1, the default:
the reading stage's). `--config.expert.noise=P` makes the
expert play a random legal action on a share P of its steps while its response for each
state is still what is saved (DART), so the warm start also sees formula lines off its
plan (a workdir's expert data keeps the P it was played with).
"""

from latent_mca.jobs import cards
from latent_mca.stages import cards as stages_cards

GAMES = ("numberline", "ezpoints", "points24", "blackjack")


def get_config(arg=None):
  arg = arg or "all"
  if arg == "smoke":
    return cards.smoke_config()
  if arg not in ("all", "gpu", "cpu") and arg not in GAMES:
    raise ValueError(f"configs/cards.py: unknown argument {arg!r}; use one of "
                     f"{', '.join(GAMES)}, all, cpu, gpu or smoke")
  config = cards.default_config()
  config.games = arg if arg in GAMES else ",".join(GAMES)
  config.ppo.learning_rate = 1e-4
  if arg == "gpu":
    cards.gpu_budget(config)
    config.per_game.points24 = cards.points24_recipe()
  if arg == "cpu":
    config.warm_start = stages_cards.SEPARATE
    config.per_game.points24 = cards.points24_recipe()
    config.per_game.numberline = cards.numberline_recipe()
    config.per_game.blackjack = cards.blackjack_recipe()
  if arg == "numberline":
    config = stages_cards.overridden(config, cards.numberline_recipe())
  if arg == "points24":
    config = stages_cards.overridden(config, cards.points24_recipe())
  if arg == "blackjack":
    config = stages_cards.overridden(config, cards.blackjack_recipe())
  return config
