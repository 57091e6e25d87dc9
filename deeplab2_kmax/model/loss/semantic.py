"""Auxiliary semantic loss (reference §4.5): softmax cross-entropy of the semantic head with
per-pixel weights (e.g. DeepLab2's small-instance weight), ignore-label pixels excluded,
averaged over the hardest top-k fraction of pixels with a non-zero loss.
"""

import tensorflow as tf

from deeplab2_kmax.model.loss import downsample
from deeplab2_kmax.model.loss import reduction


def semantic_loss(semantic_logits: tf.Tensor, semantic_gt: tf.Tensor,
                  pixel_weight: tf.Tensor, ignore_label: int,
                  top_k_percent: float = 1.0) -> tf.Tensor:
  """Top-k weighted cross-entropy.

  Args:
    semantic_logits: float [batch, h, w, num_classes].
    semantic_gt: int [batch, H, W] train ids; strided-downsampled to h x w when larger.
    pixel_weight: float [batch, H, W] per-pixel weights (semantic_loss_weight).
    ignore_label: pixels with this label get no loss.
    top_k_percent: fraction of hardest pixels kept.

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  logits = tf.cast(semantic_logits, tf.float32)
  output_size = logits.shape[1:3]
  labels = downsample.strided_downsample(tf.cast(semantic_gt, tf.int32), output_size)
  weights = downsample.strided_downsample(tf.cast(pixel_weight, tf.float32), output_size)
  weights = weights * tf.cast(tf.not_equal(labels, ignore_label), tf.float32)
  # Labels outside [0, num_classes) (an out-of-range ignore label) one-hot to zeros.
  one_hot = tf.one_hot(labels, logits.shape[-1], dtype=tf.float32)
  cross_entropy = tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
  return reduction.mean_over_nonzero(cross_entropy * weights, top_k_percent)
