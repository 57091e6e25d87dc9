"""Mask-ID cross-entropy (MaX-DeepLab, reference §4.5): per pixel, softmax over the permuted
slots against the id of the pixel's ground-truth mask, on non-void pixels, averaged over the
pixels with a non-zero loss (optionally the hardest top-k fraction).
"""

import tensorflow as tf

from deeplab2_kmax.model.loss import reduction


def mask_id_cross_entropy(permuted_mask_logits: tf.Tensor, gt_masks: tf.Tensor,
                          pixel_non_void: tf.Tensor, top_k_percent: float = 1.0) -> tf.Tensor:
  """Per-pixel mask-id cross-entropy.

  Args:
    permuted_mask_logits: float [batch, P, S], column i = slot matched to ground-truth row i.
    gt_masks: float32 [batch, P, K] binary ground-truth masks, K <= S. Pixels in no mask
      (crowd) have an all-zero target and so no loss.
    pixel_non_void: float32 [batch, P] pixel weights.
    top_k_percent: fraction of hardest pixels kept.

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  logits = tf.cast(permuted_mask_logits, tf.float32)
  size = logits.shape[-1]
  labels = tf.pad(gt_masks, [[0, 0], [0, 0], [0, size - gt_masks.shape[-1]]])
  cross_entropy = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  return reduction.mean_over_nonzero(cross_entropy * pixel_non_void, top_k_percent)
