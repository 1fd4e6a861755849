"""Judges that score dialogue responses: the programmatic judge of the synthetic world
(checks claims against the scene) and an LLM judge over an OpenAI-compatible endpoint.

The reward of a response is the sum of its per-dimension scores divided by the sum
of the ground-truth response's scores (the reference's judge-score ratio).
`make_reward_fn(config.rl.judge)` gives RL's reward function, `fn(example, responses)`,
from either judge (`judge.rewards`).
"""

from latent_mca.judge.llm import (ASPECTS, DIMENSIONS, SYSTEM_PROMPT, JudgeError, LLMJudge,
                                  PairwiseScores, RolePlayContext, pairwise_prompt, parse_pair,
                                  score_ratio)
from latent_mca.judge.programmatic import (PERSONALISED_DIMENSIONS, ROLEPLAY_DIMENSIONS, Claim,
                                           claim_holds, dimensions_for, parse_claims,
                                           read_question, reference_reply, score_response,
                                           score_responses)
from latent_mca.judge.programmatic import judge as programmatic_judge
from latent_mca.judge.programmatic import reward as programmatic_reward
from latent_mca.judge.rewards import (PERSONALISED_ASPECTS, LLMRewards, PersonalisedContext,
                                      RewardFn, judge_defaults, make_reward_fn,
                                      programmatic_rewards)
