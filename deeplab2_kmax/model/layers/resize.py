"""Bilinear resizing with align_corners semantics, as DeepLab2 uses everywhere.

With crops of size k * 32 + 1, corner-aligned resizing maps a stride-s grid exactly onto a
stride-s/2 grid; TF2's `tf.image.resize` (half-pixel centers) would shift it.
"""

import tensorflow as tf


def resize_align_corners(inputs, size):
  """Resizes [batch, height, width, channels] to `size` = (height, width), corners aligned.

  Computes in float32 (the TF kernel does not take bfloat16 everywhere) and returns the input
  dtype.
  """
  height, width = int(size[0]), int(size[1])
  if inputs.shape[1] == height and inputs.shape[2] == width:
    return inputs
  dtype = inputs.dtype
  # The op tf.compat.v1.image.resize_bilinear runs, without its deprecation warning (which
  # every command line printed at the model's build).
  x = tf.raw_ops.ResizeBilinear(images=tf.cast(inputs, tf.float32),
                                size=tf.constant([height, width], tf.int32), align_corners=True,
                                half_pixel_centers=False)
  return tf.cast(x, dtype)
