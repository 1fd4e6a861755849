"""The synthetic multimodal world the default pipeline trains on (nothing is downloaded).

Scenes are 1..9 coloured shapes (8 shapes, 11 colours, 3 sizes) on a pale
background, one per cell of a 3x3 grid; `Scene.facts()` is their exact ground
truth and `render` draws them at any resolution. Paired samples put a scene's
image next to captions, questions with computed answers, and captions spoken
by the paired characters. The text-only corpus covers more: styles,
characters and topics that never appear next to an image, with markers that
make coverage measurable (`in_paired_coverage`). Everything is a pure
function of a seed (and a sample index).
"""

from latent_mca.world.characters import (CHARACTERS, PAIRED_CHARACTERS, TEXT_ONLY_CHARACTERS,
                                         Character, character, voice)
from latent_mca.world.corpus import (CORPUS_KINDS, STYLES, TEXT_ONLY_STYLES, TOPIC_NAMES, TOPICS,
                                     Style, TextOnlyConfig, Topic, coverage_markers,
                                     in_paired_coverage, text_only_sample, text_only_samples)
from latent_mca.world.paired import (NOTHING, PAIRED_STYLES, QUESTION_TYPES, SAME_SIZE,
                                     PairedConfig, answer_query, caption, make_question,
                                     paired_sample, paired_samples, question_text, sample_image)
from latent_mca.world.scenes import (BACKGROUNDS, COLORS, REGION_PHRASES, REGIONS, SHAPES,
                                     SIZE_RADIUS, SIZES, Scene, SceneConfig, SceneObject,
                                     find_objects, reference_phrase, region_name, render,
                                     sample_scene, scene_from_json, scene_to_json,
                                     unique_reference)

__all__ = [
    "BACKGROUNDS", "CHARACTERS", "COLORS", "CORPUS_KINDS", "NOTHING", "PAIRED_CHARACTERS",
    "PAIRED_STYLES", "QUESTION_TYPES", "REGIONS", "REGION_PHRASES", "SAME_SIZE", "SHAPES",
    "SIZES", "SIZE_RADIUS", "STYLES", "TEXT_ONLY_CHARACTERS", "TEXT_ONLY_STYLES", "TOPICS",
    "TOPIC_NAMES", "Character", "PairedConfig", "Scene", "SceneConfig", "SceneObject", "Style",
    "TextOnlyConfig", "Topic", "answer_query", "caption", "character", "coverage_markers",
    "find_objects", "in_paired_coverage", "make_question", "paired_sample", "paired_samples",
    "question_text", "reference_phrase", "region_name", "render", "sample_image",
    "sample_scene", "scene_from_json", "scene_to_json", "text_only_sample",
    "text_only_samples", "unique_reference", "voice",
]
