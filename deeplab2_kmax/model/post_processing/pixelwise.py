"""Pixelwise post-processing (MaX-DeepLab, reference §5.1).

Slots whose class confidence reaches `class_threshold` are kept. At the crop resolution each
pixel takes the kept slot with the largest mask logit; the pixel is confident iff (a) that slot
is also its best slot among all slots and (b) its softmax probability among the kept slots
exceeds `pixel_threshold`. Unconfident pixels get mask id -1 (void).
"""

from typing import NamedTuple

import tensorflow as tf

from deeplab2_kmax.model.post_processing import slot_classes as slot_classes_lib

_MASKED_LOGIT = -99999.0


class SlotMaps(NamedTuple):
  """Attributes (all [batch, H, W]): mask_id int32 slot per pixel or -1; instance_score
  float32; semantic_score float32 (class confidence of the pixel's slot, 0 where void)."""
  mask_id: tf.Tensor
  instance_score: tf.Tensor
  semantic_score: tf.Tensor


def pixelwise_slot_maps(mask_logits: tf.Tensor, classes: slot_classes_lib.SlotClasses,
                        crop_size, class_threshold: float = 0.7,
                        pixel_threshold: float = 0.4) -> SlotMaps:
  """Assigns every pixel of the crop to a kept slot or to void.

  Args:
    mask_logits: float [batch, h, w, N] mask logits.
    classes: per-slot class and confidence.
    crop_size: (H, W), the crop the logits are resized to (align corners).
    class_threshold: minimum class confidence of a kept slot.
    pixel_threshold: a pixel is confident if its probability exceeds this.

  Returns:
    SlotMaps at the crop size.
  """
  logits = slot_classes_lib.resize_mask_logits(mask_logits, crop_size)
  kept = (classes.confidence >= class_threshold)[:, None, None, :]
  kept_logits = tf.where(kept, logits, _MASKED_LOGIT)
  probs = tf.nn.softmax(kept_logits, axis=-1)
  instance_score = tf.reduce_max(probs, axis=-1)
  best_is_kept = tf.equal(tf.reduce_max(logits, axis=-1), tf.reduce_max(kept_logits, axis=-1))
  confident = tf.logical_and(tf.logical_and(instance_score > pixel_threshold, best_is_kept),
                             tf.reduce_any(kept, axis=-1))
  slot = tf.argmax(kept_logits, axis=-1, output_type=tf.int32)
  mask_id = tf.where(confident, slot, -1)
  semantic_score = tf.where(confident, tf.gather(classes.confidence, slot, batch_dims=1), 0.0)
  return SlotMaps(mask_id=mask_id, instance_score=instance_score, semantic_score=semantic_score)
