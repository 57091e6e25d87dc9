"""COCO panoptic PNG colours <-> segment ids: id = R + 256 * G + 256^2 * B (id 0 = VOID).

The one encoding of segment ids as RGB that the COCO panoptic format (and cityscapesscripts,
the ADE20K preparation, panopticapi) uses; data/formats/coco_panoptic.py reads it (for the
converters, the validator and the evaluation) and the evaluation writers
(evaluation/formats.py) write it.
"""

import numpy as np

# Segment id of unlabelled pixels (panopticapi's VOID): never listed in segments_info.
VOID = 0
# Largest segment id an RGB PNG can hold.
MAX_RGB_ID = 256 ** 3 - 1


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """COCO segment ids of an RGB panoptic image.

  Args:
    rgb: `[height, width, 3]` (or more channels, the first three used) integer array.

  Returns:
    `[height, width]` int64 array, `R + 256 * G + 256**2 * B`.

  Raises:
    ValueError: naming the shape, when `rgb` is no `[height, width, >=3]` array.
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[2] < 3:
    raise ValueError(f'expected an RGB image [height, width, 3], got shape {rgb.shape}')
  rgb = rgb[..., :3].astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """Inverse of rgb_to_id: `[height, width]` (any shape) ids in [0, MAX_RGB_ID] ->
  `[height, width, 3]` uint8.

  Raises:
    ValueError: naming the range of the ids, when one does not fit an RGB PNG.
  """
  ids = np.asarray(ids).astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() > MAX_RGB_ID):
    raise ValueError(f'segment ids must lie in [0, {MAX_RGB_ID}] to fit an RGB PNG; '
                     f'got [{ids.min()}, {ids.max()}]')
  rgb = np.empty(ids.shape + (3,), np.uint8)
  rgb[..., 0] = ids % 256
  rgb[..., 1] = ids // 256 % 256
  rgb[..., 2] = ids // (256 * 256)
  return rgb
