"""Per-slot class prediction shared by both post-processing modes.

The class head predicts `len(thing_class_ids) + len(stuff_class_ids)` real classes plus void
(last channel). A slot's class is the argmax over the real classes of the softmax over all
channels (void dropped after the softmax), and its confidence that probability; channels below
the number of thing classes are things.
"""

from typing import NamedTuple

import tensorflow as tf


class SlotClasses(NamedTuple):
  """Attributes: class_index int32 [batch, N] class-head channel; confidence float32
  [batch, N]."""
  class_index: tf.Tensor
  confidence: tf.Tensor


def slot_classes(class_logits: tf.Tensor) -> SlotClasses:
  """Class and confidence of every slot from class logits [batch, N, num_classes + 1]."""
  probs = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[..., :-1]
  return SlotClasses(class_index=tf.argmax(probs, axis=-1, output_type=tf.int32),
                     confidence=tf.reduce_max(probs, axis=-1))


def resize_mask_logits(mask_logits: tf.Tensor, crop_size) -> tf.Tensor:
  """Align-corners bilinear resize of [batch, h, w, N] logits to the crop [batch, H, W, N],
  as DeepLab2 does (crops are k * stride + 1 pixels, so the corners coincide)."""
  mask_logits = tf.cast(mask_logits, tf.float32)
  if tuple(mask_logits.shape[1:3]) == tuple(crop_size):
    return mask_logits
  return tf.compat.v1.image.resize(mask_logits, list(crop_size),
                                   method=tf.image.ResizeMethod.BILINEAR, align_corners=True)
