"""Evaluation on several replicas gives the results of one device: the real eval pipeline and
Evaluator on one CPU and on MirroredStrategy over 2 logical CPUs (a subprocess: the logical
devices must be set up before TensorFlow starts) give identical PQ/SQ/RQ (per class too), mIoU
and mask AP over the same 8 images (per-replica batches of 2 instead of batches of 4). The
evaluator feeds every local replica's per-image outputs into one set of accumulators
(evaluator.eval_reduce). The predictions are made from the ground truth, partly right
(distributed_helper._PartlyRightPredictions), so that PQ is strictly between 0 and 1 and an
image counted twice or missed would change it; no model is built (about 15 s).
"""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

_ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'PYTHONPATH': str(REPO_ROOT)}


def test_two_replicas_evaluate_like_one_device(synthetic_data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tests.trainer.distributed_helper', 'eval_mirrored',
       str(synthetic_data_dir), str(tmp_path)], cwd=REPO_ROOT, env=_ENV, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  one = json.loads((tmp_path / 'eval_one_device.json').read_text())
  two = json.loads((tmp_path / 'eval_mirrored.json').read_text())
  assert one['num_images'] == two['num_images'] == 8
  # Segments were predicted and matched: the comparison is not one of zeros.
  for group in ('All', 'Things', 'Stuff'):
    assert 0 < one['panoptic_quality'][group]['pq'] < 1, one['panoptic_quality'][group]

  def flat(tree, prefix=''):
    if isinstance(tree, dict):
      return {k: v for key, value in tree.items() for k, v in flat(value, f'{prefix}/{key}').items()}
    return {prefix: tree}

  want, got = flat(one), flat(two)
  assert sorted(want) == sorted(got)
  for key, value in want.items():
    # Sums over the same per-image values in the same order: bit-identical.
    assert got[key] == value, key
