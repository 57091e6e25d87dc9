"""Procedural panoptic scenes: textured stuff regions with thing instances on top.

Classes follow class_tables.SYNTHETIC_CATEGORIES: void 0; things disc 1, square 2, triangle 3;
stuff grass 4, water 5, sand 6. A scene is a pure function of its seed, so datasets are
reproducible bit for bit.

- Stuff: two or three regions split by wavy boundaries, each with a class texture (grass
  streaks, water waves, sand speckles) and per-image colour jitter.
- Things: 1..max_things shapes of random class, size, position, colour (within a class hue
  band), and fill (solid, stripes or gradient), drawn in order so later ones occlude earlier
  ones; fully hidden instances disappear.
- Void: some images carry an unlabelled dark blob (label 0), as real datasets do.
"""

import dataclasses

import numpy as np

VOID = 0
DISC, SQUARE, TRIANGLE = 1, 2, 3
GRASS, WATER, SAND = 4, 5, 6
THING_CLASSES = (DISC, SQUARE, TRIANGLE)
STUFF_CLASSES = (GRASS, WATER, SAND)
# Hue centres of the thing classes (HSV hue in [0, 1)); colours vary around them.
_THING_HUES = {DISC: 0.0, SQUARE: 0.33, TRIANGLE: 0.62}
_STUFF_BASE = {GRASS: (95, 150, 60), WATER: (45, 100, 175), SAND: (205, 180, 125)}


@dataclasses.dataclass(frozen=True)
class Scene:
  """image: uint8 [height, width, 3]; semantic, instance: int32 [height, width]."""
  image: np.ndarray
  semantic: np.ndarray
  instance: np.ndarray

  def panoptic(self, label_divisor: int) -> np.ndarray:
    return self.semantic * label_divisor + self.instance


def _hsv_to_rgb(h, s, v):
  i = int(h * 6.0) % 6
  f = h * 6.0 - int(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array([r, g, b]) * 255.0


def _stuff_texture(rng, cls, yy, xx):
  """Float [num_pixels, 3] texture of a stuff class at pixel coordinates yy, xx ([num_pixels])."""
  base = np.array(_STUFF_BASE[cls], np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
  noise = rng.standard_normal(yy.shape, dtype=np.float32)
  if cls == GRASS:
    pattern = np.sin(xx * rng.uniform(0.8, 1.6) + rng.uniform(0, 6)) * 12 + noise * 10
  elif cls == WATER:
    freq = rng.uniform(0.15, 0.3)
    pattern = np.sin(yy * freq + np.sin(xx * 0.08) * 3 + rng.uniform(0, 6)) * 22 + noise * 4
  else:  # SAND
    speckle = (rng.random(yy.shape, dtype=np.float32) < 0.06) * np.float32(-45.0)
    pattern = speckle + noise * 8
  return base[None, :] + pattern[:, None]


def _thing_shape(rng, cls, height, width):
  """Random shape parameters: (cls, cy, cx, size, angle, ry)."""
  size = rng.uniform(0.08, 0.28) * min(height, width)
  cy, cx = rng.uniform(0, height), rng.uniform(0, width)
  angle = rng.uniform(0, 2 * np.pi)
  ry = size * rng.uniform(0.8, 1.2)
  return cy, cx, size, angle, ry


def _thing_mask(cls, shape, yy, xx):
  """Boolean mask of a thing shape over the coordinate grids yy, xx."""
  cy, cx, size, angle, ry = shape
  if cls == DISC:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / size) ** 2 <= 1.0
  if cls == SQUARE:
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return (np.abs(u) <= size) & (np.abs(v) <= size)
  # TRIANGLE: intersection of three half-planes around the centre.
  mask = np.ones(yy.shape, dtype=bool)
  for k in range(3):
    theta = angle + k * 2 * np.pi / 3
    mask &= (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta) <= size * 0.7
  return mask


def _thing_fill(rng, cls, yy, xx):
  """Float [num_pixels, 3] colours of a thing at pixel coordinates yy, xx ([num_pixels])."""
  hue = (_THING_HUES[cls] + rng.uniform(-0.06, 0.06)) % 1.0
  color = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)).astype(np.float32)
  style = rng.integers(3)
  if style == 0:   # solid
    shade = np.ones(yy.shape, np.float32)
  elif style == 1:  # stripes
    period = rng.uniform(3, 7)
    shade = 0.75 + 0.25 * (np.sin((xx + yy) * np.pi / period) > 0)
  else:            # gradient
    shade = 0.6 + 0.4 * (yy - yy.min()) / max(1.0, float(yy.max() - yy.min()))
  return color[None, :] * shade[:, None]


def generate_scene(seed, height: int = 129, width: int = 129, max_things: int = 6,
                   void_probability: float = 0.2) -> Scene:
  """Draws one scene; `seed` is anything np.random.default_rng accepts (e.g. [seed, index])."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  semantic = np.zeros((height, width), np.int32)
  instance = np.zeros((height, width), np.int32)
  image = np.zeros((height, width, 3), np.float32)

  # Stuff: wavy horizontal boundaries split the image into 2-3 regions.
  num_regions = int(rng.integers(2, 4))
  cuts = np.sort(rng.uniform(0.2, 0.8, num_regions - 1)) * height
  region = np.zeros((height, width), np.int32)
  for k, cut in enumerate(cuts):
    wave = cut + np.sin(xx * rng.uniform(0.03, 0.12) + rng.uniform(0, 6)) * rng.uniform(2, 10)
    region[yy > wave + (xx - width / 2) * rng.uniform(-0.3, 0.3)] = k + 1
  for k in range(num_regions):
    cls = int(rng.choice(STUFF_CLASSES))
    mask = region == k
    semantic[mask] = cls
    image[mask] = _stuff_texture(rng, cls, yy[mask], xx[mask])

  if rng.random() < void_probability:
    mask = ((yy - rng.uniform(0, height)) ** 2 + (xx - rng.uniform(0, width)) ** 2
            <= (rng.uniform(0.05, 0.12) * height) ** 2)
    semantic[mask] = VOID
    image[mask] = rng.uniform(0, 40) + rng.normal(0, 6, (int(mask.sum()), 3))

  counters = {cls: 0 for cls in THING_CLASSES}
  for _ in range(int(rng.integers(1, max_things + 1))):
    cls = int(rng.choice(THING_CLASSES))
    shape = _thing_shape(rng, cls, height, width)
    # Only the bounding box of the shape is evaluated (a square's corner reaches size * sqrt 2).
    cy, cx, size = shape[0], shape[1], shape[2] * 1.5
    y0, y1 = max(0, int(cy - size)), min(height, int(cy + size) + 2)
    x0, x1 = max(0, int(cx - size)), min(width, int(cx + size) + 2)
    if y0 >= y1 or x0 >= x1:
      continue
    box_mask = _thing_mask(cls, shape, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1])
    if box_mask.sum() < 12:   # Mostly outside the image: skip rather than keep a sliver.
      continue
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = box_mask
    counters[cls] += 1
    semantic[mask] = cls
    instance[mask] = counters[cls]
    image[mask] = _thing_fill(rng, cls, yy[mask], xx[mask])

  # Renumber instances so ids are contiguous per class after occlusion removed some.
  for cls in THING_CLASSES:
    present = np.unique(instance[semantic == cls])
    present = present[present > 0]
    remap = np.zeros(max(counters[cls], 0) + 1, np.int32)
    remap[present] = np.arange(1, len(present) + 1)
    sel = semantic == cls
    instance[sel] = remap[instance[sel]]
  instance[~np.isin(semantic, THING_CLASSES)] = 0

  image += rng.standard_normal(image.shape, dtype=np.float32) * 3
  image = np.clip(image, 0, 255).astype(np.uint8)
  return Scene(image=image, semantic=semantic, instance=instance)
