"""Panoptic formats in and out: COCO panoptic, Cityscapes panoptic, DeepLab2's two-channel PNG.

Three label layouts meet here:

* **Panoptic label maps** as the model and the data pipeline use them: one integer per pixel,
  `train_id * label_divisor + instance`, `[height, width]`; pixels of the descriptor's ignore
  label are unlabelled (VOID).
* **COCO panoptic** (also read by Cityscapes' official panoptic evaluation): an RGB PNG whose
  segment id is `R + 256 * G + 256**2 * B` (id 0 = VOID) plus a JSON annotation per image whose
  `segments_info` lists every id with its dataset category id, `iscrowd`, `area` and `bbox`.
* **Two-channel PNG** (panopticapi's `2channels` format, DeepLab2's `raw_panoptic_format:
  "two_channel_png"`): R = dataset category id (0 = VOID), G = instance id, B = 0.

Segments leave the model with contiguous train ids; every writer maps them back to the
dataset's own category ids (`DatasetDescriptor.category_ids`), since COCO ids have gaps
(1..200, 133 used) and Cityscapes uses label ids 7..33.

What is not evaluation's is data/formats': reading COCO panoptic PNGs and annotations
(coco_panoptic.read_panoptic_png, read_panoptic_annotation), a dataset's COCO categories
(coco_panoptic.coco_categories), the segment-id colours (panoptic_rgb), PNG files
(png_encoding.read_png, write_png) and PanopticFormatError.
"""

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.formats.coco_panoptic import PanopticFormatError

# Cityscapes panoptic ids: stuff segments use the label id, things label_id * 1000 + instance
# (cityscapesScripts' createPanopticImgs.py layout).
CITYSCAPES_INSTANCE_DIVISOR = 1000


# ---- Panoptic label maps <-> segments ----


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """How a panoptic label map encodes classes (the parts of a DatasetDescriptor used here).

  The output direction: train id -> the dataset's category id. The converters'
  data/formats/coco_panoptic.LabelSpec is the input direction (category id -> train id, chosen
  per conversion, with a crowd policy), which is why the two are separate.

  Attributes:
    label_divisor: panoptic = train_id * label_divisor + instance.
    ignore_label: Train id of unlabelled pixels (VOID in every output format).
    num_classes: Train ids are 0..num_classes-1.
    category_ids: Dataset category id per train id.
    class_has_instances: Per train id, True for thing classes.
  """
  label_divisor: int
  ignore_label: int
  num_classes: int
  category_ids: tuple[int, ...]
  class_has_instances: tuple[bool, ...]

  @classmethod
  def from_descriptor(cls, descriptor) -> 'LabelSpace':
    return cls(label_divisor=descriptor.panoptic_label_divisor,
               ignore_label=descriptor.ignore_label,
               num_classes=descriptor.num_classes,
               category_ids=tuple(descriptor.category_ids),
               class_has_instances=tuple(descriptor.class_has_instances))


def segments_from_panoptic_label(
    panoptic: np.ndarray,
    label_space: LabelSpace,
    is_crowd: Optional[np.ndarray] = None,
    use_train_ids: bool = False,
    image_name: str = '',
    with_bbox: bool = True) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Turns a panoptic label map into COCO-style segment ids and segment infos.

  Every distinct label value other than the ignore label becomes one segment, numbered 1, 2, ...
  in increasing label order (so the result does not depend on how instances were numbered,
  only on which pixels belong together). Pixels of the ignore label become VOID (id 0).

  Crowd pixels (where `is_crowd` is true) are gathered into ONE crowd segment per category:
  the official scripts honour a single crowd region per category (a later one overwrites an
  earlier one), so merging them is the only layout that they evaluate as intended.

  Args:
    panoptic: `[height, width]` integer map, train_id * label_divisor + instance.
    label_space: The encoding (LabelSpace.from_descriptor(descriptor)).
    is_crowd: Optional `[height, width]` boolean crowd mask (ground truth only).
    use_train_ids: Report `category_id` as the train id instead of the dataset category id.
    image_name: Named in error messages.
    with_bbox: Compute `bbox` (one pass over the image per segment; PQ does not need it).

  Returns:
    ids: `[height, width]` int64 segment ids (0 = VOID).
    segments: One dict per segment with `id`, `category_id`, `iscrowd`, `area` (and `bbox`), in
      id order.
  """
  panoptic = np.asarray(panoptic).astype(np.int64)
  if panoptic.ndim != 2:
    raise ValueError(f'{image_name}: panoptic label must be [height, width], got {panoptic.shape}')
  semantic = panoptic // label_space.label_divisor
  void = semantic == label_space.ignore_label
  valid = ~void
  bad = valid & ((semantic < 0) | (semantic >= label_space.num_classes))
  if bad.any():
    value = int(panoptic[bad][0])
    raise PanopticFormatError(
        f'{image_name}: panoptic label {value} has train id {value // label_space.label_divisor}, '
        f'outside [0, {label_space.num_classes}) and not the ignore label '
        f'{label_space.ignore_label} (label_divisor {label_space.label_divisor})')

  def category_of(train_id):
    return int(train_id) if use_train_ids else int(label_space.category_ids[train_id])

  crowd = np.zeros_like(valid)
  if is_crowd is not None:
    is_crowd = np.asarray(is_crowd, bool)
    if is_crowd.shape != panoptic.shape:
      raise ValueError(f'{image_name}: is_crowd shape {is_crowd.shape} != panoptic shape '
                       f'{panoptic.shape}')
    crowd = is_crowd & valid
  ids = np.zeros(panoptic.shape, np.int64)
  segments = []
  regular = valid & ~crowd
  values, inverse = np.unique(panoptic[regular], return_inverse=True)
  ids[regular] = inverse + 1
  for index, value in enumerate(values):
    segments.append({'id': index + 1,
                     'category_id': category_of(value // label_space.label_divisor),
                     'iscrowd': 0})
  for train_id in np.unique(semantic[crowd]):
    segment_id = len(segments) + 1
    ids[crowd & (semantic == train_id)] = segment_id
    segments.append({'id': segment_id, 'category_id': category_of(train_id), 'iscrowd': 1})
  areas = np.bincount(ids.ravel(), minlength=len(segments) + 1)
  for segment in segments:
    segment['area'] = int(areas[segment['id']])
    if with_bbox:
      segment['bbox'] = coco_panoptic.segment_bbox(ids == segment['id'])
  return ids, segments


# ---- COCO panoptic ----


def write_coco_panoptic(panoptic: np.ndarray,
                        descriptor,
                        image_id: Any,
                        file_name: str,
                        png_folder: str,
                        is_crowd: Optional[np.ndarray] = None) -> dict[str, Any]:
  """Writes one prediction (or ground truth) as a COCO panoptic PNG; returns its annotation.

  Args:
    panoptic: `[height, width]` panoptic label map with contiguous train ids.
    descriptor: The dataset's DatasetDescriptor (category ids come from it).
    image_id: The `image_id` of the annotation (int for COCO, str for Cityscapes).
    file_name: PNG name inside `png_folder`, e.g. "000000139.png".
    png_folder: Output folder (created if missing).
    is_crowd: Optional `[height, width]` crowd mask, for writing ground truth.

  Returns:
    The annotation dict (`image_id`, `file_name`, `segments_info`) for the JSON file.
  """
  ids, segments = segments_from_panoptic_label(
      panoptic, LabelSpace.from_descriptor(descriptor), is_crowd=is_crowd, image_name=file_name)
  png_encoding.write_png(os.path.join(png_folder, file_name), panoptic_rgb.id_to_rgb(ids))
  return {'image_id': image_id, 'file_name': file_name, 'segments_info': segments}


def coco_panoptic_json(annotations: Sequence[Mapping[str, Any]],
                       categories: Sequence[Mapping[str, Any]],
                       images: Optional[Sequence[Mapping[str, Any]]] = None) -> dict[str, Any]:
  """The JSON document of a COCO panoptic set: `annotations`, `categories` and `images`."""
  if images is None:
    images = [{'id': a['image_id'], 'file_name': a['file_name']} for a in annotations]
  return {'images': list(images), 'annotations': list(annotations),
          'categories': list(categories)}


# ---- Cityscapes panoptic ----


def cityscapes_ids_from_panoptic_label(panoptic: np.ndarray, descriptor,
                                       is_crowd: Optional[np.ndarray] = None,
                                       image_name: str = '') -> np.ndarray:
  """Cityscapes panoptic segment ids (createPanopticImgs.py layout) of a label map.

  Stuff segments get their label id (e.g. 7 = road); thing segments label_id * 1000 + k with
  k = 0, 1, ... numbered per category in label order; crowd pixels of a thing category (ground
  truth only) get the bare label id, as Cityscapes' thing pixels without an instance do;
  ignore-label pixels get 0 (VOID).

  Args:
    panoptic: `[height, width]` panoptic label map with contiguous train ids.
    descriptor: The dataset descriptor (cityscapes_panoptic or one like it).
    is_crowd: Optional `[height, width]` boolean crowd mask (ground truth).
    image_name: Named in error messages.

  Returns:
    `[height, width]` int64 ids.
  """
  label_space = LabelSpace.from_descriptor(descriptor)
  segment_ids, segments = segments_from_panoptic_label(
      panoptic, label_space, is_crowd=is_crowd, use_train_ids=True, image_name=image_name)
  ids = np.zeros(segment_ids.shape, np.int64)
  counts = {}
  for segment in segments:
    train_id = segment['category_id']
    label_id = int(label_space.category_ids[train_id])
    if label_id <= 0 or label_id >= CITYSCAPES_INSTANCE_DIVISOR:
      raise PanopticFormatError(f'{image_name}: category id {label_id} does not fit the '
                                f'Cityscapes id layout (1..{CITYSCAPES_INSTANCE_DIVISOR - 1})')
    if label_space.class_has_instances[train_id] and not segment['iscrowd']:
      k = counts.get(train_id, 0)
      if k >= CITYSCAPES_INSTANCE_DIVISOR:
        raise PanopticFormatError(
            f'{image_name}: more than {CITYSCAPES_INSTANCE_DIVISOR} instances of '
            f'"{descriptor.class_names[train_id]}" do not fit the Cityscapes id layout')
      counts[train_id] = k + 1
      new_id = label_id * CITYSCAPES_INSTANCE_DIVISOR + k
    else:
      new_id = label_id
    ids[segment_ids == segment['id']] = new_id
  return ids


def write_cityscapes_panoptic(panoptic: np.ndarray, descriptor, image_id: str,
                              png_folder: str,
                              file_name: Optional[str] = None,
                              is_crowd: Optional[np.ndarray] = None) -> dict[str, Any]:
  """Writes a label map in Cityscapes' panoptic format; returns its JSON annotation.

  The PNG holds the ids of cityscapes_ids_from_panoptic_label as RGB (id = R + 256 G +
  256^2 B); the annotation lists them with label-id categories, `iscrowd` 1 for a thing
  category's bare label id (crowd, ground truth only), as cityscapesScripts'
  createPanopticImgs.py writes ground truth and evalPanopticSemanticLabeling.py reads both.

  Args:
    panoptic: `[height, width]` panoptic label map with contiguous train ids.
    descriptor: The dataset descriptor.
    image_id: Cityscapes image id, "<city>_<sequence>_<frame>".
    png_folder: Output folder.
    file_name: PNG name; defaults to "<image_id>_panoptic.png".
    is_crowd: Optional `[height, width]` crowd mask, for writing ground truth.
  """
  file_name = file_name or f'{image_id}_panoptic.png'
  ids = cityscapes_ids_from_panoptic_label(panoptic, descriptor, is_crowd, image_name=file_name)
  png_encoding.write_png(os.path.join(png_folder, file_name), panoptic_rgb.id_to_rgb(ids))
  thing_label_ids = {int(c) for c, is_thing in zip(descriptor.category_ids,
                                                   descriptor.class_has_instances) if is_thing}
  segments = []
  for segment_id in np.unique(ids).tolist():
    if segment_id == panoptic_rgb.VOID:
      continue
    mask = ids == segment_id
    if segment_id < CITYSCAPES_INSTANCE_DIVISOR:
      category, iscrowd = segment_id, int(segment_id in thing_label_ids)
    else:
      category, iscrowd = segment_id // CITYSCAPES_INSTANCE_DIVISOR, 0
    segments.append({'id': segment_id, 'category_id': category, 'iscrowd': iscrowd,
                     'area': int(mask.sum()), 'bbox': coco_panoptic.segment_bbox(mask)})
  return {'image_id': image_id, 'file_name': file_name, 'segments_info': segments}


# ---- Two-channel PNG ----


def two_channel_from_panoptic_label(panoptic: np.ndarray, descriptor,
                                    use_train_ids: bool = False,
                                    image_name: str = '') -> np.ndarray:
  """DeepLab2 / panopticapi two-channel image of a label map.

  Args:
    panoptic: `[height, width]` panoptic label map with contiguous train ids.
    descriptor: The dataset descriptor.
    use_train_ids: Store train ids in R instead of dataset category ids (VOID is then the
      ignore label, as in DeepLab2 with convert_raw_to_eval_ids: false).
    image_name: Named in error messages.

  Returns:
    `[height, width, 3]` uint8: R = category (0 = VOID), G = instance, B = 0.
  """
  label_space = LabelSpace.from_descriptor(descriptor)
  panoptic = np.asarray(panoptic).astype(np.int64)
  train_ids = panoptic // label_space.label_divisor
  instances = panoptic % label_space.label_divisor
  void = train_ids == label_space.ignore_label
  if use_train_ids:
    category = train_ids
  else:
    lookup = np.asarray(label_space.category_ids, np.int64)
    inside = (train_ids >= 0) & (train_ids < label_space.num_classes)
    category = np.where(inside, lookup[np.clip(train_ids, 0, label_space.num_classes - 1)], -1)
    category[void] = panoptic_rgb.VOID
    instances = np.where(void, 0, instances)
    if (~void & (category == panoptic_rgb.VOID)).any():
      raise PanopticFormatError(f'{image_name}: a class maps to category id 0, which the '
                                'two-channel format reserves for VOID')
  for name, values in (('category', category), ('instance', instances)):
    if values.size and (values.min() < 0 or values.max() > 255):
      raise PanopticFormatError(
          f'{image_name}: {name} values [{values.min()}, {values.max()}] do not fit the 8-bit '
          'two-channel PNG; write COCO panoptic PNGs instead')
  out = np.zeros(panoptic.shape + (3,), np.uint8)
  out[..., 0] = category
  out[..., 1] = instances
  return out


def write_two_channel_png(panoptic: np.ndarray, descriptor, path: str,
                          use_train_ids: bool = False) -> None:
  """Writes two_channel_from_panoptic_label(...) to `path`."""
  png_encoding.write_png(path, two_channel_from_panoptic_label(panoptic, descriptor,
                                                               use_train_ids, image_name=path))


# Values of EvaluatorOptions.raw_panoptic_format (protos/evaluator.proto), as in DeepLab2.
RAW_TWO_CHANNEL_PNG = 'two_channel_png'
RAW_THREE_CHANNEL_PNG = 'three_channel_png'
RAW_TWO_CHANNEL_NUMPY = 'two_channel_numpy_array'
RAW_PANOPTIC_FORMATS = (RAW_TWO_CHANNEL_PNG, RAW_THREE_CHANNEL_PNG, RAW_TWO_CHANNEL_NUMPY)


def write_raw_panoptic(panoptic: np.ndarray, descriptor, path_without_extension: str,
                       raw_format: str = RAW_TWO_CHANNEL_PNG,
                       convert_to_eval_ids: bool = True) -> str:
  """Saves a prediction as DeepLab2's `save_raw_predictions` does; returns the file written.

  Args:
    panoptic: `[height, width]` panoptic label map with contiguous train ids.
    descriptor: The dataset descriptor.
    path_without_extension: Output path; ".png" or ".npy" is appended.
    raw_format: "two_channel_png" (R class, G instance < 256), "three_channel_png" (R class,
      G instance // 256, B instance % 256) or "two_channel_numpy_array" (`[height, width, 2]`
      int32 class and instance, no range limit).
    convert_to_eval_ids: Store dataset category ids (VOID 0) instead of train ids.
  """
  if raw_format not in RAW_PANOPTIC_FORMATS:
    raise ValueError(f'raw_panoptic_format "{raw_format}" is not one of '
                     f'{", ".join(RAW_PANOPTIC_FORMATS)}')
  if raw_format == RAW_TWO_CHANNEL_PNG:
    write_two_channel_png(panoptic, descriptor, path_without_extension + '.png',
                          use_train_ids=not convert_to_eval_ids)
    return path_without_extension + '.png'
  label_space = LabelSpace.from_descriptor(descriptor)
  panoptic = np.asarray(panoptic).astype(np.int64)
  train_ids = panoptic // label_space.label_divisor
  void = train_ids == label_space.ignore_label
  if ((train_ids < 0) | (train_ids >= label_space.num_classes))[~void].any():
    raise PanopticFormatError(f'{path_without_extension}: train ids outside '
                              f'[0, {label_space.num_classes}) in the prediction')
  classes = train_ids
  if convert_to_eval_ids:
    lookup = np.asarray(label_space.category_ids, np.int64)
    classes = np.where(void, panoptic_rgb.VOID,
                       lookup[np.clip(train_ids, 0, label_space.num_classes - 1)])
  instances = panoptic % label_space.label_divisor
  instances[void] = 0
  directory = os.path.dirname(path_without_extension)
  if directory:
    os.makedirs(directory, exist_ok=True)
  if raw_format == RAW_TWO_CHANNEL_NUMPY:
    np.save(path_without_extension + '.npy',
            np.stack([classes.astype(np.int32), instances.astype(np.int32)], axis=-1))
    return path_without_extension + '.npy'
  if instances.max(initial=0) > 65535 or classes.max(initial=0) > 255:
    raise PanopticFormatError(f'{path_without_extension}: classes above 255 or instance ids '
                              'above 65535 do not fit the three-channel PNG; use '
                              'two_channel_numpy_array')
  image = np.stack([classes, instances // 256, instances % 256], axis=-1).astype(np.uint8)
  png_encoding.write_png(path_without_extension + '.png', image)
  return path_without_extension + '.png'


def segments_from_two_channel(two_channel: np.ndarray,
                              categories: Mapping[int, Mapping[str, Any]],
                              void: int = panoptic_rgb.VOID,
                              image_name: str = '') -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Converts a two-channel image to COCO segment ids and infos (panopticapi's converter).

  Every distinct (category, instance) pair except category `void` becomes one segment,
  numbered 1, 2, ... in (category, instance) order.

  Args:
    two_channel: `[height, width, >=2]` uint8, channel 0 category, channel 1 instance.
    categories: Known categories by id (from the GT JSON).
    void: Category value of unlabelled pixels.
    image_name: Named in error messages.

  Returns:
    ids `[height, width]` int64 and the segment infos (`id`, `category_id`, `iscrowd` 0, `area`,
    `bbox`).
  """
  two_channel = np.asarray(two_channel).astype(np.int64)
  pairs = two_channel[..., 0] * 256 + two_channel[..., 1]
  ids = np.zeros(pairs.shape, np.int64)
  segments = []
  for pair in np.unique(pairs):
    category = int(pair // 256)
    if category == void:
      continue
    if category not in categories:
      raise PanopticFormatError(f'{image_name}: two-channel category {category} is not one of '
                                f'the {len(categories)} known categories')
    mask = pairs == pair
    ids[mask] = len(segments) + 1
    segments.append({'id': len(segments) + 1, 'category_id': category, 'iscrowd': 0,
                     'area': int(mask.sum()), 'bbox': coco_panoptic.segment_bbox(mask)})
  return ids, segments


# ---- A dataset's worth of predictions ----


class PanopticPredictionWriter:
  """Writes a dataset's predictions as PNGs plus one JSON, ready for the official evaluation.

  Usage:
    writer = PanopticPredictionWriter(descriptor, 'out/pred', 'out/pred.json')
    for image_id, panoptic in predictions:
      writer.add(panoptic, image_id)
    writer.write_json()
    # python -m deeplab2_kmax.evaluation.coco_panoptic --pred_json=out/pred.json \
    #     --pred_folder=out/pred ...
  """

  def __init__(self, descriptor, png_folder: str, json_path: str, layout: str = 'coco'):
    """Args: descriptor; output folder and JSON path; layout "coco" or "cityscapes"."""
    if layout not in ('coco', 'cityscapes'):
      raise ValueError(f'layout must be "coco" or "cityscapes", got "{layout}"')
    self.descriptor = descriptor
    self.png_folder = png_folder
    self.json_path = json_path
    self.layout = layout
    self.annotations = []

  def add(self, panoptic: np.ndarray, image_id: Any,
          file_name: Optional[str] = None) -> dict[str, Any]:
    """Writes one `[height, width]` panoptic label map (train ids); returns its annotation.

    The PNG is named `file_name`, by default the COCO name of an int id ("%012d.png") or
    "<image_id>_panoptic.png" for a Cityscapes id.
    """
    if self.layout == 'cityscapes':
      annotation = write_cityscapes_panoptic(panoptic, self.descriptor, image_id,
                                             self.png_folder, file_name)
    else:
      if file_name is None:
        file_name = f'{image_id:012d}.png' if isinstance(image_id, int) else f'{image_id}.png'
      annotation = write_coco_panoptic(panoptic, self.descriptor, image_id, file_name,
                                       self.png_folder)
    self.annotations.append(annotation)
    return annotation

  def write_json(self) -> str:
    """Writes the JSON of everything added; returns its path."""
    directory = os.path.dirname(self.json_path)
    if directory:
      os.makedirs(directory, exist_ok=True)
    with open(self.json_path, 'w') as f:
      json.dump(coco_panoptic_json(self.annotations,
                                   coco_panoptic.coco_categories(self.descriptor)), f)
    return self.json_path
