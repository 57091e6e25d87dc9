"""Mask AP glue (category mapping, scores, RLE) against pycocotools run by hand, and mIoU."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_lib

import evaluation_testing
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.evaluation import formats
from deeplab2_kmax.evaluation import instance_ap
from deeplab2_kmax.evaluation import miou
from deeplab2_kmax.evaluation import panoptic_quality

# Train ids: 0 void (ignore), 1 and 2 things (COCO-style ids 11 and 27), 3 stuff (40).
DESCRIPTOR = evaluation_testing.make_descriptor(4, things=(1, 2), ignore_label=0,
                                                category_ids=(0, 11, 27, 40), label_divisor=256)
CATEGORY_OF = {1: 11, 2: 27}


def _box_mask(shape, box):
  y, x, h, w = box
  mask = np.zeros(shape, bool)
  mask[y:y + h, x:x + w] = True
  return mask


def _generated_case(rng, shape=(40, 50)):
  """Rectangles for GT and prediction, with the masks and labels the hand path needs."""
  gt = np.full(shape, 3 * 256)
  pred = np.full(shape, 3 * 256)
  gt_instances, pred_instances = [], []
  for index in range(6):
    train_id = 1 + index % 2
    box = (int(rng.integers(0, 30)), int(rng.integers(0, 40)), int(rng.integers(4, 10)),
           int(rng.integers(4, 10)))
    gt[_box_mask(shape, box)] = train_id * 256 + index + 1
    # Predicted: shifted by up to 2 pixels; every third with the other class; distinct scores.
    dy, dx = rng.integers(-2, 3, size=2)
    pred_box = (max(0, box[0] + int(dy)), max(0, box[1] + int(dx)), box[2], box[3])
    pred_class = train_id if index % 3 else 3 - train_id
    pred[_box_mask(shape, pred_box)] = pred_class * 256 + index + 1
  crowd = _box_mask(shape, (34, 0, 6, 12))
  gt[crowd] = 1 * 256 + 50
  pred[_box_mask(shape, (0, 44, 5, 6))] = 2 * 256 + 99  # a false positive
  # Masks as they ended up after overlaps (later rectangles paint over earlier ones).
  for label in np.unique(gt).tolist():
    if label // 256 in CATEGORY_OF:
      mask = gt == label
      gt_instances.append((CATEGORY_OF[label // 256], mask, bool((mask & crowd).any())))
  scores = {}
  for label in np.unique(pred).tolist():
    if label // 256 in CATEGORY_OF:
      scores[label] = 0.3 + 0.05 * (label % 256 % 13)
      pred_instances.append((CATEGORY_OF[label // 256], pred == label, scores[label]))
  return gt, pred, crowd, scores, gt_instances, pred_instances


def _pycocotools_by_hand(images):
  """COCOeval on GT and detections built directly from masks (not through instance_ap)."""
  dataset = {'images': [], 'annotations': [],
             'categories': [{'id': 11, 'name': 'a'}, {'id': 27, 'name': 'b'}]}
  results = []
  for image_id, (shape, gt_instances, pred_instances) in enumerate(images, start=1):
    dataset['images'].append({'id': image_id, 'height': shape[0], 'width': shape[1]})
    for category, mask, crowd in gt_instances:
      rle = mask_lib.encode(np.asfortranarray(mask.astype(np.uint8)))
      dataset['annotations'].append({
          'id': len(dataset['annotations']) + 1, 'image_id': image_id, 'category_id': category,
          'segmentation': rle, 'area': float(mask.sum()),
          'bbox': list(mask_lib.toBbox(rle)), 'iscrowd': int(crowd)})
    for category, mask, score in pred_instances:
      results.append({'image_id': image_id, 'category_id': category, 'score': score,
                      'segmentation': mask_lib.encode(np.asfortranarray(mask.astype(np.uint8)))})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = coco_lib.COCO()
    gt.dataset = dataset
    gt.createIndex()
    evaluator = cocoeval.COCOeval(gt, gt.loadRes(results), iouType='segm')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return list(evaluator.stats)


def test_mask_ap_equals_pycocotools_on_a_generated_case():
  rng = np.random.default_rng(3)
  accumulator = instance_ap.InstanceAPAccumulator(DESCRIPTOR)
  by_hand = []
  for _ in range(3):
    gt, pred, crowd, scores, gt_instances, pred_instances = _generated_case(rng)
    accumulator.update(gt, pred, scores=scores, gt_is_crowd=crowd)
    by_hand.append((gt.shape, gt_instances, pred_instances))
  ours = accumulator.result()
  expected = _pycocotools_by_hand(by_hand)
  assert [ours[name] for name in instance_ap.STAT_NAMES] == expected
  assert 0.0 < ours['AP'] < 1.0
  gt_dataset = accumulator.gt_dataset()
  assert {c['id'] for c in gt_dataset['categories']} == {11, 27}
  assert sum(a['iscrowd'] for a in gt_dataset['annotations']) == 3


def test_written_json_gives_the_same_ap_through_pycocotools_files(tmp_path):
  rng = np.random.default_rng(5)
  accumulator = instance_ap.InstanceAPAccumulator(DESCRIPTOR)
  gt, pred, crowd, scores, _, _ = _generated_case(rng)
  accumulator.update(gt, pred, scores=scores, gt_is_crowd=crowd)
  accumulator.write_json(str(tmp_path / 'dt.json'), str(tmp_path / 'gt.json'))
  with contextlib.redirect_stdout(io.StringIO()):
    coco = coco_lib.COCO(str(tmp_path / 'gt.json'))
    evaluator = cocoeval.COCOeval(coco, coco.loadRes(str(tmp_path / 'dt.json')), 'segm')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  assert list(evaluator.stats) == [accumulator.result()[n] for n in instance_ap.STAT_NAMES]


def test_ground_truth_instances_equal_panopticapis_detection_format(coco_sample_dir):
  """Our instances of the real COCO sample equal panopticapi's panoptic2detection output
  (`panoptic_coco_detection_format.json`, thing annotations): masks, category, crowd, area, box."""
  coco = datasets.get_built_in(datasets.COCO_PANOPTIC)
  spec = coco_format.spec_from_descriptor(coco, treat_crowd_as_ignore=False)
  with open(os.path.join(coco_sample_dir, 'panoptic_examples.json')) as f:
    panoptic_json = json.load(f)
  with open(os.path.join(coco_sample_dir, 'panoptic_coco_detection_format.json')) as f:
    detection_json = json.load(f)
  categories = {c['id']: c for c in panoptic_json['categories']}
  for annotation in panoptic_json['annotations']:
    folder = os.path.join(coco_sample_dir, 'panoptic_examples')
    panoptic = coco_format.read_panoptic_annotation(annotation, folder, spec)
    ids = coco_format.read_panoptic_png(os.path.join(folder, annotation['file_name']))
    crowd = np.isin(ids, [s['id'] for s in annotation['segments_info'] if s['iscrowd']])
    ours = instance_ap.ground_truth_from_panoptic(panoptic, annotation['image_id'], coco, crowd)
    theirs = [a for a in detection_json['annotations']
              if a['image_id'] == annotation['image_id']
              and categories[a['category_id']]['isthing']]
    def key(a):
      decoded = mask_lib.decode({'size': a['segmentation']['size'],
                                 'counts': a['segmentation']['counts'].encode()})
      return decoded.tobytes()
    theirs_by_mask = {key(a): a for a in theirs}
    assert len(ours) == len(theirs) == len(theirs_by_mask)
    for a in ours:
      b = theirs_by_mask[key(a)]
      assert (a['category_id'], a['iscrowd'], a['area']) == (b['category_id'], b['iscrowd'],
                                                              b['area'])
      assert a['bbox'] == [float(v) for v in b['bbox']]
      assert a['segmentation'] == b['segmentation']  # identical RLE


def test_perfect_prediction_has_ap_one_and_rle_decodes_to_the_mask():
  rng = np.random.default_rng(4)
  gt, _, crowd, _, _, _ = _generated_case(rng)
  accumulator = instance_ap.InstanceAPAccumulator(DESCRIPTOR)
  labels = [l for l in np.unique(gt).tolist() if l // 256 in CATEGORY_OF]
  accumulator.update(gt, gt, scores={l: 0.9 for l in labels}, gt_is_crowd=crowd)
  assert accumulator.result()['AP'] == 1.0
  detection = accumulator.detections[0]
  decoded = mask_lib.decode({'size': detection['segmentation']['size'],
                             'counts': detection['segmentation']['counts'].encode()})
  np.testing.assert_array_equal(decoded.astype(bool), gt == labels[0])
  assert detection['category_id'] == CATEGORY_OF[labels[0] // 256]


def test_deeplab2_score_rule():
  panoptic = np.array([[1 * 256 + 1, 1 * 256 + 1], [2 * 256 + 1, 3 * 256]])
  probability = np.zeros((2, 2, 4))
  probability[0, 0, 1], probability[0, 1, 1], probability[1, 0, 2] = 0.8, 0.6, 0.5
  instance_scores = np.array([[0.5, 1.0], [0.2, 0.0]])
  scores = instance_ap.deeplab2_scores(panoptic, probability, instance_scores,
                                       formats.LabelSpace.from_descriptor(DESCRIPTOR))
  # Segment 257: mean P(class 1) 0.7 x mean instance 0.75; 513: 0.5 x 0.2; stuff 768 none.
  assert scores == pytest.approx({257: 0.7 * 0.75, 513: 0.5 * 0.2})
  with pytest.raises(ValueError, match='no score for predicted segment 513'):
    instance_ap.detections_from_panoptic(panoptic, 1, DESCRIPTOR, {257: 0.5})


def test_miou_hand_worked():
  metric = miou.MeanIoU(num_classes=3, ignore_label=255)
  metric.update(np.array([[0, 0, 1, 1], [2, 2, 255, 255]]),
                np.array([[0, 1, 1, 1], [2, 255, 0, 0]]))
  # class 0: TP 1, union 2; class 1: TP 2, union 3; class 2: TP 1, union 2 (its pixel predicted
  # 255 is a miss); the two ignored GT pixels do not count.
  result = metric.result()
  assert result['per_class'] == pytest.approx({0: 0.5, 1: 2 / 3, 2: 0.5})
  assert result['miou'] == pytest.approx(5 / 9)
  # An ignore label that is a train id (COCO's 0) is never averaged; absent classes neither.
  metric = miou.MeanIoU(num_classes=4, ignore_label=0)
  metric.update(np.array([[0, 1], [1, 2]]), np.array([[1, 1], [0, 2]]))
  assert metric.result() == {'miou': pytest.approx(0.75), 'per_class': {1: 0.5, 2: 1.0}}
  with pytest.raises(ValueError, match='ground-truth label 7'):
    metric.update(np.array([[7]]), np.array([[1]]))


def test_accumulators_of_two_shares_merge_into_those_of_all_images():
  """As the evaluator adds up the workers' shares: images 0, 2 in one accumulator, 1, 3 in
  another; merged, mask AP equals pycocotools on all four (image ids renumbered, so the
  detections still point at their images), mIoU's confusion matrix and PQ those of one
  accumulator fed every image."""
  rng = np.random.default_rng(11)
  cases = [_generated_case(rng) for _ in range(4)]
  whole = (instance_ap.InstanceAPAccumulator(DESCRIPTOR), miou.MeanIoU(4, 0),
           panoptic_quality.PanopticQualityAccumulator.from_descriptor(DESCRIPTOR))
  shares = [(instance_ap.InstanceAPAccumulator(DESCRIPTOR), miou.MeanIoU(4, 0),
             panoptic_quality.PanopticQualityAccumulator.from_descriptor(DESCRIPTOR))
            for _ in range(2)]
  for index, (gt, pred, crowd, scores, _, _) in enumerate(cases):
    for ap, iou, pq in (whole, shares[index % 2]):
      ap.update(gt, pred, scores=scores, gt_is_crowd=crowd)
      iou.update(gt // 256, pred // 256)
      pq.update_panoptic(gt, pred, gt_is_crowd=crowd)
  for merged, other in zip(shares[0], shares[1]):
    merged.merge(other)
  ap, iou, pq = shares[0]
  in_share_order = [cases[i] for i in (0, 2, 1, 3)]
  expected = _pycocotools_by_hand([(c[0].shape, c[4], c[5]) for c in in_share_order])
  assert [ap.result()[name] for name in instance_ap.STAT_NAMES] == expected
  assert 0.0 < ap.result()['AP'] < 1.0
  # (Not compared with whole[0]: these cases' scores repeat from image to image, and COCOeval
  # breaks score ties by image order, which the shares change.)
  np.testing.assert_array_equal(iou.confusion, whole[1].confusion)
  assert pq.num_images == 4
  for group in ('All', 'Things', 'Stuff'):
    assert pq.results()[group] == pytest.approx(whole[2].results()[group], abs=1e-12)
  for category, stats in whole[2].statistics.per_category.items():
    merged_stats = pq.statistics.per_category[category]
    assert (merged_stats.tp, merged_stats.fp, merged_stats.fn) == (stats.tp, stats.fp, stats.fn)
  assert 0.0 < pq.results()['All']['pq'] < 1.0
  with pytest.raises(ValueError, match='3 classes into one over 4'):
    iou.merge(miou.MeanIoU(3, 0))
