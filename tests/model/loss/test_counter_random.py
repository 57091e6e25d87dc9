"""counter_random.uniform: the same bits eager, in graph mode and XLA-compiled; uniform on
(0, 1); seeds give unrelated streams. And the pixel sampling built on it draws the same pixels
whether or not the loss is XLA-compiled (TF's stateless ops did not: counter_random.py)."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from deeplab2_kmax.model.loss import counter_random
from deeplab2_kmax.model.loss import instance_discrimination
from deeplab2_kmax.model.loss import targets as targets_lib


def _lowbias32_numpy(x):
  x = x.astype(np.uint64)
  mask = np.uint64(0xFFFFFFFF)
  x ^= x >> np.uint64(16)
  x = (x * np.uint64(0x7FEB352D)) & mask
  x ^= x >> np.uint64(15)
  x = (x * np.uint64(0x846CA68B)) & mask
  x ^= x >> np.uint64(16)
  return x


def _uniform_numpy(size, seed):
  """An independent numpy evaluation of the documented hash (uint64 arithmetic mod 2^32)."""
  mask = np.uint64(0xFFFFFFFF)
  s0, s1 = (np.uint64(s % 2 ** 32) for s in seed)
  key = _lowbias32_numpy(np.array([s0 ^ np.uint64(0x9E3779B9)]))
  key = _lowbias32_numpy(key ^ s1)
  counter = np.arange(size, dtype=np.uint64)
  bits = _lowbias32_numpy((_lowbias32_numpy(counter ^ key) + key) & mask)
  return ((bits >> np.uint64(9)).astype(np.float64) + 0.5) / 2.0 ** 23


@pytest.mark.parametrize('seed', [(0, 0), (3, 7), (-1, 2 ** 31 - 1)])
def test_same_bits_eager_graph_and_xla_and_equal_to_numpy(seed):
  shape = [3, 257]
  seed_tensor = tf.constant(seed, tf.int32)
  eager = counter_random.uniform(shape, seed_tensor).numpy()
  graph = tf.function(lambda s: counter_random.uniform(shape, s))(seed_tensor).numpy()
  xla = tf.function(lambda s: counter_random.uniform(tf.shape(tf.zeros(shape)), s),
                    jit_compile=True)(seed_tensor).numpy()
  assert eager.dtype == np.float32 and eager.shape == tuple(shape)
  np.testing.assert_array_equal(graph, eager)
  np.testing.assert_array_equal(xla, eager)
  np.testing.assert_array_equal(eager.ravel(), _uniform_numpy(np.prod(shape), seed))
  assert eager.min() > 0.0 and eager.max() < 1.0


def test_uniform_distribution_and_unrelated_seeds():
  first = counter_random.uniform([20000], tf.constant([5, 0])).numpy()
  # Kolmogorov-Smirnov against U(0, 1): p ~ U(0, 1) under the null, so 1e-3 fails by chance
  # once in a thousand seeds (this seed is fixed).
  assert stats.kstest(first, 'uniform').pvalue > 1e-3
  # Consecutive elements are not correlated.
  assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < 0.03
  # Neighbouring seeds (either component) give unrelated streams.
  for other in ([5, 1], [6, 0]):
    second = counter_random.uniform([20000], tf.constant(other)).numpy()
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.03, other
    assert np.mean(first == second) < 1e-3


def test_pixel_sampling_is_the_same_under_xla():
  rng = np.random.default_rng(0)
  semantic = rng.integers(0, 3, size=(2, 9, 9))
  # Class 1 is the thing class: its pixels belong to thing ids 0..2, all others to none (-1).
  thing_id = tf.constant(np.where(semantic == 1, rng.integers(0, 3, size=(2, 9, 9)), -1),
                         tf.int32)
  semantic = tf.constant(semantic, tf.int32)
  thing_class = tf.constant([[1, 1, 1], [1, 1, 1]], tf.int32)

  def sample(seed):
    targets = targets_lib.prepare_mask_targets(
        semantic, thing_id, thing_class, (9, 9), thing_class_ids=(1,), stuff_class_ids=(0, 2),
        ignore_label=255)
    return instance_discrimination.sample_pixels(targets, 40, 0.6, seed)

  seed = tf.constant([3, 1], tf.int32)
  graph = tf.function(sample)(seed).numpy()
  xla = tf.function(sample, jit_compile=True)(seed).numpy()
  np.testing.assert_array_equal(xla, graph)
  assert all(len(set(row)) == 40 for row in graph)
  other = tf.function(sample)(tf.constant([3, 2], tf.int32)).numpy()
  assert not np.array_equal(other, graph)
