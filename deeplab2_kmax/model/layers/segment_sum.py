"""Per-image segment sums: the O(P) form of a product with one-hot [batch, P, K] masks."""

import tensorflow as tf


def batched_segment_sum(values, segment_ids, num_segments):
  """Sums values over the pixels of each segment, separately per image.

  Equals einsum('bpk,bp...->bk...', one_hot(segment_ids, num_segments), values) in O(P) work
  per value instead of O(P K).

  Args:
    values: [batch, P, ...] tensor.
    segment_ids: [batch, P] int32 in [0, num_segments); ids outside are dropped.
    num_segments: Python int K.

  Returns:
    [batch, K, ...] sums in values' dtype.
  """
  batch = tf.shape(values)[0]
  trailing = values.shape[2:].as_list()
  # Ids outside [0, K) would land in a neighbouring image's segments: send them to -1, which
  # unsorted_segment_sum drops.
  valid = tf.logical_and(segment_ids >= 0, segment_ids < num_segments)
  ids = tf.where(valid, segment_ids + num_segments * tf.range(batch)[:, None], -1)
  sums = tf.math.unsorted_segment_sum(tf.reshape(values, [-1] + trailing),
                                      tf.reshape(ids, [-1]), batch * num_segments)
  return tf.reshape(sums, [batch, num_segments] + trailing)
