"""Undoing the evaluation preprocessing: crop away the bottom/right padding, then resize to
the raw image size (reference §5.3, DeepLab2's utils.undo_preprocessing).

The evaluation pipeline resizes each image to `resized_size` and pads it to the crop; the
predictions at the crop are cropped back to `resized_size` and resized, align-corners, to
`size_raw` (nearest for label maps, bilinear for score maps). Images of a batch can have
different raw sizes, so the results are [batch, max raw height, max raw width], padded with a
fill value, like the pipeline's padded raw labels. Both resizes are gathers on index grids
computed per image, so the whole batch is one vectorised op.
"""

import tensorflow as tf


def _source_coordinates(out_size: tf.Tensor, in_size: tf.Tensor, length: tf.Tensor):
  """Align-corners source coordinate of each output index; [batch, length] float32."""
  out_size = tf.cast(out_size, tf.float32)[:, None]
  in_size = tf.cast(in_size, tf.float32)[:, None]
  scale = tf.math.divide_no_nan(in_size - 1.0, out_size - 1.0)
  return tf.cast(tf.range(length), tf.float32)[None, :] * scale


def _valid(size: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
  return tf.range(length)[None, :] < size[:, None]


def _inside(raw_size: tf.Tensor, out_h: tf.Tensor, out_w: tf.Tensor) -> tf.Tensor:
  """bool [batch, out_h, out_w]: inside each image's raw size."""
  # expand_dims (here and in resize_bilinear), not [:, :, None]: LiteRT's builtins have no
  # strided slice that adds an axis to a tensor of unknown shape.
  return tf.logical_and(tf.expand_dims(_valid(raw_size[:, 0], out_h), 2),
                        tf.expand_dims(_valid(raw_size[:, 1], out_w), 1))


def resize_nearest(maps: tf.Tensor, resized_size: tf.Tensor, raw_size: tf.Tensor,
                   fill_value) -> tf.Tensor:
  """Crops [batch, H, W] maps to resized_size and resizes them (nearest) to raw_size.

  Args:
    maps: [batch, H, W] any dtype.
    resized_size: int [batch, 2], the valid (unpadded) region of each crop.
    raw_size: int [batch, 2], the output size of each image.
    fill_value: value outside each image's raw size.

  Returns:
    [batch, max raw height, max raw width].
  """
  resized_size = tf.cast(resized_size, tf.int32)
  raw_size = tf.cast(raw_size, tf.int32)
  out_h, out_w = tf.reduce_max(raw_size[:, 0]), tf.reduce_max(raw_size[:, 1])
  # Halves round up (as TF's align-corners nearest resize does), not to even.
  rows = tf.cast(tf.floor(_source_coordinates(raw_size[:, 0], resized_size[:, 0], out_h) + 0.5),
                 tf.int32)
  cols = tf.cast(tf.floor(_source_coordinates(raw_size[:, 1], resized_size[:, 1], out_w) + 0.5),
                 tf.int32)
  rows = tf.clip_by_value(rows, 0, tf.shape(maps)[1] - 1)
  cols = tf.clip_by_value(cols, 0, tf.shape(maps)[2] - 1)
  result = tf.gather(tf.gather(maps, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
  inside = _inside(raw_size, out_h, out_w)
  return tf.where(inside, result, tf.cast(fill_value, maps.dtype))


def resize_bilinear(maps: tf.Tensor, resized_size: tf.Tensor, raw_size: tf.Tensor,
                    fill_value: float = 0.0) -> tf.Tensor:
  """Like resize_nearest for float [batch, H, W] maps, with bilinear interpolation."""
  resized_size = tf.cast(resized_size, tf.int32)
  raw_size = tf.cast(raw_size, tf.int32)
  maps = tf.cast(maps, tf.float32)
  out_h, out_w = tf.reduce_max(raw_size[:, 0]), tf.reduce_max(raw_size[:, 1])

  def taps(out_size, in_size, length, limit):
    position = _source_coordinates(out_size, in_size, length)
    low = tf.clip_by_value(tf.cast(tf.floor(position), tf.int32), 0, limit - 1)
    high = tf.minimum(low + 1, tf.maximum(in_size[:, None] - 1, 0))
    high = tf.clip_by_value(high, 0, limit - 1)
    return low, high, position - tf.cast(low, tf.float32)

  row_low, row_high, row_frac = taps(raw_size[:, 0], resized_size[:, 0], out_h,
                                     tf.shape(maps)[1])
  col_low, col_high, col_frac = taps(raw_size[:, 1], resized_size[:, 1], out_w,
                                     tf.shape(maps)[2])

  def columns(rows_of):
    top = tf.gather(rows_of, col_low, axis=2, batch_dims=1)
    bottom = tf.gather(rows_of, col_high, axis=2, batch_dims=1)
    return top + (bottom - top) * tf.expand_dims(col_frac, 1)

  upper = columns(tf.gather(maps, row_low, axis=1, batch_dims=1))
  lower = columns(tf.gather(maps, row_high, axis=1, batch_dims=1))
  result = upper + (lower - upper) * tf.expand_dims(row_frac, 2)
  inside = _inside(raw_size, out_h, out_w)
  return tf.where(inside, result, fill_value)
