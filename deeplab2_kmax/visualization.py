"""Colour maps and image grids for panoptic maps (inputs, ground truth, predictions).

Each segment is drawn in its class colour, with thing instances shaded apart so neighbouring
instances of one class stay distinguishable; void is black. Outputs are uint8 RGB arrays that
data/formats/png_encoding.py encodes and writes.
"""

import numpy as np

from deeplab2_kmax.data import datasets


def colorize_panoptic(panoptic: np.ndarray, descriptor: datasets.DatasetDescriptor
                      ) -> np.ndarray:
  """int [height, width] panoptic ids -> uint8 [height, width, 3]."""
  divisor = descriptor.panoptic_label_divisor
  semantic = panoptic // divisor
  instance = panoptic % divisor
  palette = np.zeros((max(descriptor.num_classes, descriptor.ignore_label + 1), 3), np.float32)
  palette[:descriptor.num_classes] = descriptor.colors
  palette[descriptor.ignore_label] = 0
  valid = (semantic >= 0) & (semantic < len(palette))
  colors = palette[np.where(valid, semantic, descriptor.ignore_label)]
  # Instances: alternate brighter/darker shades (golden-ratio spacing avoids similar neighbours).
  shade = np.where(instance > 0, 0.55 + 0.45 * ((instance * 0.618034) % 1.0), 1.0)
  return np.clip(colors * shade[..., None], 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blends a colour map over an image; both [height, width, 3]."""
  blended = image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha
  return np.clip(blended, 0, 255).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
  """Tiles equally sized uint8 [height, width, 3] images row by row with white gaps."""
  height, width = rows[0][0].shape[:2]
  out = np.full((len(rows) * (height + gap) - gap,
                 max(len(r) for r in rows) * (width + gap) - gap, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, tile in enumerate(row):
      out[r * (height + gap):r * (height + gap) + height,
          c * (width + gap):c * (width + gap) + width] = tile
  return out
