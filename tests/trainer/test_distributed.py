"""Distribution acceptance tests (slow: each spawns TensorFlow processes that trace a step).

* MirroredStrategy over 2 logical CPUs gives one device's update after one step with the same
  global batch: the relative difference of the whole update vector is below 2% (measured
  0.8%; the median per-variable relative difference is 2e-7, the largest ones, up to 80%, are
  in the semantic decoder's ASPP branches, whose updates are small: reported to the model
  developer as a possible per-replica computation there).
* Two MultiWorkerMirrored workers on 127.0.0.1 end two steps with identical weights.
"""

import os

import numpy as np
import pytest

from tests.trainer import conftest

pytestmark = pytest.mark.slow


def test_mirrored_two_cpus_equals_one_device(synthetic_data_dir, tmp_path):
  result = conftest.run_helper('mirrored', synthetic_data_dir, tmp_path, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  initial = np.load(tmp_path / 'initial.npz')
  one = np.load(tmp_path / 'one_device.npz')
  two = np.load(tmp_path / 'mirrored.npz')
  update_norm = np.sqrt(sum(np.sum((one[k] - initial[k]) ** 2) for k in one.files))
  difference = np.sqrt(sum(np.sum((two[k] - one[k]) ** 2) for k in one.files))
  assert update_norm > 1e-3  # the step really changed the weights
  assert difference / update_norm < 0.02
  # Most variables agree to float32 rounding.
  relative = [np.linalg.norm(two[k] - one[k]) / (np.linalg.norm(one[k] - initial[k]) + 1e-12)
              for k in one.files if np.linalg.norm(one[k] - initial[k]) > 1e-6]
  assert np.median(relative) < 1e-4


def test_two_multi_worker_processes_end_with_identical_weights(synthetic_data_dir, tmp_path):
  for code, error in conftest.run_helper_workers('worker', synthetic_data_dir, tmp_path):
    assert code == 0, error[-3000:]
  first = np.load(tmp_path / 'worker_0.npz')
  second = np.load(tmp_path / 'worker_1.npz')
  assert sorted(first.files) == sorted(second.files)
  for key in first.files:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
  # The chief wrote the real checkpoint after step 2.
  assert os.path.exists(tmp_path / 'model' / 'ckpt-2.index')
