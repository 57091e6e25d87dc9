"""Per-example reduction shared by the loss terms: mean over the non-zero (top-k) entries.

DeepLab2 normalises each loss by the number of entries whose weighted loss is non-zero, so
entries with weight 0 (void pixels, ignored slots) neither add to the sum nor dilute the mean.
"""

import tensorflow as tf


def mean_over_nonzero(losses: tf.Tensor, top_k_percent: float = 1.0) -> tf.Tensor:
  """Mean of the non-zero entries of each example, optionally over the hardest ones only.

  Args:
    losses: float [batch, ...] weighted per-entry losses (>= 0).
    top_k_percent: fraction in (0, 1] of the largest entries that are kept per example.

  Returns:
    float [batch]; 0 for an example without a non-zero entry.
  """
  if not 0.0 < top_k_percent <= 1.0:
    raise ValueError(f'top_k_percent must lie in (0, 1], got {top_k_percent}.')
  losses = tf.reshape(losses, [tf.shape(losses)[0], -1])
  if top_k_percent < 1.0:
    num = losses.shape[1]
    if num is not None:
      # A static k keeps the op compilable with XLA.
      k = min(max(int(round(top_k_percent * num)), 1), num)
    else:
      num = tf.shape(losses)[1]
      k = tf.maximum(tf.cast(tf.round(top_k_percent * tf.cast(num, tf.float32)), tf.int32), 1)
      k = tf.minimum(k, num)
    losses = tf.math.top_k(losses, k=k, sorted=False).values
  count = tf.reduce_sum(tf.cast(tf.not_equal(losses, 0.0), losses.dtype), axis=1)
  return tf.math.divide_no_nan(tf.reduce_sum(losses, axis=1), count)
