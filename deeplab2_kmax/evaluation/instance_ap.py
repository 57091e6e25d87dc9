"""Mask AP of panoptic predictions through pycocotools' COCOeval (iouType "segm").

Each thing segment of a panoptic prediction becomes one COCO detection: an RLE mask, the
dataset's category id (train ids mapped back through `DatasetDescriptor.category_ids`) and a
score. Ground-truth thing segments become COCO annotations; a segment is crowd when more than
half of its pixels are marked in the GT crowd mask. The 12 numbers are COCOeval's summary:

    AP, AP50, AP75, AP_small, AP_medium, AP_large, AR1, AR10, AR100, AR_small, AR_medium,
    AR_large

Scores: pass them per segment (`scores={panoptic_label: score}`), or pass the model's maps and
get DeepLab2's rule: mean probability of the segment's class over the segment times the mean
instance score over the segment.
"""

import contextlib
import io
import json
from typing import Any, Mapping, Optional

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_lib

from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.evaluation import formats

STAT_NAMES = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
              'AR1', 'AR10', 'AR100', 'AR_small', 'AR_medium', 'AR_large')


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
  """COCO RLE of a `[height, width]` boolean mask, with `counts` as str (JSON-ready)."""
  rle = mask_lib.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle['counts'] = rle['counts'].decode('ascii')
  return rle


def _thing_segments(panoptic: np.ndarray, label_space: formats.LabelSpace):
  """Yields (panoptic label, train id, `[height, width]` mask) of each thing segment."""
  panoptic = np.asarray(panoptic).astype(np.int64)
  for label in np.unique(panoptic).tolist():
    train_id = label // label_space.label_divisor
    if train_id == label_space.ignore_label or not 0 <= train_id < label_space.num_classes:
      continue
    if label_space.class_has_instances[train_id]:
      yield label, train_id, panoptic == label


def deeplab2_scores(panoptic: np.ndarray, semantic_probability: np.ndarray,
                    instance_score_map: np.ndarray, label_space: formats.LabelSpace
                    ) -> dict[int, float]:
  """Per segment: mean P(its class) over it x mean instance score over it (DeepLab2's rule).

  Args:
    panoptic: `[height, width]` predicted panoptic label map.
    semantic_probability: `[height, width, num_classes]` class probabilities.
    instance_score_map: `[height, width]` instance scores.
    label_space: The label encoding.

  Returns:
    {panoptic label: score} for the thing segments.
  """
  scores = {}
  for label, train_id, mask in _thing_segments(panoptic, label_space):
    scores[label] = float(semantic_probability[..., train_id][mask].mean() *
                          instance_score_map[mask].mean())
  return scores


def detections_from_panoptic(panoptic: np.ndarray, image_id: int, descriptor,
                             scores: Mapping[int, float]) -> list[dict[str, Any]]:
  """COCO detection results (pycocotools loadRes format) for the thing segments of a map.

  Args:
    panoptic: `[height, width]` predicted panoptic label map (train ids).
    image_id: COCO image id.
    descriptor: The dataset descriptor.
    scores: {panoptic label: score}; every thing segment needs one.
  """
  label_space = formats.LabelSpace.from_descriptor(descriptor)
  detections = []
  for label, train_id, mask in _thing_segments(panoptic, label_space):
    if label not in scores:
      raise ValueError(f'image {image_id}: no score for predicted segment {label} (class '
                       f'{descriptor.class_names[train_id]})')
    detections.append({'image_id': image_id,
                       'category_id': int(label_space.category_ids[train_id]),
                       'segmentation': encode_mask(mask),
                       'score': float(scores[label])})
  return detections


def ground_truth_from_panoptic(panoptic: np.ndarray, image_id: int, descriptor,
                               is_crowd: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
  """COCO instance annotations (without `id`) of the thing segments of a GT map."""
  label_space = formats.LabelSpace.from_descriptor(descriptor)
  annotations = []
  for _, train_id, mask in _thing_segments(panoptic, label_space):
    crowd = is_crowd is not None and np.asarray(is_crowd, bool)[mask].mean() > 0.5
    rle = encode_mask(mask)
    annotations.append({'image_id': image_id,
                        'category_id': int(label_space.category_ids[train_id]),
                        'segmentation': rle,
                        'area': float(mask.sum()),
                        'bbox': [float(v) for v in mask_lib.toBbox(
                            mask_lib.encode(np.asfortranarray(mask.astype(np.uint8))))],
                        'iscrowd': int(crowd)})
  return annotations


def coco_mask_ap(gt_dataset: Mapping[str, Any],
                 detections: list[Mapping[str, Any]]) -> dict[str, float]:
  """Runs COCOeval(segm) on an in-memory GT dataset and detections; returns named stats.

  With no detection at all every stat is 0.0 (pycocotools cannot load an empty result list).
  """
  if not detections:
    return {name: 0.0 for name in STAT_NAMES}
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress.
    gt = coco_lib.COCO()
    gt.dataset = dict(gt_dataset)
    gt.createIndex()
    dt = gt.loadRes([dict(d) for d in detections])
    evaluator = cocoeval.COCOeval(gt, dt, iouType='segm')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


class InstanceAPAccumulator:
  """Collects GT and predicted panoptic maps image by image; `result()` runs COCOeval.

  Usage:
    accumulator = InstanceAPAccumulator(descriptor)
    accumulator.update(gt_panoptic, pred_panoptic, scores=..., gt_is_crowd=...)
    accumulator.result()  # {'AP': ..., 'AP50': ..., ...}
  """

  def __init__(self, descriptor):
    self.descriptor = descriptor
    self.label_space = formats.LabelSpace.from_descriptor(descriptor)
    self.reset()

  def reset(self) -> None:
    self.images = []
    self.annotations = []
    self.detections = []

  def update(self, gt_panoptic: np.ndarray, pred_panoptic: np.ndarray,
             scores: Optional[Mapping[int, float]] = None,
             gt_is_crowd: Optional[np.ndarray] = None,
             semantic_probability: Optional[np.ndarray] = None,
             instance_score_map: Optional[np.ndarray] = None) -> int:
    """Adds one image; returns the image id given to it.

    Args:
      gt_panoptic: `[height, width]` GT panoptic label map.
      pred_panoptic: `[height, width]` predicted panoptic label map.
      scores: {predicted panoptic label: score}; or give the two maps below.
      gt_is_crowd: Optional `[height, width]` GT crowd mask.
      semantic_probability: `[height, width, num_classes]` (with instance_score_map).
      instance_score_map: `[height, width]`.
    """
    gt_panoptic = np.asarray(gt_panoptic)
    pred_panoptic = np.asarray(pred_panoptic)
    if gt_panoptic.shape != pred_panoptic.shape:
      raise ValueError(f'prediction {pred_panoptic.shape} and ground truth {gt_panoptic.shape} '
                       'differ in size')
    if scores is None:
      if semantic_probability is None or instance_score_map is None:
        raise ValueError('give scores={label: score} or both semantic_probability and '
                         'instance_score_map')
      scores = deeplab2_scores(pred_panoptic, np.asarray(semantic_probability),
                               np.asarray(instance_score_map), self.label_space)
    image_id = len(self.images) + 1
    height, width = gt_panoptic.shape
    self.images.append({'id': image_id, 'height': height, 'width': width})
    self.annotations.extend(
        ground_truth_from_panoptic(gt_panoptic, image_id, self.descriptor, gt_is_crowd))
    self.detections.extend(
        detections_from_panoptic(pred_panoptic, image_id, self.descriptor, scores))
    return image_id

  def merge(self, other: 'InstanceAPAccumulator') -> None:
    """Adds the images `other` has seen (e.g. another worker's share), renumbered after ours."""
    offset = len(self.images)
    self.images.extend(dict(image, id=image['id'] + offset) for image in other.images)
    self.annotations.extend(dict(a, image_id=a['image_id'] + offset) for a in other.annotations)
    self.detections.extend(dict(d, image_id=d['image_id'] + offset) for d in other.detections)

  def gt_dataset(self) -> dict[str, Any]:
    """The COCO instance GT of everything added so far."""
    annotations = [dict(a, id=i + 1) for i, a in enumerate(self.annotations)]
    categories = [c for c in coco_panoptic.coco_categories(self.descriptor) if c['isthing']]
    return {'images': list(self.images), 'annotations': annotations, 'categories': categories}

  def write_json(self, detections_path: str, gt_path: Optional[str] = None) -> None:
    """Writes the detections (COCO results list: image_id, category_id, RLE, score) and,
    optionally, the instance GT, for pycocotools or a test server."""
    with open(detections_path, 'w') as f:
      json.dump(self.detections, f)
    if gt_path:
      with open(gt_path, 'w') as f:
        json.dump(self.gt_dataset(), f)

  def result(self) -> dict[str, float]:
    """COCOeval's 12 summary numbers by name (-1 where there is no GT, its convention)."""
    return coco_mask_ap(self.gt_dataset(), self.detections)
