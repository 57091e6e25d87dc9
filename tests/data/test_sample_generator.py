"""Panoptic targets checked against an independent numpy derivation from the panoptic map."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.input import sample_generator
from deeplab2_kmax.data.synthetic import scenes as synthetic_scenes

DIVISOR = 256
THINGS = (1, 2, 3)


def numpy_targets(panoptic, max_thing_id, threshold=0, weight=1.0):
  """Reference: thing ids numbered by first appearance in row-major order."""
  semantic = panoptic // DIVISOR
  instance = panoptic % DIVISOR
  mask = -np.ones_like(panoptic)
  classes = -np.ones(max_thing_id, np.int64)
  weights = np.ones(panoptic.shape, np.float32)
  order = []
  for value in panoptic.reshape(-1):
    if value not in order:
      order.append(value)
  count = 0
  for value in order:
    if value // DIVISOR in THINGS and value % DIVISOR > 0 and value // DIVISOR != 0:
      if count < max_thing_id:
        mask[panoptic == value] = count
        classes[count] = value // DIVISOR
      if (panoptic == value).sum() < threshold:
        weights[panoptic == value] = weight
      count += 1
  crowd = np.isin(semantic, THINGS) & (instance == 0)
  return mask, classes, crowd, weights, count


@pytest.mark.parametrize('index', range(4))
def test_targets_match_reference_on_synthetic_scenes(index):
  panoptic = synthetic_scenes.generate_scene([1, 0, index], 33, 33).panoptic(DIVISOR)
  # Turn one thing into a crowd region (instance 0) to cover crowd handling.
  things = np.unique(panoptic[np.isin(panoptic // DIVISOR, THINGS)])
  panoptic = np.where(panoptic == things[0], (things[0] // DIVISOR) * DIVISOR, panoptic)
  targets, num_things = sample_generator.panoptic_targets(
      tf.constant(panoptic[..., None]), label_divisor=DIVISOR, ignore_label=0,
      thing_class_ids=THINGS, max_thing_id=8, small_instance_threshold=40,
      small_instance_weight=3.0)
  mask, classes, crowd, weights, count = numpy_targets(panoptic, 8, 40, 3.0)
  np.testing.assert_array_equal(targets['thing_id_mask_gt'].numpy(), mask)
  np.testing.assert_array_equal(targets['thing_id_class_gt'].numpy(), classes)
  np.testing.assert_array_equal(targets['is_crowd_gt'].numpy(), crowd)
  np.testing.assert_array_equal(targets['semantic_loss_weight'].numpy(), weights)
  np.testing.assert_array_equal(targets['semantic_gt'].numpy(), panoptic // DIVISOR)
  np.testing.assert_array_equal(targets['panoptic_gt'].numpy(), panoptic)
  assert int(num_things) == count


def test_hand_made_map():
  p = np.array([[0, 257, 257, 512],
                [770, 257, 1024, 512],
                [770, 258, 1024, 768]])
  targets, num_things = sample_generator.panoptic_targets(
      tf.constant(p[..., None]), label_divisor=DIVISOR, ignore_label=0, thing_class_ids=THINGS,
      max_thing_id=4)
  np.testing.assert_array_equal(targets['thing_id_mask_gt'].numpy(),
                                [[-1, 0, 0, -1], [1, 0, -1, -1], [1, 2, -1, -1]])
  np.testing.assert_array_equal(targets['thing_id_class_gt'].numpy(), [1, 3, 1, -1])
  # 512 = class 2, instance 0 (crowd); 768 = class 3, instance 0 (crowd); 1024 is stuff.
  np.testing.assert_array_equal(targets['is_crowd_gt'].numpy(),
                                [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
  assert int(num_things) == 3


def test_more_things_than_slots_are_counted():
  p = np.arange(1, 7).reshape(2, 3) + 256   # six instances of class 1
  targets, num_things = sample_generator.panoptic_targets(
      tf.constant(p[..., None]), label_divisor=DIVISOR, ignore_label=0, thing_class_ids=THINGS,
      max_thing_id=4)
  assert int(num_things) == 6
  np.testing.assert_array_equal(targets['thing_id_mask_gt'].numpy(), [[0, 1, 2], [3, -1, -1]])
