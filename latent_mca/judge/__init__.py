"""Judges that score dialogue responses: an LLM judge over an OpenAI-compatible endpoint.

The reward of a response is the sum of its per-dimension scores divided by the sum
of the ground-truth response's scores (the reference's judge-score ratio).
"""

from latent_mca.judge.llm import (DIMENSIONS, JudgeError, LLMJudge, PairwiseScores,
                                  pairwise_prompt, parse_pair, score_ratio)
