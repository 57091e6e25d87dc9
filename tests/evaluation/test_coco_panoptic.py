"""The COCO panoptic CLI: mmdetection's public case end to end, the real COCO sample, worker
count independence, output schema and readable errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

import evaluation_testing
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.evaluation import coco_panoptic
from deeplab2_kmax.evaluation import formats
from deeplab2_kmax.evaluation import panoptic_quality as pq_lib

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_main(**flag_values):
  """Runs coco_panoptic.main in process with the given flags; returns its exit status."""
  coco_panoptic.define_flags()
  argv = ['coco_panoptic'] + [f'--{k}={v}' for k, v in flag_values.items()]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    return coco_panoptic.main(['coco_panoptic'])
  finally:
    flags.FLAGS.unparse_flags()


def _write_mmdetection_case(tmp_path):
  """open-mmlab/mmdetection tests/test_evaluation/test_metrics/test_coco_panoptic_metric.py.

  60 x 80 image. GT (category ids 0 person, 1 cat, 2 dog, 3 wall): persons at boxes
  (x, y, w, h) (10, 10, 10, 40) and (30, 10, 10, 40), a dog at (50, 10, 10, 5), wall elsewhere
  (JSON area 3950). Prediction with contiguous labels 0 person, 1 dog, 2 wall: persons at
  (11, 11, 10, 40) and (38, 10, 10, 40), a dog at (51, 10, 10, 5), wall elsewhere.
  """
  gt_ids = np.full((60, 80), 4)
  for segment_id, (x, y, w, h) in enumerate([(10, 10, 10, 40), (30, 10, 10, 40),
                                             (50, 10, 10, 5)], start=1):
    gt_ids[y:y + h, x:x + w] = segment_id
  png_encoding.write_png(str(tmp_path / 'gt' / 'fake_name1.png'), panoptic_rgb.id_to_rgb(gt_ids))
  categories = [{'id': 0, 'name': 'person', 'isthing': 1}, {'id': 1, 'name': 'cat', 'isthing': 1},
                {'id': 2, 'name': 'dog', 'isthing': 1}, {'id': 3, 'name': 'wall', 'isthing': 0}]
  segments = [{'id': 1, 'category_id': 0, 'area': 400, 'iscrowd': 0},
              {'id': 2, 'category_id': 0, 'area': 400, 'iscrowd': 0},
              {'id': 3, 'category_id': 2, 'area': 50, 'iscrowd': 0},
              {'id': 4, 'category_id': 3, 'area': 3950, 'iscrowd': 0}]
  gt_json = {'images': [{'id': 0, 'width': 80, 'height': 60, 'file_name': 'fake_name1.jpg'}],
             'annotations': [{'image_id': 0, 'file_name': 'fake_name1.png',
                              'segments_info': segments}],
             'categories': categories}
  (tmp_path / 'gt.json').write_text(json.dumps(gt_json))

  # Our side: a panoptic label map with contiguous train ids, written by our COCO writer,
  # which must map train ids 0, 1, 2 back to category ids 0, 2, 3.
  descriptor = evaluation_testing.make_descriptor(
      3, things=(0, 1), ignore_label=255, label_divisor=1000, category_ids=(0, 2, 3))
  panoptic = np.full((60, 80), 2 * 1000)
  for instance, (train_id, (x, y, w, h)) in enumerate(
      [(0, (11, 11, 10, 40)), (0, (38, 10, 10, 40)), (1, (51, 10, 10, 5))], start=1):
    panoptic[y:y + h, x:x + w] = train_id * 1000 + instance
  annotation = formats.write_coco_panoptic(panoptic, descriptor, 0, 'fake_name1.png',
                                           str(tmp_path / 'pred'))
  (tmp_path / 'pred.json').write_text(json.dumps(
      formats.coco_panoptic_json([annotation], coco_format.coco_categories(descriptor))))
  return dict(gt_json=tmp_path / 'gt.json', gt_folder=tmp_path / 'gt',
              pred_json=tmp_path / 'pred.json', pred_folder=tmp_path / 'pred')


def test_mmdetection_60x80_case_through_the_cli(tmp_path, capsys):
  paths = _write_mmdetection_case(tmp_path)
  output = tmp_path / 'out' / 'pq.json'
  assert _run_main(**paths, output_json=output, num_workers=1) == 0
  results = json.loads(output.read_text())
  # Published (x 100): PQ 67.86874803219071, SQ 80.89770126158936, RQ 83.33333333333334,
  # PQ_th 60.45252075318891, SQ_th 79.9959505972869, RQ_th 75.0, PQ_st 82.70120259019427.
  assert 100 * results['All']['pq'] == pytest.approx(67.86874803219071, abs=1e-10)
  assert 100 * results['All']['sq'] == pytest.approx(80.89770126158936, abs=1e-10)
  assert 100 * results['All']['rq'] == pytest.approx(83.33333333333334, abs=1e-10)
  assert 100 * results['Things']['pq'] == pytest.approx(60.45252075318891, abs=1e-10)
  assert 100 * results['Things']['sq'] == pytest.approx(79.9959505972869, abs=1e-10)
  assert 100 * results['Things']['rq'] == pytest.approx(75.0, abs=1e-10)
  assert 100 * results['Stuff']['pq'] == pytest.approx(82.70120259019427, abs=1e-10)
  assert 100 * results['Stuff']['rq'] == pytest.approx(100.0, abs=1e-10)
  # The output contract: All/Things/Stuff with pq, sq, rq, n; per_class keyed by category id.
  assert set(results) == {'All', 'Things', 'Stuff', 'per_class'}
  assert set(results['All']) == {'pq', 'sq', 'rq', 'n'}
  assert (results['All']['n'], results['Things']['n'], results['Stuff']['n']) == (3, 2, 1)
  # cat (1) appears nowhere: listed with zeros, as pq_compute does, and not counted in n.
  assert set(results['per_class']) == {'0', '1', '2', '3'}
  assert results['per_class']['1'] == {'pq': 0.0, 'sq': 0.0, 'rq': 0.0}
  assert results['per_class']['2']['pq'] == pytest.approx(45 / 55, abs=1e-15)
  assert results['per_class']['0']['pq'] == pytest.approx((351 / 449) / 2, abs=1e-15)
  table = capsys.readouterr().out
  assert 'All       |  67.9   80.9   83.3     3' in table
  assert 'Stuff     |  82.7   82.7  100.0     1' in table


def _coco_sample_prediction(coco_sample_dir, tmp_path):
  """Writes the COCO sample's GT, read back as label maps, with one person removed, as a
  prediction through our writer (train ids -> COCO ids). Returns (gt_json_path, pred paths)."""
  descriptor = datasets.get_built_in(datasets.COCO_PANOPTIC)
  spec = coco_format.spec_from_descriptor(descriptor, treat_crowd_as_ignore=False)
  gt_json_path = os.path.join(coco_sample_dir, 'panoptic_examples.json')
  with open(gt_json_path) as f:
    gt_json = json.load(f)
  writer = formats.PanopticPredictionWriter(descriptor, str(tmp_path / 'pred'),
                                            str(tmp_path / 'pred.json'))
  for index, annotation in enumerate(gt_json['annotations']):
    panoptic = coco_format.read_panoptic_annotation(
        annotation, os.path.join(coco_sample_dir, 'panoptic_examples'), spec, gt_json_path)
    if index == 0:
      # Remove the first non-crowd person: it becomes VOID (train id 0) in the prediction.
      first_person = next(s for s in annotation['segments_info']
                          if s['category_id'] == 1 and not s['iscrowd'])
      ids = coco_format.read_panoptic_png(
          os.path.join(coco_sample_dir, 'panoptic_examples', annotation['file_name']))
      panoptic[ids == first_person['id']] = 0
    written = writer.add(panoptic, annotation['image_id'])
    assert written['file_name'] == annotation['file_name']  # COCO's %012d.png naming
  writer.write_json()
  return dict(gt_json=gt_json_path, gt_folder=os.path.join(coco_sample_dir, 'panoptic_examples'),
              pred_json=tmp_path / 'pred.json', pred_folder=tmp_path / 'pred')


def test_coco_sample_with_a_missing_person(coco_sample_dir, tmp_path):
  paths = {k: str(v) for k, v in _coco_sample_prediction(coco_sample_dir, tmp_path).items()}
  results = coco_panoptic.evaluate(**paths, num_workers=1)
  # 26 non-crowd persons (13 per image) in the two images, one missed: person
  # PQ = 25 / (25 + 1/2); the seven other categories (3 things, 4 stuff) are perfect, and the
  # crowd regions, predicted as ordinary person segments, are excused.
  person = 25 / 25.5
  assert results['per_class']['1'] == {'pq': person, 'sq': 1.0, 'rq': person}
  assert results['All']['pq'] == pytest.approx((7 + person) / 8, abs=1e-15)
  assert results['Things']['pq'] == pytest.approx((3 + person) / 4, abs=1e-15)
  assert results['Stuff'] == {'pq': 1.0, 'sq': 1.0, 'rq': 1.0, 'n': 4}


def _copy_case(paths, tmp_path, mutate_pred):
  pred = json.loads(paths['pred_json'].read_text())
  mutate_pred(pred)
  target = tmp_path / 'mutated.json'
  target.write_text(json.dumps(pred))
  return dict(paths, pred_json=target)


@pytest.mark.parametrize('mutate, message', [
    (lambda p: p['annotations'][0]['segments_info'].pop(0),
     r"image 0 \(fake_name1.png\), prediction PNG .*: segment id 1 is in the prediction PNG"),
    (lambda p: p['annotations'][0]['segments_info'].append({'id': 99, 'category_id': 0}),
     r'segment id\(s\) \[99\] are listed in segments_info but have no pixel'),
    (lambda p: p['annotations'][0]['segments_info'][0].update(category_id=1000),
     'predicted segment 1 has category 1000'),
    (lambda p: p['annotations'][0]['segments_info'].append(p['annotations'][0]['segments_info'][0]),
     'predicted segment id 1 is listed twice'),
    (lambda p: p['annotations'][0].update(image_id=5), "no prediction for image 0"),
    (lambda p: p['annotations'][0].update(file_name='absent.png'),
     'prediction PNG .*absent.png does not exist'),
])
def test_malformed_predictions_give_one_readable_error(tmp_path, capsys, mutate, message):
  paths = _copy_case(_write_mmdetection_case(tmp_path), tmp_path, mutate)
  assert _run_main(**paths, num_workers=1) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err
  assert __import__('re').search(message, err), err


def test_size_mismatch_is_reported(tmp_path, capsys):
  paths = _write_mmdetection_case(tmp_path)
  png_encoding.write_png(str(paths['pred_folder'] / 'fake_name1.png'),
                    panoptic_rgb.id_to_rgb(np.ones((30, 80), np.int64)))
  assert _run_main(**paths, num_workers=1) == 1
  assert 'prediction is (30, 80) (height, width) but the ground truth is (60, 80)' in (
      capsys.readouterr().err)


def test_check_gt_areas_flag(tmp_path, capsys):
  paths = _write_mmdetection_case(tmp_path)
  gt = json.loads(paths['gt_json'].read_text())
  gt['annotations'][0]['segments_info'][3]['area'] = 3000  # the wall has 3950 pixels
  paths['gt_json'].write_text(json.dumps(gt))
  assert _run_main(**paths, num_workers=1) == 0  # official behaviour: the JSON area is used
  capsys.readouterr()
  assert _run_main(**paths, num_workers=1, check_gt_areas=True) == 1
  assert 'segment 4 has area 3000 in the GT JSON but 3950 pixels' in capsys.readouterr().err


def test_cli_process_exits_1_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab2_kmax.evaluation.coco_panoptic',
       f'--gt_json={tmp_path / "missing.json"}', f'--gt_folder={tmp_path}',
       f'--pred_json={tmp_path / "p.json"}', f'--pred_folder={tmp_path}'],
      cwd=_REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert f'error: --gt_json "{tmp_path / "missing.json"}" does not exist' in result.stderr


def test_format_table_matches_the_official_layout():
  results = {'All': {'pq': 0.5, 'sq': 0.75, 'rq': 2 / 3, 'n': 3},
             'Things': {'pq': 0.25, 'sq': 1.0, 'rq': 0.25, 'n': 2},
             'Stuff': {'pq': 1.0, 'sq': 1.0, 'rq': 1.0, 'n': 1}, 'per_class': {}}
  assert pq_lib.format_table(results).splitlines() == [
      '          |    PQ     SQ     RQ     N',
      '--------------------------------------',
      'All       |  50.0   75.0   66.7     3',
      'Things    |  25.0  100.0   25.0     2',
      'Stuff     | 100.0  100.0  100.0     1']
