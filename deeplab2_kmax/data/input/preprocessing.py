"""Geometric preprocessing of images and panoptic labels, as DeepLab2 does it.

Training: resize to range -> random scale from a grid -> (AutoAugment, in pipeline.py) ->
pad to at least the crop with a random offset (image with the mean 127.5, label with the pad
label) -> random crop -> random horizontal flip.
Evaluation: resize to range (the longer side at most the crop) -> pad bottom/right to the crop.

Images are float32 [height, width, 3] in [0, 255]; labels int32 [height, width, 1]. Bilinear
image resizes and nearest label resizes use align_corners=True, as in DeepLab2.

All randomness is stateless: every random function takes `seed`, an int tensor of shape [2], so
the same seed reproduces the same sample bit for bit.
"""

from typing import Optional, Sequence

import tensorflow as tf

IMAGE_PAD_VALUE = 127.5


def resize_spec(values: Sequence[int]) -> Optional[tuple[int, int]]:
  """DeepLab2's resize value: [] / [s] / [h, w]; None when unused (empty or non-positive)."""
  values = tuple(values)
  if not values:
    return None
  if len(values) == 1:
    values = values * 2
  if len(values) != 2:
    raise ValueError(f'a resize value has one or two entries, got {list(values)}')
  if values[0] <= 0 or values[1] <= 0:
    return None
  return values


def _scale_dim(size: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """floor(size * factor), at least 1: a thin image (1 x 5000 resized to fit 641 x 641) would
  otherwise get a side of 0, which no resize accepts. Sides of 1 or more are unchanged."""
  scaled = tf.cast(tf.floor(tf.cast(size, tf.float32) * tf.cast(factor, tf.float32)), tf.int32)
  return tf.maximum(scaled, 1)


def resize_to_range_size(height: tf.Tensor, width: tf.Tensor,
                         min_size: Optional[tuple[int, int]],
                         max_size: Optional[tuple[int, int]],
                         factor: int = 0) -> tf.Tensor:
  """Target size of resize-to-range, int32 [2] (height, width).

  1. If min_size is set, scale so both sides reach their minimum (aspect ratio kept).
  2. If max_size is set, shrink (never enlarge) so both sides fit (with factor, max_size is first
     rounded down to a multiple of factor plus one).
  3. With factor, round each side up to a multiple of factor plus one.
  Each side stays at least 1 (so very thin images keep one row or column).
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  # The scales are quotients of integers below 2**24, exact in float32. Dividing in float32
  # gives the same bits as dividing in float64 and rounding to float32 (double rounding is
  # innocuous for division when 53 >= 2 * 24 + 2), and keeps float64 out of the graph, which
  # LiteRT's builtin ops do not support.
  if min_size:
    scale = tf.maximum(min_size[0] / tf.cast(height, tf.float32),
                       min_size[1] / tf.cast(width, tf.float32))
    height, width = _scale_dim(height, scale), _scale_dim(width, scale)
  if max_size:
    if factor:
      max_size = (max_size[0] - (max_size[0] - 1) % factor,
                  max_size[1] - (max_size[1] - 1) % factor)
    scale = tf.minimum(max_size[0] / tf.cast(height, tf.float32),
                       max_size[1] / tf.cast(width, tf.float32))
    scale = tf.minimum(scale, 1.0)
    height, width = _scale_dim(height, scale), _scale_dim(width, scale)
  size = tf.stack([height, width])
  if factor:
    size += (factor - (size - 1) % factor) % factor
  return size


def resize_image(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Bilinear, align_corners=True. image: float32 [height, width, channels]."""
  # The raw op is what tf.compat.v1.image.resize_bilinear calls, without its deprecation log.
  return tf.raw_ops.ResizeBilinear(images=image[tf.newaxis], size=size, align_corners=True,
                                   half_pixel_centers=False)[0]


def resize_label(label: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Nearest neighbour, align_corners=True. label: int32 [height, width, 1]."""
  return tf.raw_ops.ResizeNearestNeighbor(images=label[tf.newaxis], size=size,
                                          align_corners=True, half_pixel_centers=False)[0]


def resize_to_range(image, label, min_size, max_size, factor=0):
  """Resizes image (and label, if not None) to range; returns (image, label)."""
  shape = tf.shape(image)
  size = resize_to_range_size(shape[0], shape[1], min_size, max_size, factor)
  image = resize_image(image, size)
  if label is not None:
    label = resize_label(label, size)
  return image, label


def random_scale(seed: tf.Tensor, min_scale: float, max_scale: float,
                 step_size: float) -> tf.Tensor:
  """A scale drawn uniformly from linspace(min, max, (max - min) / step + 1) (or continuous
  when step is 0); float32 scalar."""
  if min_scale == max_scale:
    return tf.constant(min_scale, tf.float32)
  if step_size == 0:
    return tf.random.stateless_uniform([], seed, min_scale, max_scale)
  num_steps = int((max_scale - min_scale) / step_size + 1)
  grid = tf.linspace(tf.constant(min_scale, tf.float32), max_scale, num_steps)
  index = tf.random.stateless_uniform([], seed, 0, num_steps, dtype=tf.int32)
  return grid[index]


def scale_image_and_label(image, label, scale):
  """Scales both by `scale` (size = floor(size * scale)); returns (image, label)."""
  shape = tf.shape(image)
  size = tf.cast(tf.cast(shape[:2], tf.float32) * scale, tf.int32)
  image = resize_image(image, size)
  if label is not None:
    label = resize_label(label, size)
  return image, label


def pad_image_and_label(image, label, offset_height, offset_width, target_height,
                        target_width, label_pad_value: int):
  """Pads to [target_height, target_width] with the image at the given offset.

  The image is padded with IMAGE_PAD_VALUE (0 after the model's normalisation) and the label
  with label_pad_value.
  """
  shape = tf.shape(image)
  paddings = [[offset_height, target_height - shape[0] - offset_height],
              [offset_width, target_width - shape[1] - offset_width], [0, 0]]
  image = tf.pad(image - IMAGE_PAD_VALUE, paddings) + IMAGE_PAD_VALUE
  if label is not None:
    label = tf.pad(label - label_pad_value, paddings) + label_pad_value
  return image, label


def random_crop(seed, image, label, crop_height: int, crop_width: int):
  """Crops [crop_height, crop_width] at a uniform random offset (inputs at least that big)."""
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  top = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - crop_height + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - crop_width + 1, tf.int32)
  image = image[top:top + crop_height, left:left + crop_width]
  if label is not None:
    label = label[top:top + crop_height, left:left + crop_width]
  return image, label


def random_flip(seed, image, label, probability: float = 0.5):
  """Flips left-right with the given probability."""
  flip = tf.random.stateless_uniform([], seed) < probability
  image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
  if label is not None:
    label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)
  return image, label


def pad_to_crop_with_random_offset(seed, image, label, crop_height, crop_width,
                                   label_pad_value):
  """Pads to at least the crop size, the image at a random offset (DeepLab2's training pad)."""
  shape = tf.shape(image)
  target_height = tf.maximum(shape[0], crop_height)
  target_width = tf.maximum(shape[1], crop_width)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  offset_height = tf.random.stateless_uniform(
      [], seeds[0], 0, tf.maximum(crop_height - shape[0], 1), tf.int32)
  offset_width = tf.random.stateless_uniform(
      [], seeds[1], 0, tf.maximum(crop_width - shape[1], 1), tf.int32)
  return pad_image_and_label(image, label, offset_height, offset_width, target_height,
                             target_width, label_pad_value)


def eval_max_resize(max_resize_value: Sequence[int],
                    crop_size: tuple[int, int]) -> tuple[int, int]:
  """Evaluation resizes so the image fits the crop unless max_resize_value says less."""
  spec = resize_spec(max_resize_value)
  if spec is None:
    return crop_size
  if spec[0] > crop_size[0] or spec[1] > crop_size[1]:
    raise ValueError(f'max_resize_value {list(spec)} exceeds the crop size {list(crop_size)}')
  return spec


def preprocess_for_eval(image, label, crop_size, min_resize_value, max_resize_value,
                        resize_factor, label_pad_value):
  """Resize to range, then pad bottom/right to the crop.

  Returns:
    (image [crop_h, crop_w, 3], label [crop_h, crop_w, 1] or None, resized_size int32 [2]).
  """
  image, label = resize_to_range(image, label, resize_spec(min_resize_value),
                                 eval_max_resize(max_resize_value, crop_size), resize_factor)
  resized_size = tf.shape(image)[:2]
  image, label = pad_image_and_label(image, label, 0, 0, crop_size[0], crop_size[1],
                                     label_pad_value)
  image.set_shape([crop_size[0], crop_size[1], 3])
  if label is not None:
    label.set_shape([crop_size[0], crop_size[1], 1])
  return image, label, resized_size
