r"""Writes a few rendered scenes and one example of every synthetic task to a folder.

  python -m experiments.export_examples --out docs/examples

Each example is a JSON file (the example as the datasets hold it, with the scene's
facts; dialogue examples also carry their split and the programmatic judge's scores of
the reference reply) and, where it has an image, a PNG of the same name.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from latent_mca import tasks, world
from latent_mca.judge import programmatic

_OUT = flags.DEFINE_string("out", "docs/examples", "Output folder.")
_SEED = flags.DEFINE_integer("seed", 0, "World seed.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Pixels of the rendered images.")


def _write(name: str, record: dict, image=None) -> None:
  if image is not None:
    image.save(os.path.join(_OUT.value, name + ".png"))
    record = {**record, "image_file": name + ".png"}
  with open(os.path.join(_OUT.value, name + ".json"), "w") as f:
    json.dump(record, f, indent=2, default=str)


def _scene_record(scene: world.Scene) -> dict:
  return {"scene": world.scene_to_json(scene), "facts": scene.facts()}


def _first(stream, predicate, limit: int = 1000) -> dict:
  for i in range(limit):
    sample = stream(i)
    if predicate(sample):
      return sample
  raise LookupError("no sample in the first %d matches" % limit)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  seed, paired_cfg = _SEED.value, world.PairedConfig(image_size=_SIZE.value)
  paired = lambda i: world.paired_sample(seed, i, paired_cfg)
  for k in range(3):
    sample = paired(k)
    _write(f"scene_{k}", _scene_record(sample["scene"]), world.sample_image(sample))
  for kind in ("caption", "qa", "character"):
    sample = _first(paired, lambda s, kind=kind: s["kind"] == kind)
    record = {key: value for key, value in sample.items() if key != "scene"}
    _write(f"paired_{kind}", {**record, **_scene_record(sample["scene"])},
           world.sample_image(sample))
  text = _first(lambda i: world.text_only_sample(seed, i), lambda s: s["coverage"] == "text_only")
  _write("text_only", {k: v for k, v in text.items() if k != "scene"})
  for task, make in (("roleplay", tasks.roleplay_example),
                     ("personalised", tasks.personalised_example)):
    for distribution in ("in", "out"):
      example = make(seed, 0, distribution)
      facts = tasks.example_facts(example)
      reference = (tasks.roleplay_reference(example) if task == "roleplay"
                   else example["reference_reply"])
      record = {"example": example, "split": tasks.split_of(example), "facts": facts,
                "judge_scores_of_reference": programmatic.score_response(example, facts,
                                                                         reference)}
      _write(f"{task}_{distribution}", record, tasks.example_image(example, _SIZE.value))
  print("wrote examples to", _OUT.value)


if __name__ == "__main__":
  app.run(main)
