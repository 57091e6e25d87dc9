"""Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019) as the official scripts
compute it.

The official scripts are cocodataset/panopticapi `evaluation.py` and its Cityscapes twin in
cityscapesScripts (`evalPanopticSemanticLabeling.py`). Papers report their numbers, so this
module reproduces their rules exactly, including the ones that surprise users:

* Segments are COCO-style: a `[height, width]` id map (id 0 = VOID) plus segment infos with
  `id`, `category_id`, `iscrowd` and `area`.
* Ground-truth areas are the GT JSON's `area` fields, NOT recounted from the PNG (a JSON that
  disagrees with its PNG can give IoU > 1, as with panopticapi). Prediction areas are counted
  from the prediction map.
* Intersections come from one `np.unique` over `gt_id * OFFSET + pred_id`, OFFSET = 256**3.
* A GT/prediction pair of the same category matches when IoU > 0.5, where the union leaves out
  the part of the prediction lying on VOID: union = |p| + |g| - |p & g| - |p & VOID|.
  Crowd GT segments never match.
* Unmatched non-crowd GT segments are false negatives. Only ONE crowd segment per category is
  remembered: the last one in `segments_info` order.
* An unmatched prediction is a false positive unless more than half of it lies on VOID plus
  the remembered crowd segment of its own category.
* Per category PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2),
  accumulated over the whole dataset first; All / Things / Stuff average the categories with
  TP + FP + FN > 0, in the order the categories are listed. The per-class results list every
  GT category, as pq_compute's do: one absent from both sides gets PQ = SQ = RQ = 0 without
  counting in n.

As in the official scripts, GT pixels whose id is not listed in the GT JSON are neither VOID
nor a segment (they only enlarge predictions' areas), and predicted `area`/`iscrowd` fields are
ignored. A GT segment without `iscrowd` counts as not crowd (the official scripts raise).

Where the official scripts crash (a prediction id missing from its JSON, an unknown category)
this module raises PanopticFormatError naming the image and the segment; it also rejects what
they silently accept but evaluate wrongly (duplicate segment ids, maps of different sizes, a GT
segment whose category is not listed).
With no evaluated category, averages are 0.0 with n = 0 (the official scripts divide by zero).

DeepLab2's in-graph metric (deeplab2/evaluation/panoptic_quality.py) agrees with these rules on
maps without crowd regions (its published team/cat/bird values are reproduced by the tests). It
differs in two ways: only the ignore label with instance 0 is VOID there, other instance ids of
the ignore label being neither VOID nor scored; and it has no crowd rule, its COCO converter
turning crowd into the ignore label, i.e. into VOID for every category. Papers are asked (its
FAQ, Q4) to report the official scripts' numbers, which this module gives.
"""

import collections
import dataclasses
import multiprocessing
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from deeplab2_kmax import common
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats.coco_panoptic import PanopticFormatError
from deeplab2_kmax.evaluation import formats

OFFSET = 256 ** 3
IOU_THRESHOLD = 0.5

# Names of the averages, as in the official scripts' results and printed table.
ALL = common.PQ_ALL
THINGS = common.PQ_THINGS
STUFF = common.PQ_STUFF
PER_CLASS = common.PER_CLASS
PQ, SQ, RQ, N = common.PQ, common.SQ, common.RQ, common.PQ_NUM_CATEGORIES


@dataclasses.dataclass
class CategoryStatistics:
  """Sums over a dataset for one category."""
  iou: float = 0.0
  tp: int = 0
  fp: int = 0
  fn: int = 0

  def __iadd__(self, other: 'CategoryStatistics') -> 'CategoryStatistics':
    self.iou += other.iou
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    return self


class PanopticStatistics:
  """Per-category IoU / TP / FP / FN sums; add per-image statistics with `+=`."""

  def __init__(self):
    self.per_category: dict[int, CategoryStatistics] = collections.defaultdict(CategoryStatistics)

  def __iadd__(self, other: 'PanopticStatistics') -> 'PanopticStatistics':
    for category, stats in other.per_category.items():
      self.per_category[category] += stats
    return self

  def average(self, categories: Mapping[int, Mapping[str, Any]],
              isthing: Optional[bool]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Averages PQ/SQ/RQ over the evaluated categories (all, things only or stuff only).

    Args:
      categories: Category infos by id (need `isthing`), in the order to sum over.
      isthing: None for all categories, True for things, False for stuff.

    Returns:
      `{'pq', 'sq', 'rq', 'n'}` and, per category of `categories` passing the isthing filter,
      `{'pq', 'sq', 'rq'}` (zeros for a category with no TP, FP or FN, which n leaves out).
    """
    pq = sq = rq = 0.0
    n = 0
    per_class = {}
    for category, info in categories.items():
      if isthing is not None and (info.get('isthing', 0) == 1) != isthing:
        continue
      stats = self.per_category.get(category, CategoryStatistics())
      if stats.tp + stats.fp + stats.fn == 0:
        # Absent from GT and prediction: listed with zeros (as pq_compute does), not averaged.
        per_class[category] = {PQ: 0.0, SQ: 0.0, RQ: 0.0}
        continue
      n += 1
      denominator = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
      pq_class = stats.iou / denominator
      sq_class = stats.iou / stats.tp if stats.tp != 0 else 0
      rq_class = stats.tp / denominator
      per_class[category] = {PQ: pq_class, SQ: sq_class, RQ: rq_class}
      pq += pq_class
      sq += sq_class
      rq += rq_class
    if n == 0:
      return {PQ: 0.0, SQ: 0.0, RQ: 0.0, N: 0}, per_class
    return {PQ: pq / n, SQ: sq / n, RQ: rq / n, N: n}, per_class

  def results(self, categories: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """All / Things / Stuff averages and per-class values, fractions in [0, 1].

    Returns:
      `{'All': {pq, sq, rq, n}, 'Things': {...}, 'Stuff': {...},
        'per_class': {'<category id>': {pq, sq, rq}}}` (per_class lists every category of
      `categories`, zeros for one absent from both sides, keyed by the category id as a string
      so that the dict is JSON as is).
    """
    results = {}
    for name, isthing in ((ALL, None), (THINGS, True), (STUFF, False)):
      results[name], per_class = self.average(categories, isthing)
      if isthing is None:
        results[PER_CLASS] = {str(category): value for category, value in per_class.items()}
    return results


def _index_segments(segments: Sequence[Mapping[str, Any]], what: str,
                    image_name: str) -> dict[int, Mapping[str, Any]]:
  indexed = {}
  for segment in segments:
    segment_id = int(segment['id'])
    if segment_id in indexed:
      raise PanopticFormatError(f'{image_name}: {what} segment id {segment_id} is listed twice in '
                                'segments_info; segment ids must be unique per image')
    indexed[segment_id] = segment
  return indexed


def evaluate_image(gt_ids: np.ndarray,
                   gt_segments: Sequence[Mapping[str, Any]],
                   pred_ids: np.ndarray,
                   pred_segments: Sequence[Mapping[str, Any]],
                   categories: Mapping[int, Mapping[str, Any]],
                   image_name: str = '',
                   check_gt_areas: bool = False) -> PanopticStatistics:
  """Matches one image's segments with the official rules (see module docstring).

  Args:
    gt_ids: `[height, width]` integer GT segment ids (0 = VOID).
    gt_segments: GT segment infos with `id`, `category_id`, `iscrowd`, `area` (the area used).
    pred_ids: `[height, width]` integer predicted segment ids (0 = VOID).
    pred_segments: Predicted segment infos with `id` and `category_id` (`area` is recounted).
    categories: Known categories by id.
    image_name: Names the image in error messages.
    check_gt_areas: Also require every GT `area` to equal its pixel count in `gt_ids` (the
      official scripts trust the JSON, and a wrong area gives IoU > 1, PQ > 100).

  Returns:
    This image's PanopticStatistics.

  Raises:
    PanopticFormatError: Sizes differ, an id is in the PNG but not the JSON or the reverse, a
      category is unknown, a segment id is listed twice, or (check_gt_areas) a GT area is wrong.
  """
  gt_ids = np.asarray(gt_ids)
  pred_ids = np.asarray(pred_ids)
  if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
    raise PanopticFormatError(f'{image_name}: prediction is {pred_ids.shape[:2]} (height, width) '
                              f'but the ground truth is {gt_ids.shape[:2]}; predictions must be '
                              'at the original image size')
  gt_segms = _index_segments(gt_segments, 'ground-truth', image_name)
  pred_segms = _index_segments(pred_segments, 'predicted', image_name)
  for segment_id, segment in gt_segms.items():
    if segment['category_id'] not in categories:
      raise PanopticFormatError(f'{image_name}: ground-truth segment {segment_id} has category '
                                f'{segment["category_id"]}, not in the GT categories')
  if check_gt_areas:
    labels, counts = np.unique(gt_ids, return_counts=True)
    gt_areas = dict(zip(labels.tolist(), counts.tolist()))
    for segment_id, segment in gt_segms.items():
      if segment['area'] != gt_areas.get(segment_id, 0):
        raise PanopticFormatError(
            f'{image_name}: ground-truth segment {segment_id} has area {segment["area"]} in the '
            f'GT JSON but {gt_areas.get(segment_id, 0)} pixels in the GT PNG; the official '
            'scripts use the JSON area (IoU can exceed 1): fix the GT conversion')

  # Prediction areas from the map, with panopticapi's sanity checks.
  pred_areas = {}
  labels, counts = np.unique(pred_ids, return_counts=True)
  for label, count in zip(labels.tolist(), counts.tolist()):
    if label not in pred_segms:
      if label == panoptic_rgb.VOID:
        continue
      raise PanopticFormatError(
          f'{image_name}: segment id {label} is in the prediction PNG ({count} pixels) but not '
          'in its segments_info; every non-zero id in the PNG must be listed in the JSON')
    category = pred_segms[label]['category_id']
    if category not in categories:
      raise PanopticFormatError(
          f'{image_name}: predicted segment {label} has category {category}, not one of the '
          f'{len(categories)} GT categories (map train ids to dataset category ids)')
    pred_areas[label] = count
  missing = sorted(set(pred_segms) - set(pred_areas))
  if missing:
    raise PanopticFormatError(
        f'{image_name}: predicted segment id(s) {missing[:10]} are listed in segments_info but '
        'have no pixel in the prediction PNG')

  # Intersections of every (gt id, pred id) pair; uint64 because ids reach 256**3.
  joint = gt_ids.astype(np.uint64) * np.uint64(OFFSET) + pred_ids.astype(np.uint64)
  labels, counts = np.unique(joint, return_counts=True)
  gt_pred_map = {}
  for label, count in zip(labels.tolist(), counts.tolist()):
    gt_pred_map[(label // OFFSET, label % OFFSET)] = count

  stats = PanopticStatistics()
  gt_matched = set()
  pred_matched = set()
  for (gt_label, pred_label), intersection in gt_pred_map.items():
    if gt_label not in gt_segms or pred_label not in pred_segms:
      continue
    gt_segment = gt_segms[gt_label]
    if gt_segment.get('iscrowd', 0) == 1:
      continue
    category = gt_segment['category_id']
    if category != pred_segms[pred_label]['category_id']:
      continue
    union = (pred_areas[pred_label] + gt_segment['area'] - intersection -
             gt_pred_map.get((panoptic_rgb.VOID, pred_label), 0))
    iou = intersection / union
    if iou > IOU_THRESHOLD:
      stats.per_category[category].tp += 1
      stats.per_category[category].iou += iou
      gt_matched.add(gt_label)
      pred_matched.add(pred_label)

  crowd_by_category = {}
  for gt_label, gt_segment in gt_segms.items():
    if gt_label in gt_matched:
      continue
    if gt_segment.get('iscrowd', 0) == 1:
      # The official scripts keep one crowd id per category; the last listed wins.
      crowd_by_category[gt_segment['category_id']] = gt_label
      continue
    stats.per_category[gt_segment['category_id']].fn += 1

  for pred_label, pred_segment in pred_segms.items():
    if pred_label in pred_matched:
      continue
    category = pred_segment['category_id']
    ignored = gt_pred_map.get((panoptic_rgb.VOID, pred_label), 0)
    if category in crowd_by_category:
      ignored += gt_pred_map.get((crowd_by_category[category], pred_label), 0)
    if ignored / pred_areas[pred_label] > 0.5:
      continue  # Mostly on void or same-category crowd: not penalised.
    stats.per_category[category].fp += 1
  return stats


class PanopticQualityAccumulator:
  """Streaming PQ for evaluation during training: feed in-memory maps image by image.

  Two ways in:
    * `update(gt_ids, gt_segments, pred_ids, pred_segments)`: COCO-style id maps and segment
      infos, exactly as evaluate_image takes them.
    * `update_panoptic(gt_panoptic, pred_panoptic, gt_is_crowd=None)`: panoptic label maps
      `train_id * label_divisor + instance` (the model's PRED_PANOPTIC and the GT_PANOPTIC_RAW
      of the data pipeline); needs an accumulator built with `from_descriptor`. GT areas are
      counted from the map there, so JSON-area mismatches cannot arise. Every pixel of the
      ignore label is VOID, whatever its instance id; crowd comes from `gt_is_crowd`.

  Usage:
    accumulator = PanopticQualityAccumulator.from_descriptor(descriptor)
    for gt, pred in ...:
      accumulator.update_panoptic(gt, pred)
    accumulator.results()  # {'All': {'pq', 'sq', 'rq', 'n'}, 'Things': ..., ...}
  """

  def __init__(self, categories: Mapping[int, Mapping[str, Any]],
               label_space: Optional[formats.LabelSpace] = None):
    """Args: categories by id (with `isthing`); label_space for update_panoptic."""
    self.categories = dict(categories)
    self.label_space = label_space
    self.statistics = PanopticStatistics()
    self.num_images = 0

  @classmethod
  def from_descriptor(cls, descriptor) -> 'PanopticQualityAccumulator':
    """An accumulator over the descriptor's classes, keyed by dataset category id."""
    categories = {c['id']: c for c in coco_panoptic.coco_categories(descriptor)}
    return cls(categories, formats.LabelSpace.from_descriptor(descriptor))

  def reset(self) -> None:
    self.statistics = PanopticStatistics()
    self.num_images = 0

  def update(self, gt_ids, gt_segments, pred_ids, pred_segments, image_name: str = '') -> None:
    self.statistics += evaluate_image(gt_ids, gt_segments, pred_ids, pred_segments,
                                      self.categories, image_name or f'image {self.num_images}')
    self.num_images += 1

  def update_panoptic(self, gt_panoptic: np.ndarray, pred_panoptic: np.ndarray,
                      gt_is_crowd: Optional[np.ndarray] = None, image_name: str = '') -> None:
    """Adds one image given as panoptic label maps.

    Args:
      gt_panoptic: `[height, width]` GT panoptic label map (ignore label = VOID).
      pred_panoptic: `[height, width]` predicted panoptic label map, same size.
      gt_is_crowd: Optional `[height, width]` boolean crowd mask of the GT; crowd pixels become
        one crowd segment per category.
      image_name: Named in error messages.
    """
    if self.label_space is None:
      raise ValueError('update_panoptic needs the label encoding: build the accumulator with '
                       'PanopticQualityAccumulator.from_descriptor(descriptor)')
    name = image_name or f'image {self.num_images}'
    gt_ids, gt_segments = formats.segments_from_panoptic_label(
        gt_panoptic, self.label_space, is_crowd=gt_is_crowd, image_name=f'{name} (ground truth)',
        with_bbox=False)
    pred_ids, pred_segments = formats.segments_from_panoptic_label(
        pred_panoptic, self.label_space, image_name=f'{name} (prediction)', with_bbox=False)
    self.update(gt_ids, gt_segments, pred_ids, pred_segments, name)

  def merge(self, other: 'PanopticQualityAccumulator') -> None:
    """Adds the images `other` has seen (e.g. another worker's share of the dataset)."""
    self.statistics += other.statistics
    self.num_images += other.num_images

  def results(self) -> dict[str, Any]:
    """See PanopticStatistics.results."""
    return self.statistics.results(self.categories)


# ---- Folders of PNGs + JSON (the official scripts' inputs) ----


@dataclasses.dataclass(frozen=True)
class _ImagePair:
  gt_annotation: Mapping[str, Any]
  pred_annotation: Mapping[str, Any]


def _describe(annotation: Mapping[str, Any]) -> str:
  return f'image {annotation.get("image_id")!r} ({annotation.get("file_name")})'


def _evaluate_pair(pair: _ImagePair, gt_folder: str, pred_folder: str,
                   categories: Mapping[int, Mapping[str, Any]],
                   check_gt_areas: bool) -> PanopticStatistics:
  gt_path = os.path.join(gt_folder, pair.gt_annotation['file_name'])
  pred_path = os.path.join(pred_folder, pair.pred_annotation['file_name'])
  name = f'{_describe(pair.pred_annotation)}, prediction PNG {pred_path}'
  try:
    gt_ids = coco_panoptic.read_panoptic_png(gt_path)
  except FileNotFoundError:
    raise PanopticFormatError(f'{_describe(pair.gt_annotation)}: ground-truth PNG {gt_path} '
                              'does not exist') from None
  try:
    pred_ids = coco_panoptic.read_panoptic_png(pred_path)
  except FileNotFoundError:
    raise PanopticFormatError(f'{_describe(pair.pred_annotation)}: prediction PNG {pred_path} '
                              'does not exist (file_name in the prediction JSON)') from None
  return evaluate_image(gt_ids, pair.gt_annotation['segments_info'], pred_ids,
                        pair.pred_annotation['segments_info'], categories, name, check_gt_areas)


def _evaluate_chunk(args) -> list[PanopticStatistics]:
  pairs, gt_folder, pred_folder, categories, check_gt_areas = args
  return [_evaluate_pair(pair, gt_folder, pred_folder, categories, check_gt_areas)
          for pair in pairs]


def match_annotations(gt_json: Mapping[str, Any],
                      pred_json: Mapping[str, Any]) -> list[_ImagePair]:
  """Pairs every GT annotation with the prediction of the same `image_id`.

  Raises:
    PanopticFormatError: A GT image has no prediction, or an image has two predictions.
  """
  predictions = {}
  for annotation in pred_json.get('annotations', []):
    image_id = annotation['image_id']
    if image_id in predictions:
      raise PanopticFormatError(f'the prediction JSON has two annotations for image_id '
                                f'{image_id!r} ({predictions[image_id]["file_name"]} and '
                                f'{annotation["file_name"]})')
    predictions[image_id] = annotation
  pairs = []
  for annotation in gt_json['annotations']:
    image_id = annotation['image_id']
    if image_id not in predictions:
      raise PanopticFormatError(f'no prediction for {_describe(annotation)}: the prediction '
                                'JSON must have an annotation with this image_id')
    pairs.append(_ImagePair(annotation, predictions[image_id]))
  return pairs


def evaluate_folders(gt_json: Mapping[str, Any], gt_folder: str,
                     pred_json: Mapping[str, Any], pred_folder: str,
                     num_workers: int = 1,
                     progress: Optional[Callable[[int, int], None]] = None,
                     check_gt_areas: bool = False) -> dict[str, Any]:
  """PQ of COCO-format predictions against COCO-format ground truth (the official inputs).

  Args:
    gt_json: Parsed GT JSON (`annotations`, `categories`).
    gt_folder: Folder of the GT PNGs named by `file_name`.
    pred_json: Parsed prediction JSON (`annotations`).
    pred_folder: Folder of the prediction PNGs.
    num_workers: Processes (spawned, so that no TensorFlow state is forked); 1 = in process.
    progress: Optional callback(images_done, images_total).
    check_gt_areas: See evaluate_image.

  Returns:
    PanopticStatistics.results(categories) of the GT JSON's categories.
  """
  categories = {c['id']: c for c in gt_json['categories']}
  pairs = match_annotations(gt_json, pred_json)
  statistics = PanopticStatistics()
  num_workers = max(1, min(num_workers, len(pairs)))
  # Per-image statistics are summed in image order whatever the worker count, so results do
  # not depend on how images were split.
  if num_workers == 1:
    for index, pair in enumerate(pairs):
      statistics += _evaluate_pair(pair, gt_folder, pred_folder, categories, check_gt_areas)
      if progress:
        progress(index + 1, len(pairs))
  else:
    chunks = [list(chunk) for chunk in np.array_split(np.arange(len(pairs)), num_workers * 4)
              if len(chunk)]
    work = [([pairs[i] for i in chunk], gt_folder, pred_folder, categories, check_gt_areas)
            for chunk in chunks]
    done = 0
    with multiprocessing.get_context('spawn').Pool(num_workers) as pool:
      for chunk_stats in pool.imap(_evaluate_chunk, work):
        for image_stats in chunk_stats:
          statistics += image_stats
        done += len(chunk_stats)
        if progress:
          progress(done, len(pairs))
  return statistics.results(categories)


def format_table(results: Mapping[str, Any],
                 categories: Optional[Mapping[int, Mapping[str, Any]]] = None) -> str:
  """The official scripts' table (values x 100), optionally preceded by per-class rows."""
  lines = []
  if categories is not None:
    lines.append('{:20s}| {:>5s}  {:>5s}  {:>5s}'.format('Category', 'PQ', 'SQ', 'RQ'))
    for key, value in results[PER_CLASS].items():
      name = str(categories.get(int(key), {}).get('name', key))[:20]
      lines.append('{:20s}| {:5.1f}  {:5.1f}  {:5.1f}'.format(
          name, 100 * value[PQ], 100 * value[SQ], 100 * value[RQ]))
    lines.append('-' * 48)
  lines.append('{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}'.format('', 'PQ', 'SQ', 'RQ', 'N'))
  lines.append('-' * (10 + 7 * 4))
  for name in (ALL, THINGS, STUFF):
    value = results[name]
    lines.append('{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}'.format(
        name, 100 * value[PQ], 100 * value[SQ], 100 * value[RQ], value[N]))
  return '\n'.join(lines)
