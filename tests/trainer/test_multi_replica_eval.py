"""Evaluation on several replicas or workers gives the results of one device.

* MirroredStrategy over 2 logical CPUs (a subprocess: the logical devices must be set up before
  TensorFlow starts): identical PQ/SQ/RQ (per class too), mIoU and mask AP over the same 8
  images (per-replica batches of 2 instead of batches of 4). The evaluator feeds every local
  replica's per-image outputs into one set of accumulators (evaluator.eval_reduce).
* Two MultiWorkerMirrored workers on 127.0.0.1: each reads its share of the eval set (the
  input pipeline splits it) and both report the results of the whole set (the evaluator adds
  up every worker's accumulators, gathered through the strategy's collectives), on the
  session's dataset (1 file of 8 images: every other record each) and on one of 7 images in 3
  files (whole files: 4 and 3 images, so one worker runs out of batches first). There,
  --mode=continuous_eval is refused with a message.

The predictions are made from the ground truth, partly right
(distributed_helper._PartlyRightPredictions), so that PQ is strictly between 0 and 1 and an
image counted twice or missed would change it; no model is built (15-30 s each).
"""

import json

import pytest

from deeplab2_kmax.data.build import synthetic as build_synthetic_data
from tests.trainer import conftest


def _flat(tree, prefix=''):
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _flat(value, f'{prefix}/{key}').items()}
  return {prefix: tree}


def _assert_segments_were_matched(results):
  # The comparison is not one of zeros: segments were predicted, some matched, some missed.
  for group in ('All', 'Things', 'Stuff'):
    assert 0 < results['panoptic_quality'][group]['pq'] < 1, results['panoptic_quality'][group]


def test_two_replicas_evaluate_like_one_device(synthetic_data_dir, tmp_path):
  result = conftest.run_helper('eval_mirrored', synthetic_data_dir, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  one = json.loads((tmp_path / 'eval_one_device.json').read_text())
  two = json.loads((tmp_path / 'eval_mirrored.json').read_text())
  assert one['num_images'] == two['num_images'] == 8
  _assert_segments_were_matched(one)
  want, got = _flat(one), _flat(two)
  assert sorted(want) == sorted(got)
  for key, value in want.items():
    # Sums over the same per-image values in the same order: bit-identical.
    assert got[key] == value, key


def test_two_workers_evaluate_like_one_device(synthetic_data_dir, tmp_path):
  seven = tmp_path / 'seven_images'
  build_synthetic_data.build(str(seven), num_train=2, num_val=7, height=65, width=65, seed=4,
                             examples_per_shard=3, num_workers=1, show_progress=False)
  assert len(list(seven.glob('val-*.tfrecord'))) == 3, sorted(p.name for p in seven.iterdir())
  for code, error in conftest.run_helper_workers('eval_workers', tmp_path, synthetic_data_dir,
                                                 seven, timeout=600):
    assert code == 0, error[-3000:]
  for k, num_images in enumerate((8, 7)):
    one = json.loads((tmp_path / f'eval_{k}_one_device.json').read_text())
    assert one['num_images'] == num_images
    _assert_segments_were_matched(one)
    want = _flat(one)
    for index in range(2):
      got = _flat(json.loads((tmp_path / f'eval_{k}_worker_{index}.json').read_text()))
      assert sorted(got) == sorted(want)
      for key, value in want.items():
        # The same per-image values, summed per worker first: equal to float64 rounding.
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (k, index, key)
  # continuous_eval is refused there, before anything is built: the workers would pick up
  # new checkpoints at different times.
  for index in range(2):
    refusal = json.loads((tmp_path / f'continuous_eval_worker_{index}.json').read_text())
    assert refusal and refusal.startswith('--mode=continuous_eval runs on one machine'), refusal
