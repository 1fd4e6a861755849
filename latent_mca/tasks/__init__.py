"""Dialogue tasks on the synthetic world, in the schemas of the real benchmarks' readers.

`roleplay`: MMRole-style multimodal role-play (in- and out-of-distribution
characters). `personalised`: PCogAlignBench-style personalised dialogue (HCMAS /
HCSHR role sets). `splits`: SFT / RL / in-distribution test / out-of-distribution
test. Score replies with `latent_mca.judge.programmatic`.
"""

from latent_mca.tasks.personalised import (INDIVIDUALS, LOCATIONS, ROLES, SUBSETS,
                                           PersonalisedConfig, Role, personalised_example,
                                           personalised_examples, personalised_messages,
                                           personalised_reply, primary_role)
from latent_mca.tasks.roleplay import (DISTRIBUTIONS, KNOWLEDGE, SCENE_URI_PREFIX, RoleplayConfig,
                                       answer_sentences, example_facts, example_image,
                                       example_scene, reply_index, roleplay_example,
                                       roleplay_examples, roleplay_messages, roleplay_question,
                                       roleplay_reference, roleplay_reply, scene_image_path)
from latent_mca.tasks.splits import (SPLITS, is_out_of_distribution, split_examples, split_of,
                                     task_splits, training_split_of)

__all__ = [
    "DISTRIBUTIONS", "INDIVIDUALS", "KNOWLEDGE", "LOCATIONS", "ROLES", "SCENE_URI_PREFIX",
    "SPLITS", "SUBSETS", "PersonalisedConfig", "Role", "RoleplayConfig", "answer_sentences",
    "example_facts", "example_image", "example_scene", "is_out_of_distribution",
    "personalised_example", "personalised_examples", "personalised_messages",
    "personalised_reply", "primary_role", "reply_index", "roleplay_example", "roleplay_examples",
    "roleplay_messages", "roleplay_question", "roleplay_reference", "roleplay_reply",
    "scene_image_path", "split_examples", "split_of", "task_splits", "training_split_of",
]
