"""Cityscapes format end to end, and parity with cityscapesScripts' official evaluation when the
optional package is installed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.evaluation import cityscapes_panoptic
from deeplab2_kmax.evaluation import coco_panoptic
from deeplab2_kmax.evaluation import formats

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CITYSCAPES = datasets.get_built_in(datasets.CITYSCAPES_PANOPTIC)
_THINGS = CITYSCAPES.thing_class_ids  # train ids 11..18


def _scene(rng, height=48, width=64):
  """GT and a noisy prediction (label maps, divisor 1000) plus a GT crowd mask."""
  gt = np.zeros((height, width), np.int64)  # road everywhere (train id 0)
  gt[:10] = 10 * 1000  # sky
  for instance in range(1, 9):
    train_id = int(rng.choice(_THINGS)) if instance % 3 else int(rng.integers(1, 11))
    y, x = int(rng.integers(5, height - 10)), int(rng.integers(0, width - 10))
    h, w = int(rng.integers(6, 16)), int(rng.integers(6, 16))
    gt[y:y + h, x:x + w] = train_id * 1000 + (instance if train_id in _THINGS else 0)
  gt[-4:, -8:] = 255 * 1000  # VOID
  crowd = np.zeros(gt.shape, bool)
  crowd[-12:-4, :12] = True
  gt[crowd] = 13 * 1000  # a crowd of cars
  pred = gt.copy()
  pred[pred == 255 * 1000] = 0  # VOID predicted as road
  pred = np.roll(pred, shift=(int(rng.integers(0, 3)), int(rng.integers(0, 3))), axis=(0, 1))
  pred[crowd] = 13 * 1000 + 500  # cars predicted on the crowd: excused
  pred[20:26, 30:40] = 11 * 1000 + 77  # an extra person
  return gt, pred, crowd


def _write_case(tmp_path, seed=0, num_images=3):
  rng = np.random.default_rng(seed)
  gt_annotations = []
  writer = formats.PanopticPredictionWriter(CITYSCAPES, str(tmp_path / 'pred'),
                                            str(tmp_path / 'pred.json'), layout='cityscapes')
  for index in range(num_images):
    gt, pred, crowd = _scene(rng)
    image_id = f'city_{index:06d}_000019'
    gt_annotations.append(formats.write_cityscapes_panoptic(
        gt, CITYSCAPES, image_id, str(tmp_path / 'gt'), f'{image_id}_gtFine_panoptic.png',
        is_crowd=crowd))
    writer.add(pred, image_id)
  writer.write_json()
  (tmp_path / 'gt.json').write_text(json.dumps(
      formats.coco_panoptic_json(gt_annotations, coco_format.coco_categories(CITYSCAPES))))
  return dict(gt_json=str(tmp_path / 'gt.json'), gt_folder=str(tmp_path / 'gt'),
              pred_json=str(tmp_path / 'pred.json'), pred_folder=str(tmp_path / 'pred'))


def test_generated_cityscapes_case_has_crowd_and_both_kinds(tmp_path):
  paths = _write_case(tmp_path)
  gt_json = json.loads(open(paths['gt_json']).read())
  segments = [s for a in gt_json['annotations'] for s in a['segments_info']]
  assert any(s['iscrowd'] and s['id'] == 26 for s in segments)  # car crowd, bare label id
  assert any(s['id'] >= 24000 for s in segments)
  results = coco_panoptic.evaluate(**paths)
  assert results['Things']['n'] > 0 and results['Stuff']['n'] > 0
  assert 0.0 < results['All']['pq'] < 1.0
  # Worker processes (spawned) give exactly the same numbers: images are summed in order.
  assert coco_panoptic.evaluate(**paths, num_workers=2) == results


@pytest.mark.skipif(not cityscapes_panoptic.is_available(),
                    reason='optional package cityscapesscripts is not installed '
                           '(pip install cityscapesscripts to run the official-parity check)')
def test_pq_equals_cityscapesscripts(tmp_path):
  paths = _write_case(tmp_path)
  ours = coco_panoptic.evaluate(**paths)
  # The official script forks a pool; run it in a fresh process that never loaded TensorFlow.
  output = tmp_path / 'official.json'
  code = ('import json, sys\n'
          'from deeplab2_kmax.evaluation import cityscapes_panoptic as c\n'
          'r = c.evaluate_with_cityscapesscripts(*sys.argv[1:5])\n'
          'json.dump(r, open(sys.argv[5], "w"))\n')
  subprocess.run([sys.executable, '-c', code, paths['gt_json'], paths['gt_folder'],
                  paths['pred_json'], paths['pred_folder'], str(output)],
                 cwd=_REPO_ROOT, check=True, capture_output=True, timeout=300)
  official = json.loads(output.read_text())
  for name in ('All', 'Things', 'Stuff'):
    assert official[name]['n'] == ours[name]['n']
    for key in ('pq', 'sq', 'rq'):
      # Equal up to float summation order (the official script sums per-core partial sums).
      assert official[name][key] == pytest.approx(ours[name][key], abs=1e-12, rel=0)
  for category, value in official['per_class'].items():
    expected = ours['per_class'].get(category, {'pq': 0.0, 'sq': 0.0, 'rq': 0.0})
    assert value == pytest.approx(expected, abs=1e-12, rel=0), category


def test_missing_package_message(monkeypatch):
  # A None entry in sys.modules makes the import fail, installed or not.
  monkeypatch.setitem(sys.modules, 'cityscapesscripts', None)
  monkeypatch.setitem(sys.modules, 'cityscapesscripts.evaluation', None)
  assert not cityscapes_panoptic.is_available()
  with pytest.raises(ImportError, match='pip install cityscapesscripts'):
    cityscapes_panoptic.evaluate_with_cityscapesscripts('a', 'b', 'c', 'd')
