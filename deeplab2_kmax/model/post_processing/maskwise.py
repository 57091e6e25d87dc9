"""Maskwise post-processing (kMaX-DeepLab, reference §5.2).

Each slot's binary mask is where its softmax probability (over slots) exceeds
`pixel_threshold`. Slots are ranked by class_confidence^reorder_class_weight *
mask_score^reorder_mask_weight (mask score: mean probability inside the binary mask at the
logits resolution), highest first, ties in slot order. Following that order, each slot is pasted
onto the still-free pixels of its binary mask at the crop resolution, unless its class
confidence is below the thing or stuff threshold (by its predicted class), or the free part is
not larger than `overlap_threshold` times its whole binary mask.
"""

import tensorflow as tf

from deeplab2_kmax.model.post_processing import pixelwise
from deeplab2_kmax.model.post_processing import slot_classes as slot_classes_lib


def paste_order(mask_logits: tf.Tensor, classes: slot_classes_lib.SlotClasses,
                pixel_threshold: float = 0.4, reorder_class_weight: float = 1.0,
                reorder_mask_weight: float = 0.0) -> tf.Tensor:
  """Slots in paste order, int32 [batch, N], from logits [batch, h, w, N]."""
  probs = tf.nn.softmax(tf.cast(mask_logits, tf.float32), axis=-1)
  binary = tf.cast(probs > pixel_threshold, tf.float32)
  mask_score = tf.math.divide_no_nan(tf.reduce_sum(probs * binary, axis=[1, 2]),
                                     tf.reduce_sum(binary, axis=[1, 2]))
  score = (tf.pow(classes.confidence, reorder_class_weight)
           * tf.pow(mask_score, reorder_mask_weight))
  return tf.argsort(score, axis=-1, direction='DESCENDING', stable=True)


def maskwise_slot_maps(mask_logits: tf.Tensor, classes: slot_classes_lib.SlotClasses,
                       crop_size, num_thing_classes: int, thing_threshold: float = 0.7,
                       stuff_threshold: float = 0.7, overlap_threshold: float = 0.5,
                       pixel_threshold: float = 0.4, reorder_class_weight: float = 1.0,
                       reorder_mask_weight: float = 0.0) -> pixelwise.SlotMaps:
  """Pastes slot masks in rank order; batched, one tf.while_loop step per slot.

  Args:
    mask_logits: float [batch, h, w, N] mask logits.
    classes: per-slot class and confidence.
    crop_size: (H, W), the crop the logits are resized to (align corners).
    num_thing_classes: class-head channels below this are things.
    thing_threshold: minimum class confidence of a thing slot.
    stuff_threshold: minimum class confidence of a stuff slot.
    overlap_threshold: a slot is dropped if at most this fraction of its mask is still free.
    pixel_threshold: binary-mask threshold on the slot probability.
    reorder_class_weight: exponent of the class confidence in the ranking.
    reorder_mask_weight: exponent of the mask score in the ranking.

  Returns:
    SlotMaps at the crop size; instance_score is the largest slot probability of each pixel.
  """
  order = paste_order(mask_logits, classes, pixel_threshold, reorder_class_weight,
                      reorder_mask_weight)
  logits = slot_classes_lib.resize_mask_logits(mask_logits, crop_size)
  probs = tf.nn.softmax(logits, axis=-1)
  binary = probs > pixel_threshold  # [batch, H, W, N]
  # Slots first, once: each step below then picks one contiguous [H, W] mask per image instead
  # of a strided one (2.9 s of a 641x641 kMaX-R50 call in ONNX Runtime went to those picks).
  binary_by_slot = tf.transpose(binary, [0, 3, 1, 2])  # [batch, N, H, W]
  threshold = tf.where(classes.class_index < num_thing_classes, thing_threshold,
                       stuff_threshold)
  confident_slot = classes.confidence >= threshold  # [batch, N]
  num_slots = logits.shape[-1]
  canvas = -tf.ones(tf.shape(logits)[:3], tf.int32)
  semantic_score = tf.zeros(tf.shape(logits)[:3], tf.float32)

  def body(rank, canvas, semantic_score):
    slot = order[:, rank]  # [batch]
    mask = tf.gather(binary_by_slot, slot, axis=1, batch_dims=1)  # [batch, H, W]
    free_part = tf.logical_and(mask, canvas < 0)
    whole = tf.reduce_sum(tf.cast(mask, tf.float32), axis=[1, 2])
    free = tf.reduce_sum(tf.cast(free_part, tf.float32), axis=[1, 2])
    keep = tf.logical_and(tf.gather(confident_slot, slot, batch_dims=1),
                          free > whole * overlap_threshold)
    paste = tf.logical_and(free_part, keep[:, None, None])
    canvas = tf.where(paste, slot[:, None, None], canvas)
    confidence = tf.gather(classes.confidence, slot, batch_dims=1)
    semantic_score = tf.where(paste, confidence[:, None, None], semantic_score)
    return rank + 1, canvas, semantic_score

  _, canvas, semantic_score = tf.while_loop(
      lambda rank, *unused: rank < num_slots, body,
      (tf.constant(0), canvas, semantic_score))
  return pixelwise.SlotMaps(mask_id=canvas, instance_score=tf.reduce_max(probs, axis=-1),
                            semantic_score=semantic_score)
