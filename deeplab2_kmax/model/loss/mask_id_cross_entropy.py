"""Mask-ID cross-entropy (MaX-DeepLab, reference §4.5): per pixel, softmax over the slots
against the slot matched to the pixel's ground-truth mask, on non-void pixels, averaged over
the pixels with a non-zero loss (optionally the hardest top-k fraction).
"""

from typing import Optional

import tensorflow as tf

from deeplab2_kmax.model.loss import matching as matching_lib
from deeplab2_kmax.model.loss import reduction
from deeplab2_kmax.model.loss import slot_softmax


def mask_id_cross_entropy(mask_logits: tf.Tensor, slots: matching_lib.SlotTargets,
                          pixel_non_void: tf.Tensor, top_k_percent: float = 1.0,
                          log_normaliser: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Per-pixel mask-id cross-entropy.

  Args:
    mask_logits: float [batch, P, N] mask logits (final or auxiliary output), slot order.
    slots: the matching in slot order (matching_lib.slot_targets). Pixels in no mask (crowd)
      have no loss; pixels whose mask got a padding slot (fewer slots than masks) have the
      huge loss of a -99999 logit, as in DeepLab2.
    pixel_non_void: float32 [batch, P] pixel weights.
    top_k_percent: fraction of hardest pixels kept.
    log_normaliser: optional float32 [batch, P], `slot_softmax.log_sum_exp(mask_logits)` when
      the caller has it (the dice term needs it too).

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  mask_logits = tf.cast(mask_logits, tf.float32)
  if log_normaliser is None:
    log_normaliser = slot_softmax.log_sum_exp(mask_logits)
  cross_entropy = (log_normaliser - matching_lib.logit_of_pixel_slot(mask_logits, slots)) * slots.pixel_in_mask
  return reduction.mean_over_nonzero(cross_entropy * pixel_non_void, top_k_percent)
