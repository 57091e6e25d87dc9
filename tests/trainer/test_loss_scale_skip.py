"""A mixed_float16 step whose scaled gradients overflow, on MirroredStrategy over 2 logical CPUs
(a subprocess: the logical devices must be set up before TensorFlow starts): the step leaves
the weights, every optimizer variable (AdamW's moments and its iteration count) and every
replica's copy bit-identical, halves the loss scale and still advances the global step; the
normal step after it moves weights and moments again.

Before the fix, the several-replica path applied zeroed gradients instead of skipping, which
decayed Adam's moments, applied AdamW's weight decay and counted an optimizer iteration.

Slow: the subprocess traces a two-replica float16 step (about 90 s on 2 idle cores)."""

import numpy as np
import pytest

from tests.trainer import conftest
from tests.trainer import distributed_helper

pytestmark = pytest.mark.slow


def _by_kind(state, kind):
  return {k: state[k] for k in state.files if k.startswith(kind + '/')}


def test_overflowing_float16_step_on_two_replicas_leaves_the_training_state_unchanged(
    synthetic_data_dir, tmp_path):
  result = conftest.run_helper('fp16_skip', synthetic_data_dir, tmp_path, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  first, skipped, last = (np.load(tmp_path / f'fp16_skip_{i}.npz') for i in range(3))
  assert first['loss_scale'] == distributed_helper.SAFE_SCALE
  assert skipped['loss_scale'] == distributed_helper.OVERFLOWING_SCALE / 2
  # The skipped step consumed a batch: the global step (and so the learning rate) advances.
  assert [int(s['global_step']) for s in (first, skipped, last)] == [1, 2, 3]

  optimizer = _by_kind(first, 'main_optimizer')
  weights = _by_kind(first, 'weight')
  # Both replicas' copies of each variable, and AdamW's iterations, moments and weights.
  assert len(optimizer) > 4 and len(weights) > 4
  assert all(k.endswith(('replica_0', 'replica_1')) for k in [*optimizer, *weights])
  for key in [*optimizer, *weights]:
    np.testing.assert_array_equal(skipped[key], first[key], err_msg=key)
  iterations = [k for k in optimizer if k.split('/')[-2] in ('iteration', 'iterations')]
  assert iterations, sorted(optimizer)[:5]
  for key in iterations:
    assert int(first[key]) == 1 and int(last[key]) == 2, key

  # The next normal step moves weights and moments (a real update, not a frozen trainer).
  moved_moments = [k for k in optimizer if k not in iterations and
                   not np.array_equal(last[k], skipped[k])]
  moved_weights = [k for k in weights if not np.array_equal(last[k], skipped[k])]
  assert len(moved_moments) > len(optimizer) // 3
  assert len(moved_weights) > len(weights) // 3
  for key in [*optimizer, *weights]:
    np.testing.assert_array_equal(last[key.replace('replica_0', 'replica_1')],
                                  last[key.replace('replica_1', 'replica_0')], err_msg=key)
