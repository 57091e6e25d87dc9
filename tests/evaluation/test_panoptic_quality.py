"""PQ core: hand-worked crowd/void cases, public values of tf-models, torchmetrics and DeepLab2,
properties (perfect, empty, renumbering), and the sanity errors."""

import os

import numpy as np
import pytest

import evaluation_testing
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.evaluation import formats
from deeplab2_kmax.evaluation import panoptic_quality as pq_lib

THING, STUFF = 1, 2
CATEGORIES = {THING: {'id': THING, 'name': 'thing', 'isthing': 1},
              STUFF: {'id': STUFF, 'name': 'stuff', 'isthing': 0}}


def _seg(segment_id, category, area, iscrowd=0):
  return {'id': segment_id, 'category_id': category, 'area': area, 'iscrowd': iscrowd}


def _evaluate(gt_ids, gt_segments, pred_ids, pred_segments, categories=CATEGORIES):
  stats = pq_lib.evaluate_image(np.array(gt_ids), gt_segments, np.array(pred_ids),
                                pred_segments, categories, 'test image')
  return stats, stats.results(categories)


# 4 x 5 ground truth used by the hand-worked cases:
#   1 = thing (area 8), 2 = crowd of the thing category (area 6), 3 = stuff (area 4), 0 = VOID.
GT_IDS = [[1, 1, 1, 1, 0],
          [1, 1, 1, 1, 0],
          [2, 2, 2, 3, 3],
          [2, 2, 2, 3, 3]]
GT_SEGMENTS = [_seg(1, THING, 8), _seg(2, THING, 6, iscrowd=1), _seg(3, STUFF, 4)]


def test_void_is_left_out_of_the_union_and_same_category_crowd_excuses():
  pred_ids = [[5, 5, 5, 5, 5],
              [5, 5, 5, 5, 5],
              [6, 6, 6, 7, 7],
              [6, 6, 6, 7, 7]]
  # 5 covers thing 1 and both VOID pixels: union = 10 + 8 - 8 - 2 = 8, IoU 1 (8/10 if VOID
  # counted). 6 lies on the thing crowd: (0 + 6) / 6 > 0.5, ignored. 7 = stuff exactly.
  stats, results = _evaluate(GT_IDS, GT_SEGMENTS, pred_ids,
                             [_seg(5, THING, 0), _seg(6, THING, 0), _seg(7, STUFF, 0)])
  assert stats.per_category[THING] == pq_lib.CategoryStatistics(iou=1.0, tp=1, fp=0, fn=0)
  assert stats.per_category[STUFF] == pq_lib.CategoryStatistics(iou=1.0, tp=1, fp=0, fn=0)
  assert results['All'] == {'pq': 1.0, 'sq': 1.0, 'rq': 1.0, 'n': 2}


def test_crowd_does_not_excuse_another_category():
  pred_ids = [[5, 5, 5, 5, 5],
              [5, 5, 5, 5, 5],
              [6, 6, 6, 7, 7],
              [6, 6, 6, 7, 7]]
  # 6 is now stuff on a thing crowd: FP of stuff. Stuff PQ = 1 / (1 + 0.5) = 2/3.
  stats, results = _evaluate(GT_IDS, GT_SEGMENTS, pred_ids,
                             [_seg(5, THING, 0), _seg(6, STUFF, 0), _seg(7, STUFF, 0)])
  assert stats.per_category[STUFF].fp == 1
  assert results['per_class'][str(STUFF)]['pq'] == pytest.approx(2 / 3, abs=1e-15)
  assert results['All']['pq'] == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
  assert results['Things']['pq'] == 1.0
  assert results['Stuff'] == pytest.approx({'pq': 2 / 3, 'sq': 1.0, 'rq': 2 / 3, 'n': 1})


def test_ground_truth_area_comes_from_the_json():
  pred_ids = [[5, 5, 5, 5, 0],
              [5, 5, 5, 5, 0],
              [0, 0, 0, 7, 7],
              [0, 0, 0, 7, 7]]
  # The JSON claims area 5 for the 4-pixel stuff segment: union = 4 + 5 - 4 = 5, IoU 0.8.
  segments = [_seg(1, THING, 8), _seg(2, THING, 6, iscrowd=1), _seg(3, STUFF, 5)]
  _, results = _evaluate(GT_IDS, segments, pred_ids, [_seg(5, THING, 0), _seg(7, STUFF, 0)])
  assert results['per_class'][str(STUFF)]['pq'] == pytest.approx(0.8, abs=1e-15)
  # A JSON area far too small gives IoU > 1, as with the official script (pitfall kept).
  segments[2] = _seg(3, STUFF, 2)
  _, results = _evaluate(GT_IDS, segments, pred_ids, [_seg(5, THING, 0), _seg(7, STUFF, 0)])
  assert results['per_class'][str(STUFF)]['pq'] == pytest.approx(2.0, abs=1e-15)
  # Opt-in check that names the culprit instead.
  with pytest.raises(pq_lib.PanopticFormatError,
                     match='segment 3 has area 2 in the GT JSON but 4 pixels in the GT PNG'):
    pq_lib.evaluate_image(np.array(GT_IDS), segments, np.array(pred_ids),
                          [_seg(5, THING, 0), _seg(7, STUFF, 0)], CATEGORIES, 'img',
                          check_gt_areas=True)


def test_only_the_last_crowd_segment_of_a_category_counts():
  gt_ids = [[1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [2, 2, 4, 3, 3],
            [2, 2, 4, 3, 3]]
  pred_ids = [[5, 5, 5, 5, 0],
              [5, 5, 5, 5, 0],
              [6, 6, 0, 7, 7],
              [6, 6, 0, 7, 7]]
  pred_segments = [_seg(5, THING, 0), _seg(6, THING, 0), _seg(7, STUFF, 0)]
  # 6 lies on crowd 2. Listed last, crowd 2 excuses it; listed before crowd 4, it does not.
  crowd_2_last = [_seg(1, THING, 8), _seg(4, THING, 2, 1), _seg(2, THING, 4, 1), _seg(3, STUFF, 4)]
  crowd_4_last = [_seg(1, THING, 8), _seg(2, THING, 4, 1), _seg(4, THING, 2, 1), _seg(3, STUFF, 4)]
  stats, _ = _evaluate(gt_ids, crowd_2_last, pred_ids, pred_segments)
  assert stats.per_category[THING].fp == 0
  stats, results = _evaluate(gt_ids, crowd_4_last, pred_ids, pred_segments)
  assert stats.per_category[THING].fp == 1
  assert results['per_class'][str(THING)]['pq'] == pytest.approx(1 / 1.5, abs=1e-15)


def test_thresholds_are_strict():
  # IoU exactly 0.5 is no match; a prediction exactly half on VOID is still a false positive.
  gt_ids = [[1, 1, 1, 1],
            [0, 0, 2, 2]]
  pred_ids = [[5, 5, 0, 0],
              [6, 6, 7, 7]]
  stats, results = _evaluate(gt_ids, [_seg(1, THING, 4), _seg(2, STUFF, 2)], pred_ids,
                             [_seg(5, THING, 0), _seg(6, STUFF, 0), _seg(7, STUFF, 0)])
  # 5: IoU 2/4 = 0.5 -> FP, and thing 1 -> FN. 6: 2 of 2 pixels on VOID -> ignored. 7: TP.
  assert stats.per_category[THING] == pq_lib.CategoryStatistics(iou=0.0, tp=0, fp=1, fn=1)
  assert stats.per_category[STUFF] == pq_lib.CategoryStatistics(iou=1.0, tp=1, fp=0, fn=0)
  pred_ids = [[5, 5, 0, 0],
              [5, 5, 7, 7]]  # 5 now half (2 of 4) on VOID: FP, not ignored.
  stats, _ = _evaluate(gt_ids, [_seg(1, THING, 4), _seg(2, STUFF, 2)], pred_ids,
                       [_seg(5, THING, 0), _seg(7, STUFF, 0)])
  # union = 4 + 4 - 2 - 2 = 4: IoU 0.5, still no match.
  assert stats.per_category[THING] == pq_lib.CategoryStatistics(iou=0.0, tp=0, fp=1, fn=1)
  assert results['All']['n'] == 2


def test_hostile_per_class_lists_every_gt_category_absent_ones_with_zeros():
  # As panopticapi's pq_compute: a category with no TP, FP or FN is listed with zeros in
  # per_class and left out of the averages and n (issue 18).
  categories = {**CATEGORIES, 3: {'id': 3, 'name': 'unseen', 'isthing': 1},
                4: {'id': 4, 'name': 'unseen stuff', 'isthing': 0}}
  gt_ids = [[1, 1], [2, 2]]
  _, results = _evaluate(gt_ids, [_seg(1, THING, 2), _seg(2, STUFF, 2)], [[1, 1], [0, 0]],
                         [_seg(1, THING, 0)], categories)
  # The thing is matched exactly (IoU 1); the stuff segment is missed (FN): PQ 0.
  assert results['All'] == {'pq': 0.5, 'sq': 0.5, 'rq': 0.5, 'n': 2}
  assert results['Things'] == {'pq': 1.0, 'sq': 1.0, 'rq': 1.0, 'n': 1}
  assert results['Stuff'] == {'pq': 0.0, 'sq': 0.0, 'rq': 0.0, 'n': 1}
  assert results['per_class'] == {
      str(THING): {'pq': 1.0, 'sq': 1.0, 'rq': 1.0},
      str(STUFF): {'pq': 0.0, 'sq': 0.0, 'rq': 0.0},
      '3': {'pq': 0.0, 'sq': 0.0, 'rq': 0.0},
      '4': {'pq': 0.0, 'sq': 0.0, 'rq': 0.0}}
  assert list(results['per_class']) == [str(THING), str(STUFF), '3', '4']  # the GT order
  # No category evaluated at all: zeros and n = 0 instead of a division by zero.
  _, results = _evaluate([[0]], [], [[0]], [], categories)
  assert results['All'] == {'pq': 0.0, 'sq': 0.0, 'rq': 0.0, 'n': 0}


@pytest.mark.parametrize('pred_ids, pred_segments, gt_segments, message', [
    ([[1, 9]], [_seg(1, THING, 0)], [_seg(1, THING, 2)],
     'segment id 9 is in the prediction PNG'),
    ([[1, 1]], [_seg(1, THING, 0), _seg(8, THING, 0)], [_seg(1, THING, 2)],
     r'segment id\(s\) \[8\] are listed'),
    ([[1, 1]], [_seg(1, 77, 0)], [_seg(1, THING, 2)], 'predicted segment 1 has category 77'),
    ([[1, 1]], [_seg(1, THING, 0), _seg(1, STUFF, 0)], [_seg(1, THING, 2)],
     'predicted segment id 1 is listed twice'),
    ([[1, 1]], [_seg(1, THING, 0)], [_seg(1, THING, 2), _seg(1, THING, 2)],
     'ground-truth segment id 1 is listed twice'),
    ([[1, 1]], [_seg(1, THING, 0)], [_seg(1, 55, 2)], 'ground-truth segment 1 has category 55'),
    ([[1], [1]], [_seg(1, THING, 0)], [_seg(1, THING, 2)], r'prediction is \(2, 1\)'),
])
def test_sanity_errors_name_image_and_segment(pred_ids, pred_segments, gt_segments, message):
  with pytest.raises(pq_lib.PanopticFormatError, match=message) as error:
    pq_lib.evaluate_image(np.array([[1, 1]]), gt_segments, np.array(pred_ids), pred_segments,
                          CATEGORIES, 'image 42 (x.png)')
  assert 'image 42 (x.png)' in str(error.value)


# ---- Public values: tensorflow/models official/vision/evaluation/panoptic_quality_test.py ----

_TF_GT_MATCH = [[1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1],
                [1, 1, 2, 2, 2, 1],
                [1, 2, 2, 2, 2, 1],
                [1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1]]
_TF_GOOD = [[1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 2, 2, 2, 2, 1],
            [1, 2, 2, 2, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1]]
_TF_BAD = [[1, 1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1, 1],
           [1, 1, 1, 2, 2, 1],
           [1, 1, 1, 2, 2, 1],
           [1, 1, 1, 2, 2, 1],
           [1, 1, 1, 1, 1, 1]]
_TF_PERFECT = [[1, 1, 1, 1, 1, 1],
               [1, 2, 2, 2, 2, 1],
               [1, 2, 2, 2, 2, 1],
               [1, 2, 2, 2, 2, 1],
               [1, 2, 2, 1, 1, 1],
               [1, 2, 1, 1, 1, 1]]
_TF_CATEGORIES_122 = [[1, 1, 1, 1, 1, 1],
                      [1, 1, 1, 1, 1, 1],
                      [1, 2, 2, 1, 2, 2],
                      [1, 2, 2, 1, 2, 2],
                      [1, 1, 1, 1, 1, 1],
                      [1, 1, 1, 1, 1, 1]]
_TF_WRONG = [[0, 0, 0, 0, 0, 0],
             [0, 1, 0, 0, 1, 0],
             [0, 1, 1, 1, 1, 0],
             [0, 1, 1, 1, 1, 0],
             [0, 0, 0, 0, 0, 0],
             [0, 0, 0, 0, 0, 0]]
_TF_RIGHT_HALF = [[0] * 6, [0] * 6, [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [0] * 6, [0] * 6]
_TF_LEFT_HALF = [[0] * 6, [0] * 6, [0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0] * 6, [0] * 6]
_ZEROS = [[0] * 6] * 6


def _tf_case(num_categories, ignored_label, divisor, gt_cat, gt_inst, pred_cat, pred_inst):
  descriptor = evaluation_testing.make_descriptor(
      num_categories, things=range(num_categories), ignore_label=ignored_label,
      label_divisor=divisor)
  accumulator = pq_lib.PanopticQualityAccumulator.from_descriptor(descriptor)
  accumulator.update_panoptic(np.array(gt_cat) * divisor + np.array(gt_inst),
                              np.array(pred_cat) * divisor + np.array(pred_inst))
  return accumulator.results()


@pytest.mark.parametrize('case, expected_pq, expected_sq, expected_rq, expected_n', [
    # test_perfect_match: category 0, instances 1 and 2.
    ((1, 2, 16, _ZEROS, _TF_PERFECT, _ZEROS, _TF_PERFECT), 1.0, 1.0, 1.0, 1),
    # test_totally_wrong: categories swapped, instance 0 everywhere.
    ((2, 2, 1, _TF_WRONG, _ZEROS, 1 - np.array(_TF_WRONG), _ZEROS), 0.0, 0.0, 0.0, 2),
    # test_matches_by_iou, good detection: IoUs 28/30 and 6/8.
    ((1, 2, 16, _ZEROS, _TF_GT_MATCH, _ZEROS, _TF_GOOD),
     (28 / 30 + 6 / 8) / 2, (28 / 30 + 6 / 8) / 2, 1.0, 1),
    # test_matches_by_iou, bad detection: one match with IoU 27/32, one FP, one FN.
    ((1, 2, 16, _ZEROS, _TF_GT_MATCH, _ZEROS, _TF_BAD), 27 / 64, 27 / 32, 0.5, 1),
    # test_wrong_instances: class 2 split into two predictions of IoU 0.5 each.
    ((3, 0, 10, _TF_CATEGORIES_122, _ZEROS, _TF_CATEGORIES_122, _TF_RIGHT_HALF),
     0.5, 0.5, 0.5, 2),
    # test_instance_order_is_arbitrary.
    ((3, 0, 10, _TF_CATEGORIES_122, _TF_LEFT_HALF, _TF_CATEGORIES_122, _TF_RIGHT_HALF),
     1.0, 1.0, 1.0, 2),
])
def test_tf_models_6x6_cases(case, expected_pq, expected_sq, expected_rq, expected_n):
  results = _tf_case(*case)
  assert results['All']['pq'] == pytest.approx(expected_pq, abs=1e-12)
  assert results['All']['sq'] == pytest.approx(expected_sq, abs=1e-12)
  assert results['All']['rq'] == pytest.approx(expected_rq, abs=1e-12)
  assert results['All']['n'] == expected_n


def test_torchmetrics_5x5_case():
  # Lightning-AI/torchmetrics tests/unittests/detection/test_panoptic_quality.py:
  # (category, instance) pairs, things {0, 1}, stuff {6, 7}; published PQ 0.7753.
  preds = [[(6, 0), (0, 0), (6, 0), (6, 0), (0, 1)],
           [(0, 0), (0, 0), (6, 0), (0, 1), (0, 1)],
           [(0, 0), (0, 0), (6, 0), (0, 1), (1, 0)],
           [(0, 0), (7, 0), (6, 0), (1, 0), (1, 0)],
           [(0, 0), (7, 0), (7, 0), (7, 0), (7, 0)]]
  target = [[(6, 0), (6, 0), (6, 0), (6, 0), (0, 0)],
            [(0, 1), (0, 1), (6, 0), (0, 0), (0, 0)],
            [(0, 1), (0, 1), (6, 0), (1, 0), (1, 0)],
            [(0, 1), (7, 0), (7, 0), (1, 0), (1, 0)],
            [(0, 1), (7, 0), (7, 0), (7, 0), (7, 0)]]
  descriptor = evaluation_testing.make_descriptor(8, things=(0, 1), ignore_label=255,
                                                  label_divisor=100)
  to_map = lambda pairs: np.array([[c * 100 + i for c, i in row] for row in pairs])
  accumulator = pq_lib.PanopticQualityAccumulator.from_descriptor(descriptor)
  accumulator.update_panoptic(to_map(target), to_map(preds))
  results = accumulator.results()
  assert round(results['All']['pq'], 4) == 0.7753
  assert results['All']['n'] == 4  # classes 2..5 absent from both sides.


# ---- Public values: google-research/deeplab2 evaluation/panoptic_quality_test.py ----

_DEEPLAB2_COLORS = {(0, 0, 0): 0, (0, 0, 255): 1, (255, 0, 0): 2, (0, 255, 0): 3,
                    (255, 0, 255): 4, (0, 255, 255): 5, (255, 255, 0): 6}
_TEAM_GT_CLASSES = {0: 0, 47: 1, 97: 1, 133: 1, 150: 1, 174: 1, 198: 2, 215: 1, 244: 1, 255: 1}
_CAT_GT_CLASSES = {0: 0, 255: 6}
_BIRD_GT_CLASSES = {92: 5, 176: 3, 255: 4}


def _deeplab2_testdata_dir():
  """DeepLab2's `evaluation/testdata` folder from a user's checkout of google-research/deeplab2.

  Its label images are not copied into this repository; point DEEPLAB2_TESTDATA_DIR at them
  (e.g. <deeplab2 checkout>/evaluation/testdata) to run these parity tests.
  """
  folder = os.environ.get('DEEPLAB2_TESTDATA_DIR', '')
  if not folder or not os.path.exists(os.path.join(folder, 'team_gt_instance.png')):
    pytest.skip('DeepLab2 test images not available: set DEEPLAB2_TESTDATA_DIR to '
                '<google-research/deeplab2 checkout>/evaluation/testdata')
  return folder


def _deeplab2_image(name, gt_file, gt_classes, divisor):
  folder = _deeplab2_testdata_dir()
  # Grey-level maps: channel 0 separates the instances (only grouping matters).
  gt_instance = png_encoding.read_png(os.path.join(folder, gt_file))[..., 0].astype(np.int64)
  assert set(np.unique(gt_instance).tolist()) == set(gt_classes)
  gt_class = np.vectorize(gt_classes.get)(gt_instance)
  rgb = png_encoding.read_png(os.path.join(folder, f'{name}_pred_class.png'))[..., :3]
  pred_class = np.full(rgb.shape[:2], -1, np.int64)
  for color, label in _DEEPLAB2_COLORS.items():
    pred_class[np.all(rgb == color, axis=-1)] = label
  assert (pred_class >= 0).all()
  pred_instance = png_encoding.read_png(
      os.path.join(folder, f'{name}_pred_instance.png'))[..., 0].astype(np.int64)
  return gt_class * divisor + gt_instance, pred_class * divisor + pred_instance


def test_deeplab2_team_image():
  descriptor = evaluation_testing.make_descriptor(3, things=(1, 2), ignore_label=0,
                                                  label_divisor=1000)
  accumulator = pq_lib.PanopticQualityAccumulator.from_descriptor(descriptor)
  accumulator.update_panoptic(*_deeplab2_image('team', 'team_gt_instance.png', _TEAM_GT_CLASSES,
                                               1000))
  results = accumulator.results()['All']
  # Published (float32): PQ 0.62156284, SQ 0.64664984, RQ 0.9666667; mean TP 4, FN 0.5, FP 0.
  assert results['pq'] == pytest.approx(0.62156284, abs=1e-7)
  assert results['sq'] == pytest.approx(0.64664984, abs=1e-7)
  assert results['rq'] == pytest.approx(0.9666667, abs=1e-7)
  stats = accumulator.statistics.per_category
  assert [(stats[c].tp, stats[c].fn, stats[c].fp) for c in (1, 2)] == [(7, 1, 0), (1, 0, 0)]


def test_deeplab2_three_images():
  descriptor = evaluation_testing.make_descriptor(7, things=(1, 2, 4, 6), ignore_label=0,
                                                  label_divisor=256)
  accumulator = pq_lib.PanopticQualityAccumulator.from_descriptor(descriptor)
  for name, gt_file, gt_classes in (('bird', 'bird_gt.png', _BIRD_GT_CLASSES),
                                    ('cat', 'cat_gt.png', _CAT_GT_CLASSES),
                                    ('team', 'team_gt_instance.png', _TEAM_GT_CLASSES)):
    accumulator.update_panoptic(*_deeplab2_image(name, gt_file, gt_classes, 256))
  results = accumulator.results()['All']
  # Published: PQ 0.76855499, SQ 0.7769174, RQ 0.98888892 (mean TP 2, FN 1/6, FP 0).
  assert results['pq'] == pytest.approx(0.76855499, abs=1e-7)
  assert results['sq'] == pytest.approx(0.7769174, abs=1e-7)
  assert results['rq'] == pytest.approx(0.98888892, abs=1e-7)
  assert results['n'] == 6


def test_deeplab2_non_contiguous_ignore_label():
  # DeepLab2's 3x3 case, ignore label 9, classes 0..2 (published PQ 2/9, SQ 1/3, RQ 2/9).
  # There, ignore-label pixels with instance 0 are VOID, while class 9 instance 2 is neither VOID
  # nor scored. In COCO terms that is a crowd segment of a category nobody predicts, and predicted
  # class 9 is VOID, so the official rules give the same value.
  #   GT class     GT instance   pred class   pred instance
  #   0 9 9        0 2 2         0 0 9        0 0 0
  #   1 2 2        1 0 0         1 1 1        0 1 1
  #   1 9 9        1 0 0         1 9 9        0 1 1
  gt_ids = np.array([[1, 2, 2], [3, 4, 4], [3, 0, 0]])
  gt_segments = [_seg(1, 0, 1), _seg(2, 9, 2, iscrowd=1), _seg(3, 1, 2), _seg(4, 2, 2)]
  pred_ids = np.array([[1, 1, 0], [2, 3, 3], [2, 0, 0]])
  pred_segments = [_seg(1, 0, 0), _seg(2, 1, 0), _seg(3, 1, 0)]
  categories = {c: {'id': c, 'isthing': 1} for c in (0, 1, 2, 9)}
  accumulator = pq_lib.PanopticQualityAccumulator(categories)
  accumulator.update(gt_ids, gt_segments, pred_ids, pred_segments)
  results = accumulator.results()['All']
  assert results['pq'] == pytest.approx(2 / 9, abs=1e-12)
  assert results['sq'] == pytest.approx(1 / 3, abs=1e-12)
  assert results['rq'] == pytest.approx(2 / 9, abs=1e-12)
  assert results['n'] == 3


# ---- Properties ----


def _random_scene(rng, height=24, width=32, num_segments=7):
  """A panoptic map of random rectangles (train ids 1..4 things, 5..6 stuff, 0 ignore)."""
  panoptic = np.full((height, width), 5 * 256)
  for index in range(num_segments):
    train_id = int(rng.integers(0, 7))
    y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
    h, w = rng.integers(3, height - y + 1), rng.integers(3, width - x + 1)
    panoptic[y:y + h, x:x + w] = train_id * 256 + (index + 1 if 1 <= train_id <= 4 else 0)
  return panoptic


_SCENE_DESCRIPTOR = evaluation_testing.make_descriptor(7, things=(1, 2, 3, 4), ignore_label=0)


def test_perfect_prediction_gives_one_and_empty_prediction_gives_zero():
  rng = np.random.default_rng(0)
  gt = _random_scene(rng)
  crowd = np.zeros(gt.shape, bool)
  crowd[:3, :5] = True
  gt_ids, gt_segments = formats.segments_from_panoptic_label(
      gt, formats.LabelSpace.from_descriptor(_SCENE_DESCRIPTOR), is_crowd=crowd)
  perfect = pq_lib.PanopticQualityAccumulator.from_descriptor(_SCENE_DESCRIPTOR)
  perfect.update_panoptic(gt, gt)
  # The same segments predicted, crowd ones as ordinary predictions (excused by their crowd).
  perfect.update(gt_ids, gt_segments, gt_ids,
                 [{'id': s['id'], 'category_id': s['category_id']} for s in gt_segments])
  assert perfect.results()['All']['pq'] == 1.0
  empty = pq_lib.PanopticQualityAccumulator.from_descriptor(_SCENE_DESCRIPTOR)
  empty.update_panoptic(gt, np.zeros_like(gt), gt_is_crowd=crowd)
  assert empty.results()['All']['pq'] == 0.0
  # Every non-crowd GT segment is a false negative; nothing else is counted.
  stats = empty.statistics.per_category.values()
  assert sum(s.fn for s in stats) == sum(1 for s in gt_segments if not s['iscrowd']) > 3
  assert sum(s.tp + s.fp for s in stats) == 0


def test_renumbering_instances_changes_nothing():
  rng = np.random.default_rng(1)
  for _ in range(5):
    gt, pred = _random_scene(rng), _random_scene(rng)
    reference = pq_lib.PanopticQualityAccumulator.from_descriptor(_SCENE_DESCRIPTOR)
    reference.update_panoptic(gt, pred)
    renumbered = pq_lib.PanopticQualityAccumulator.from_descriptor(_SCENE_DESCRIPTOR)
    # A new instance id per (class, instance), chosen at random below the divisor.
    def renumber(panoptic):
      out = panoptic.copy()
      values = np.unique(panoptic)
      new_instances = rng.permutation(256)[:len(values)]
      for value, instance in zip(values, new_instances):
        if value // 256 in (1, 2, 3, 4):
          out[panoptic == value] = value // 256 * 256 + instance
      return out
    renumbered.update_panoptic(renumber(gt), renumber(pred))
    assert renumbered.results() == reference.results()


def test_coco_sample_ground_truth_against_itself(coco_sample_dir):
  """The real COCO sample (with crowd segments) as its own prediction scores 1."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(coco_sample_dir, 'panoptic_examples.json')) as f:
    gt_json = json.load(f)
  categories = {c['id']: c for c in gt_json['categories']}
  accumulator = pq_lib.PanopticQualityAccumulator(categories)
  for annotation in gt_json['annotations']:
    ids = coco_format.read_panoptic_png(
        os.path.join(coco_sample_dir, 'panoptic_examples', annotation['file_name']))
    # Crowd GT segments become ordinary predictions: excused by their own crowd region.
    pred_segments = [{'id': s['id'], 'category_id': s['category_id']}
                     for s in annotation['segments_info']]
    accumulator.update(ids, annotation['segments_info'], ids, pred_segments)
  results = accumulator.results()
  assert results['All']['pq'] == 1.0
  assert results['All']['n'] == 8  # categories 1, 8, 19, 37, 125, 184, 187, 193 appear.
