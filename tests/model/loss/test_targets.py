"""Ground-truth preparation on hand-made label maps."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.model.loss import downsample
from deeplab2_kmax.model.loss import targets

# Label space: 0 = ignore, things 1 and 2, stuff 3 and 4.
THINGS = (1, 2)
STUFF = (3, 4)


def test_strided_downsample_keeps_every_second_pixel():
  labels = tf.reshape(tf.range(25), [1, 5, 5])
  np.testing.assert_array_equal(downsample.strided_downsample(labels, [3, 3])[0].numpy(),
                                [[0, 2, 4], [10, 12, 14], [20, 22, 24]])
  np.testing.assert_array_equal(downsample.strided_downsample(labels, [2, 2])[0].numpy(),
                                [[0, 4], [20, 24]])


def test_strided_downsample_rejects_non_integer_stride():
  with pytest.raises(ValueError, match='width 6 to 3'):
    downsample.strided_downsample(tf.zeros([1, 5, 6]), [5, 3])


def _batch():
  # 5x5 labels; the output keeps rows/cols 0, 2, 4.
  semantic = np.array([
      [3, 3, 3, 3, 4],
      [3, 1, 1, 3, 4],
      [1, 1, 1, 2, 2],
      [0, 0, 2, 2, 2],
      [0, 0, 2, 1, 2],
  ])
  thing_id = np.array([
      [-1, -1, -1, -1, -1],
      [-1, 0, 0, -1, -1],
      [0, 0, 0, 1, 1],
      [-1, -1, 1, 1, 1],
      [-1, -1, 1, 2, 1],   # Thing id 2 sits on an odd column: lost by the downsampling.
  ])
  thing_class = np.array([1, 2, 1, -1])  # max_thing_id = 4, id 3 is padding.
  return (tf.constant(semantic[None]), tf.constant(thing_id[None]), tf.constant(thing_class[None]))


def test_masks_classes_and_void_handling():
  semantic, thing_id, thing_class = _batch()
  result = targets.prepare_mask_targets(semantic, thing_id, thing_class, (3, 3),
                                        thing_class_ids=THINGS, stuff_class_ids=STUFF,
                                        ignore_label=0)
  # Output grid (rows 0,2,4 x cols 0,2,4): semantic [[3,3,4],[1,1,2],[0,2,2]],
  # thing ids [[-1,-1,-1],[0,0,1],[-1,1,1]].
  # K = 4 things + 2 stuff; mask order: thing 0..3, stuff 3, stuff 4.
  one_hot = result.pixel_mask_one_hot.numpy()[0]
  assert one_hot.shape == (9, 6)
  mask_of_pixel = np.where(one_hot.sum(-1) > 0, one_hot.argmax(-1), -1)
  np.testing.assert_array_equal(mask_of_pixel, [4, 4, 5, 0, 0, 1, -1, 1, 1])
  np.testing.assert_array_equal(result.mask_area.numpy()[0], [2, 3, 0, 0, 2, 1])
  # Thing 2 has no pixel at the output resolution and thing 3 is padding: both void.
  np.testing.assert_array_equal(result.mask_class.numpy()[0], [1, 2, -1, -1, 3, 4])
  # Channels: thing 1 -> 0, thing 2 -> 1, stuff 3 -> 2, stuff 4 -> 3.
  np.testing.assert_array_equal(result.mask_class_index.numpy()[0], [0, 1, -1, -1, 2, 3])
  np.testing.assert_array_equal(result.mask_non_void.numpy()[0], [1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(result.pixel_non_void.numpy()[0], [1, 1, 1, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(result.pixel_thing.numpy()[0], [0, 0, 0, 1, 1, 1, 0, 1, 1])
  # 9 pixels / area of the pixel's mask; maskless pixels use area 1.
  np.testing.assert_allclose(result.inverse_pixel_mask_area.numpy()[0],
                             [9 / 2, 9 / 2, 9, 9 / 2, 9 / 2, 3, 9, 3, 3])


def test_absent_stuff_class_is_void_and_crowd_pixels_have_no_mask():
  semantic = tf.constant([[[3, 1], [1, 1]]])
  thing_id = tf.constant([[[-1, -1], [-1, -1]]])  # Class-1 pixels without an id: crowd.
  thing_class = tf.constant([[-1, -1]])
  result = targets.prepare_mask_targets(semantic, thing_id, thing_class, (2, 2),
                                        thing_class_ids=THINGS, stuff_class_ids=STUFF,
                                        ignore_label=0)
  np.testing.assert_array_equal(result.mask_class.numpy()[0], [-1, -1, 3, -1])
  np.testing.assert_array_equal(result.pixel_non_void.numpy()[0], [1, 1, 1, 1])
  np.testing.assert_array_equal(result.pixel_mask_one_hot.numpy()[0].sum(-1), [1, 0, 0, 0])


def test_ignore_label_inside_class_range_cityscapes_style():
  # Ignore label 255 outside the class range; things (1,), stuff (0, 2).
  semantic = tf.constant([[[0, 255], [2, 1]]])
  thing_id = tf.constant([[[-1, -1], [-1, 0]]])
  result = targets.prepare_mask_targets(semantic, thing_id, tf.constant([[1]]), (2, 2),
                                        thing_class_ids=(1,), stuff_class_ids=(0, 2),
                                        ignore_label=255)
  np.testing.assert_array_equal(result.mask_class_index.numpy()[0], [0, 1, 2])
  np.testing.assert_array_equal(result.pixel_non_void.numpy()[0], [1, 0, 1, 1])


def test_rejects_overlapping_class_lists():
  semantic, thing_id, thing_class = _batch()
  with pytest.raises(ValueError, match='disjoint'):
    targets.prepare_mask_targets(semantic, thing_id, thing_class, (3, 3),
                                 thing_class_ids=(1, 2), stuff_class_ids=(2, 3), ignore_label=0)
