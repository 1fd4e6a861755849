"""Scenes of the synthetic world: coloured shapes on a 3x3 grid, their ground truth and rendering.

A scene is a background colour and 1..9 objects. Each object has a shape, a
colour, a size and sits in its own cell of a 3x3 grid (so objects never
overlap, and "where is it" always has one exact answer: the cell's region
name). Its centre is jittered inside the cell. Coordinates are fractions of
the image side, so one scene renders at any resolution.

`Scene.facts()` is the ground truth that captions, answers and judges are
computed from; its structure is documented on the method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "pentagon", "cross")

# Object colours: saturated, far apart, and none equal to a background, so a
# pixel's colour tells which object (or the background) it belongs to.
COLORS: Mapping[str, tuple[int, int, int]] = types.MappingProxyType({
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "orange": (250, 130, 20),
    "purple": (140, 60, 180),
    "pink": (240, 120, 190),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (30, 190, 210),
})

# Backgrounds are pale, and their names share no word with an object colour
# (no "light blue"), so a colour word in a text always means an object.
BACKGROUNDS: Mapping[str, tuple[int, int, int]] = types.MappingProxyType({
    "white": (255, 255, 255),
    "cream": (250, 243, 224),
    "beige": (232, 220, 196),
    "mint": (220, 245, 228),
    "lavender": (234, 228, 250),
})

SIZES = ("small", "medium", "large")
# Radius (half the side of the bounding box) as a fraction of the image side.
# One fixed radius per size keeps "which is bigger" exact.
SIZE_RADIUS: Mapping[str, float] = types.MappingProxyType(
    {"small": 0.06, "medium": 0.09, "large": 0.13})

GRID = 3
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "middle", "right")
CELL = 1.0 / GRID
# Gap kept between an object and its cell border, so neighbours never touch.
MARGIN = 0.01


def region_name(row: int, col: int) -> str:
  """Name of a grid cell: "top left", "top middle", ..., "center", ..., "bottom right"."""
  if row == 1 and col == 1:
    return "center"
  return f"{ROW_NAMES[row]} {COLUMN_NAMES[col]}"


# Row-major; no region name is a substring of another, so text matching is safe.
REGIONS = tuple(region_name(r, c) for r in range(GRID) for c in range(GRID))

# How captions say "in region X"; every phrase contains the region name.
REGION_PHRASES: Mapping[str, str] = types.MappingProxyType({
    "top left": "in the top left corner",
    "top middle": "at the top middle",
    "top right": "in the top right corner",
    "middle left": "on the middle left",
    "center": "in the center",
    "middle right": "on the middle right",
    "bottom left": "in the bottom left corner",
    "bottom middle": "at the bottom middle",
    "bottom right": "in the bottom right corner",
})

# Attributes an object can be referred to by, in `find_objects` and references.
ATTRIBUTES = ("shape", "color", "size", "region")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape: what it is, its grid cell (row, col) and its centre (x, y) in image fractions."""
  shape: str
  color: str
  size: str
  row: int
  col: int
  x: float
  y: float

  def __post_init__(self):
    _check_member("shape", self.shape, SHAPES)
    _check_member("color", self.color, COLORS)
    _check_member("size", self.size, SIZES)
    for name in ("row", "col"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < GRID:
        raise ValueError(f"SceneObject.{name} must be an int in [0, {GRID}), got {value!r}")
    x0, y0, x1, y1 = self.bbox
    tol = 1e-9
    if (x0 < self.col * CELL - tol or x1 > (self.col + 1) * CELL + tol
        or y0 < self.row * CELL - tol or y1 > (self.row + 1) * CELL + tol):
      raise ValueError(f"{self.size} {self.shape} at ({self.x}, {self.y}) does not fit in "
                       f"the {self.region} cell (row {self.row}, col {self.col})")

  @property
  def radius(self) -> float:
    """Half the side of the bounding box, as a fraction of the image side."""
    return SIZE_RADIUS[self.size]

  @property
  def region(self) -> str:
    """The grid region name, e.g. "top left"."""
    return region_name(self.row, self.col)

  @property
  def rgb(self) -> tuple[int, int, int]:
    """The exact fill colour used when rendering."""
    return COLORS[self.color]

  @property
  def bbox(self) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) bounding box in image fractions; the drawn shape lies inside it."""
    r = self.radius
    return (self.x - r, self.y - r, self.x + r, self.y + r)

  @property
  def phrase(self) -> str:
    """Size, colour and shape without an article, e.g. "small red star"."""
    return f"{self.size} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background colour and objects, each in its own grid cell (canonically in row-major order)."""
  objects: tuple[SceneObject, ...]
  background: str

  def __post_init__(self):
    if not isinstance(self.objects, tuple) or not all(
        isinstance(o, SceneObject) for o in self.objects):
      raise ValueError("Scene.objects must be a tuple of SceneObject")
    if not 1 <= len(self.objects) <= GRID * GRID:
      raise ValueError(f"a scene has 1..{GRID * GRID} objects, got {len(self.objects)}")
    _check_member("background", self.background, BACKGROUNDS)
    cells = [(o.row, o.col) for o in self.objects]
    if len(set(cells)) != len(cells):
      raise ValueError(f"two objects share a grid cell: {cells}")

  def facts(self) -> dict:
    """The scene's ground truth as JSON-compatible data (fresh on every call).

    Object indices refer to `self.objects`. Keys:

    - "background": background colour name.
    - "num_objects": int.
    - "objects": one dict per object, with "index", "shape", "color", "size",
      "region", "row", "col" (0 = top / left), "center" [x, y] and "bbox"
      [x0, y0, x1, y1] in fractions of the image side, "radius", "rgb",
      "phrase" ("small red star") and "reference": the shortest attribute set
      that picks out this object alone (e.g. {"shape": "star"} or
      {"color": "red", "shape": "star"}; {"shape", "region"} always works),
      with "reference_text" its wording ("the red star"; see `reference_phrase`).
    - "counts": {"shape": {s: n}, "color": {c: n}, "size": {z: n}} over the
      whole vocabulary (absent ones are 0), and "color_shape":
      {"red star": n} for the combinations present only.
    - "present_shapes" / "present_colors" / "present_sizes": sorted lists.
    - "by_region": {region: index or None} for all nine regions.
    - "largest" / "smallest": indices of the objects of the largest / smallest
      size present (several when tied; sizes are exact, so ties are real).
    - "relations": {"left_of", "right_of", "above", "below"}: lists of [i, j]
      pairs meaning object i is left of / right of / above / below object j.
      Defined by grid cells: i is left of j iff i's column < j's column
      (whatever the rows); above iff i's row < j's row. Objects in the same
      column are neither left nor right of each other.
    """
    objects = []
    for i, o in enumerate(self.objects):
      ref = unique_reference(self, i)
      objects.append(dict(
          index=i, shape=o.shape, color=o.color, size=o.size, region=o.region,
          row=o.row, col=o.col, center=[o.x, o.y], bbox=list(o.bbox), radius=o.radius,
          rgb=list(o.rgb), phrase=o.phrase, reference=ref, reference_text=reference_phrase(ref)))
    color_shape: dict[str, int] = {}
    for o in self.objects:
      key = f"{o.color} {o.shape}"
      color_shape[key] = color_shape.get(key, 0) + 1
    size_rank = [SIZES.index(o.size) for o in self.objects]
    by_region = {name: None for name in REGIONS}
    for i, o in enumerate(self.objects):
      by_region[o.region] = i
    pairs = [(i, j) for i in range(len(self.objects)) for j in range(len(self.objects)) if i != j]
    obj = self.objects
    return dict(
        background=self.background,
        num_objects=len(obj),
        objects=objects,
        counts=dict(
            shape={s: sum(o.shape == s for o in obj) for s in SHAPES},
            color={c: sum(o.color == c for o in obj) for c in COLORS},
            size={z: sum(o.size == z for o in obj) for z in SIZES},
            color_shape=color_shape),
        present_shapes=sorted({o.shape for o in obj}),
        present_colors=sorted({o.color for o in obj}),
        present_sizes=sorted({o.size for o in obj}, key=SIZES.index),
        by_region=by_region,
        largest=[i for i, r in enumerate(size_rank) if r == max(size_rank)],
        smallest=[i for i, r in enumerate(size_rank) if r == min(size_rank)],
        relations=dict(
            left_of=[[i, j] for i, j in pairs if obj[i].col < obj[j].col],
            right_of=[[i, j] for i, j in pairs if obj[i].col > obj[j].col],
            above=[[i, j] for i, j in pairs if obj[i].row < obj[j].row],
            below=[[i, j] for i, j in pairs if obj[i].row > obj[j].row]),
    )


def _check_member(field: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {field} {value!r}; expected one of {sorted(allowed)}")


def find_objects(scene: Scene, **attributes) -> tuple[int, ...]:
  """Indices of the objects matching every given attribute (shape, color, size, region)."""
  unknown = set(attributes) - set(ATTRIBUTES)
  if unknown:
    raise ValueError(f"unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")
  return tuple(i for i, o in enumerate(scene.objects)
               if all(getattr(o, k) == v for k, v in attributes.items()))


# Tried in order: the most natural wording that is still unambiguous wins.
_REFERENCE_CANDIDATES = (
    ("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"),
    ("color",), ("size", "color"), ("shape", "region"), ("region",))


def unique_reference(scene: Scene, index: int, exclude: Sequence[str] = ()) -> dict | None:
  """The shortest attribute dict that matches only object `index`, not using `exclude`.

  None when no such set exists (e.g. region excluded and an identical twin
  object elsewhere). Questions exclude the attribute they ask about.
  """
  obj = scene.objects[index]
  for names in _REFERENCE_CANDIDATES:
    if any(n in exclude for n in names):
      continue
    attrs = {n: getattr(obj, n) for n in names}
    if find_objects(scene, **attrs) == (index,):
      return attrs
  return None


def reference_phrase(attributes: Mapping[str, str]) -> str:
  """Wording of an attribute dict: "the red star", "the red object", "the star in the center"."""
  words = [attributes[k] for k in ("size", "color") if k in attributes]
  words.append(attributes.get("shape", "object"))
  text = "the " + " ".join(words)
  if "region" in attributes:
    text += " " + REGION_PHRASES[attributes["region"]]
  return text


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """How scenes are sampled.

  repeat_prob: chance that a new object copies the shape (and, independently,
  the colour) of an earlier one, so counts above one are common.
  """
  min_objects: int = 1
  max_objects: int = 6
  shapes: tuple[str, ...] = SHAPES
  colors: tuple[str, ...] = tuple(COLORS)
  sizes: tuple[str, ...] = SIZES
  backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
  repeat_prob: float = 0.3

  def __post_init__(self):
    if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
      raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, got "
                       f"{self.min_objects}, {self.max_objects}")
    for field, vocab in (("shapes", SHAPES), ("colors", COLORS), ("sizes", SIZES),
                         ("backgrounds", BACKGROUNDS)):
      values = getattr(self, field)
      if not values:
        raise ValueError(f"SceneConfig.{field} is empty")
      for v in values:
        _check_member(field[:-1], v, vocab)
    if not 0.0 <= self.repeat_prob <= 1.0:
      raise ValueError(f"repeat_prob must be in [0, 1], got {self.repeat_prob}")


def sample_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
  """Draws a scene: a number of objects, distinct cells, attributes and jittered centres."""
  n = int(rng.integers(config.min_objects, config.max_objects + 1))
  cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))
  objects = []
  for cell in cells:
    row, col = divmod(cell, GRID)
    shape = str(config.shapes[rng.integers(len(config.shapes))])
    color = str(config.colors[rng.integers(len(config.colors))])
    if objects and rng.random() < config.repeat_prob:
      shape = objects[rng.integers(len(objects))].shape
    if objects and rng.random() < config.repeat_prob:
      color = objects[rng.integers(len(objects))].color
    size = str(config.sizes[rng.integers(len(config.sizes))])
    slack = CELL / 2 - SIZE_RADIUS[size] - MARGIN
    # Rounded for readable JSON; the slack leaves room for the rounding.
    x = round((col + 0.5) * CELL + rng.uniform(-slack, slack), 4)
    y = round((row + 0.5) * CELL + rng.uniform(-slack, slack), 4)
    objects.append(SceneObject(shape, color, size, row, col, x, y))
  background = str(config.backgrounds[rng.integers(len(config.backgrounds))])
  return Scene(tuple(objects), background)


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = -math.pi / 2):
  return [(radius * math.cos(phase + 2 * math.pi * k / sides),
           radius * math.sin(phase + 2 * math.pi * k / sides)) for k in range(sides)]


def _star(points: int = 5, inner: float = 0.5):
  return [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + math.pi * k / points),
           (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + math.pi * k / points))
          for k in range(2 * points)]


def _cross(half_width: float = 0.38):
  w = half_width
  return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
          (-1, w), (-1, -w), (-w, -w)]


# Outlines in units of the radius, centred on the object, y pointing down. All
# are filled at their centre, so the centre pixel shows the object's colour.
_OUTLINES = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (0.95, 0.8), (-0.95, 0.8)],
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],
    "hexagon": _regular_polygon(6, phase=0.0),
    "pentagon": _regular_polygon(5),
    "cross": _cross(),
}


def render(scene: Scene, size: int) -> PIL.Image.Image:
  """Draws the scene as a size x size RGB image (flat fills, no anti-aliasing)."""
  if not isinstance(size, (int, np.integer)) or size < 24:
    raise ValueError(f"image size must be an int >= 24 pixels, got {size!r}")
  size = int(size)
  image = PIL.Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
  draw = PIL.ImageDraw.Draw(image)
  for o in scene.objects:
    cx, cy, r = o.x * size, o.y * size, o.radius * size
    if o.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
    else:
      draw.polygon([(cx + r * u, cy + r * v) for u, v in _OUTLINES[o.shape]], fill=o.rgb)
  return image


def scene_to_json(scene: Scene) -> str:
  """The scene as a JSON string (sorted keys, so equal scenes give equal strings)."""
  return json.dumps(dict(background=scene.background,
                         objects=[dataclasses.asdict(o) for o in scene.objects]), sort_keys=True)


def scene_from_json(text: str) -> Scene:
  """Parses `scene_to_json` output; malformed or invalid scenes raise ValueError."""
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"scene JSON does not parse: {e}") from e
  if not isinstance(data, dict) or set(data) != {"background", "objects"}:
    raise ValueError("scene JSON must be an object with exactly 'background' and 'objects'")
  if not isinstance(data["objects"], list):
    raise ValueError("scene JSON 'objects' must be a list")
  fields = {f.name for f in dataclasses.fields(SceneObject)}
  objects = []
  for k, o in enumerate(data["objects"]):
    if not isinstance(o, dict) or set(o) != fields:
      raise ValueError(f"scene JSON object {k} must have exactly the keys {sorted(fields)}")
    objects.append(SceneObject(**o))
  return Scene(tuple(objects), data["background"])
