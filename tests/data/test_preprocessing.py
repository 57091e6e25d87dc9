"""Preprocessing: DeepLab2's resize-to-range arithmetic, padding, crops, flips, determinism."""

import math

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.input import preprocessing


def reference_size(height, width, min_size, max_size, factor):
  """DeepLab2's rule, written out in plain Python."""
  if min_size:
    scale = max(min_size[0] / height, min_size[1] / width)
    height, width = math.floor(height * scale), math.floor(width * scale)
  if max_size:
    if factor:
      max_size = (max_size[0] - (max_size[0] - 1) % factor,
                  max_size[1] - (max_size[1] - 1) % factor)
    scale = min(max_size[0] / height, max_size[1] / width, 1.0)
    height, width = math.floor(height * scale), math.floor(width * scale)
  if factor:
    height += (factor - (height - 1) % factor) % factor
    width += (factor - (width - 1) % factor) % factor
  return height, width


@pytest.mark.parametrize('shape, min_size, max_size, factor', [
    ((480, 640), (1281, 1281), (1281, 1281), 0),   # COCO recipe: longer side -> 1281
    ((480, 640), (641, 641), (641, 641), 0),
    ((1024, 2048), None, None, 0),
    ((375, 500), (129, 129), (129, 129), 32),
    ((100, 50), (65, 65), None, 0),                # only a minimum: scale up
    ((300, 200), None, (129, 129), 16),            # only a maximum: scale down
])
def test_resize_to_range_size(shape, min_size, max_size, factor):
  size = preprocessing.resize_to_range_size(shape[0], shape[1], min_size, max_size, factor)
  assert tuple(size.numpy()) == reference_size(*shape, min_size, max_size, factor)


def test_coco_example_by_hand():
  # 480x640 -> min 1281 scales by 2.66875 to 1281x1708 -> max 1281 shrinks by 0.75 -> 960x1281.
  size = preprocessing.resize_to_range_size(480, 640, (1281, 1281), (1281, 1281))
  assert tuple(size.numpy()) == (960, 1281)


def test_align_corners_resize_keeps_corners():
  image = tf.reshape(tf.range(12, dtype=tf.float32), [3, 4, 1])
  resized = preprocessing.resize_image(image, tf.constant([5, 7])).numpy()[..., 0]
  assert resized[0, 0] == 0 and resized[-1, -1] == 11 and resized[0, -1] == 3
  assert resized[2, 3] == pytest.approx(5.5)   # the centre of a 3x4 ramp
  label = tf.reshape(tf.range(12), [3, 4, 1])
  np.testing.assert_array_equal(
      preprocessing.resize_label(label, tf.constant([3, 4])).numpy(), label.numpy())


def test_pad_values_and_offsets():
  image = tf.fill([2, 3, 3], 10.0)
  label = tf.fill([2, 3, 1], 7)
  padded_image, padded_label = preprocessing.pad_image_and_label(image, label, 1, 2, 4, 6, 999)
  assert padded_image.shape == (4, 6, 3)
  np.testing.assert_array_equal(padded_label.numpy()[..., 0], [
      [999] * 6, [999, 999, 7, 7, 7, 999], [999, 999, 7, 7, 7, 999], [999] * 6])
  assert padded_image.numpy()[0, 0, 0] == preprocessing.IMAGE_PAD_VALUE
  assert padded_image.numpy()[1, 2, 0] == 10.0


def test_random_ops_are_deterministic_in_seed_and_consistent_between_image_and_label():
  image = tf.reshape(tf.range(20 * 30 * 3, dtype=tf.float32), [20, 30, 3])
  label = tf.cast(image[..., :1], tf.int32)
  seed = tf.constant([4, 2], tf.int64)
  first = preprocessing.random_crop(seed, image, label, 9, 9)
  second = preprocessing.random_crop(seed, image, label, 9, 9)
  np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
  np.testing.assert_array_equal(tf.cast(first[0][..., :1], tf.int32).numpy(), first[1].numpy())
  flips = {bool(preprocessing.random_flip(tf.constant([s, 0]), image, label)[0][0, 0, 0] != 0)
           for s in range(20)}
  assert flips == {True, False}


def test_random_scale_draws_from_the_grid():
  values = {round(float(preprocessing.random_scale(tf.constant([s, 1]), 0.5, 2.0, 0.25)), 4)
            for s in range(200)}
  assert values == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}


def test_eval_preprocessing_pads_bottom_right():
  image = tf.fill([40, 65, 3], 50.0)
  label = tf.fill([40, 65, 1], 3)
  out_image, out_label, resized = preprocessing.preprocess_for_eval(
      image, label, (65, 65), [], [], 0, label_pad_value=0)
  assert tuple(resized.numpy()) == (40, 65)
  assert (out_label.numpy()[:40] == 3).all() and (out_label.numpy()[40:] == 0).all()
  assert (out_image.numpy()[40:] == preprocessing.IMAGE_PAD_VALUE).all()
