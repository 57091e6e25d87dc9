"""Merging slot maps into panoptic maps, and area limits, on hand-made maps."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.model.post_processing import panoptic

# Channels: 0 -> thing class 5, 1 -> stuff class 7, 2 -> stuff class 9; ignore label 0.
CLASS_IDS = (5, 7, 9)
# Slots: 0 thing, 1 thing, 2 stuff (class 7), 3 stuff (class 7), 4 stuff (class 9).
SLOT_CHANNEL = tf.constant([[0, 0, 1, 1, 2]])
MASK_ID = tf.constant([[
    [0, 0, 0, 1],
    [0, 0, 2, 3],
    [4, 4, 2, 3],
    [-1, 4, 2, 2],
]])


def _merge(**kwargs):
  maps = panoptic.merge_panoptic(MASK_ID, SLOT_CHANNEL, CLASS_IDS, num_thing_classes=1,
                                 ignore_label=0, label_divisor=100, **kwargs)
  return [m.numpy()[0] for m in maps]


def test_panoptic_is_semantic_times_divisor_plus_thing_instance():
  panoptic_map, semantic, instance = _merge()
  np.testing.assert_array_equal(semantic, [[5, 5, 5, 5], [5, 5, 7, 7], [9, 9, 7, 7],
                                           [0, 9, 7, 7]])
  np.testing.assert_array_equal(panoptic_map, [[501, 501, 501, 502], [501, 501, 700, 700],
                                               [900, 900, 700, 700], [0, 900, 700, 700]])
  np.testing.assert_array_equal(instance, [[1, 1, 1, 2], [1, 1, 3, 4], [5, 5, 3, 4],
                                           [0, 5, 3, 3]])


def test_thing_area_limit_voids_small_instances_only():
  panoptic_map, semantic, instance = _merge(thing_area_limit=2)
  # Thing slot 1 has 1 pixel (< 2): void; slot 0 has 5 pixels: kept.
  assert panoptic_map[0, 3] == 0 and semantic[0, 3] == 0 and instance[0, 3] == 0
  assert panoptic_map[0, 0] == 501
  panoptic_map, _, _ = _merge(thing_area_limit=5)
  assert panoptic_map[0, 0] == 501  # Exactly at the limit: kept.
  panoptic_map, _, _ = _merge(thing_area_limit=6)
  assert panoptic_map[0, 0] == 0


def test_stuff_area_limit_counts_each_class_over_all_its_slots():
  # Class 7 = slots 2 and 3 = 4 + 2 = 6 pixels; class 9 = 3 pixels.
  panoptic_map, semantic, _ = _merge(stuff_area_limit=4)
  assert (semantic[panoptic_map // 100 == 7] == 7).sum() == 6
  np.testing.assert_array_equal(semantic[2, :2], [0, 0])  # Class 9 (3 pixels) voided.
  assert semantic[3, 1] == 0
  assert panoptic_map[0, 0] == 501  # Things untouched.


def test_label_divisor_must_exceed_slot_count():
  with pytest.raises(ValueError, match='label_divisor 5 must exceed the number of slots 5'):
    panoptic.merge_panoptic(MASK_ID, SLOT_CHANNEL, CLASS_IDS, 1, 0, 5)
