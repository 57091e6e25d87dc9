"""Batch-norm moving statistics stay equal on every replica (normalization.BatchNorm): after one
training call on MirroredStrategy over 2 logical CPUs (a subprocess: distributed_helper
bn_mirrored), each replica with its own batch (means about 0 and 3), both copies hold
  unsynchronised: momentum * initial + (1 - momentum) * (mean over replicas of each replica's
                  batch moments)   (updates all-reduced by the variables' 'mean' aggregation)
  synchronised:   the same with the moments of both batches together,
checked against numpy for a fused per-channel BN (+ ReLU) and a BN over two axes. Before the
'mean' aggregation each unsynchronised copy moved towards its own replica's moments only.
"""

import numpy as np

from tests.trainer import conftest

MOMENTUM = 0.5
REDUCE_AXES = {'channels': (0, 1, 2), 'two_axes': (0, 2)}


def test_moving_statistics_are_equal_on_every_replica(tmp_path):
  result = conftest.run_helper('bn_mirrored', tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = np.load(tmp_path / 'bn_mirrored.npz')
  for name, axes in REDUCE_AXES.items():
    batches = [saved[f'batch/{name}/{r}'].astype(np.float64) for r in range(2)]
    local_mean = np.mean([b.mean(axis=axes) for b in batches], axis=0)
    local_variance = np.mean([b.var(axis=axes) for b in batches], axis=0)
    both = np.concatenate(batches)
    want = {'local': (local_mean, local_variance),
            'synchronized': (both.mean(axis=axes), both.var(axis=axes))}
    # The replicas' moments differ: a copy moved by its own replica only would fail below.
    assert np.abs(batches[0].mean(axis=axes) - batches[1].mean(axis=axes)).min() > 1
    for kind, (mean, variance) in want.items():
      for statistic, batch_value, initial in (('moving_mean', mean, 0.0),
                                              ('moving_variance', variance, 1.0)):
        expected = MOMENTUM * initial + (1 - MOMENTUM) * batch_value
        for r in range(2):
          copy = saved[f'{name}_{kind}/{statistic}/{r}']
          np.testing.assert_allclose(copy.reshape(expected.shape), expected, rtol=1e-5,
                                     atol=1e-5, err_msg=f'{name} {kind} {statistic} replica {r}')
