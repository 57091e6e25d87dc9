"""Pixelwise and maskwise slot assignment on hand-made logits: paste order, overlap filtering,
thing/stuff and pixel thresholds, ranking weights."""

import numpy as np
import tensorflow as tf

from deeplab2_kmax.model.post_processing import maskwise
from deeplab2_kmax.model.post_processing import pixelwise
from deeplab2_kmax.model.post_processing import slot_classes

# Class head: channel 0 = a thing class, channel 1 = a stuff class, channel 2 = void.
THING, STUFF = 0, 1


def _classes(rows):
  """rows: (channel, confidence) per slot -> class logits [1, N, 3] with that argmax/prob."""
  logits = []
  for channel, confidence in rows:
    probs = np.full(3, (1.0 - confidence) / 2)
    probs[channel] = confidence
    logits.append(np.log(probs))
  return slot_classes.slot_classes(tf.constant([logits], tf.float32))


def _logits(*slot_maps):
  """Per-slot [H, W] logit maps -> [1, H, W, N]."""
  return tf.constant(np.stack(slot_maps, axis=-1)[None], tf.float32)


# Slots A and B both claim the two middle columns of a 4x4 image (probability ~0.5 each, above
# the 0.4 binary threshold); slot C is nowhere.
A = np.array([[5, 5, 5, -5]] * 4, np.float32)
B = np.array([[-5, 5, 5, 5]] * 4, np.float32)
C = np.full((4, 4), -5, np.float32)


def test_slot_classes_drop_void_after_softmax():
  classes = _classes([(THING, 0.9), (STUFF, 0.6)])
  np.testing.assert_array_equal(classes.class_index.numpy(), [[0, 1]])
  np.testing.assert_allclose(classes.confidence.numpy(), [[0.9, 0.6]], rtol=1e-6)


def test_maskwise_more_confident_slot_is_pasted_first():
  for confidences, winner in (((0.9, 0.8), 0), ((0.8, 0.9), 1)):
    classes = _classes([(THING, confidences[0]), (THING, confidences[1]), (THING, 0.95)])
    maps = maskwise.maskwise_slot_maps(_logits(A, B, C), classes, (4, 4), num_thing_classes=1,
                                       overlap_threshold=0.3)
    mask_id = maps.mask_id.numpy()[0]
    # The winner takes the shared columns; the other keeps its own column (4 of 12 pixels are
    # free, more than 0.3 * 12).
    np.testing.assert_array_equal(mask_id[:, 1:3], winner)
    np.testing.assert_array_equal(mask_id[:, 0], 0)
    np.testing.assert_array_equal(mask_id[:, 3], 1)
    confidence = confidences[winner]
    np.testing.assert_allclose(maps.semantic_score.numpy()[0][:, 1], confidence, rtol=1e-6)


def test_maskwise_overlap_threshold_drops_mostly_covered_slot():
  classes = _classes([(THING, 0.9), (THING, 0.8), (THING, 0.95)])
  maps = maskwise.maskwise_slot_maps(_logits(A, B, C), classes, (4, 4), num_thing_classes=1,
                                     overlap_threshold=0.5)
  mask_id = maps.mask_id.numpy()[0]
  # B would keep 4 of its 12 pixels, not more than 0.5 * 12: dropped, its column is void.
  np.testing.assert_array_equal(mask_id[:, :3], 0)
  np.testing.assert_array_equal(mask_id[:, 3], -1)
  np.testing.assert_array_equal(maps.semantic_score.numpy()[0][:, 3], 0.0)


def test_maskwise_thing_and_stuff_thresholds():
  classes = _classes([(THING, 0.75), (STUFF, 0.75), (THING, 0.95)])
  left = np.array([[5, 5, -5, -5]] * 4, np.float32)
  right = np.array([[-5, -5, 5, 5]] * 4, np.float32)
  maps = maskwise.maskwise_slot_maps(_logits(left, right, C), classes, (4, 4),
                                     num_thing_classes=1, thing_threshold=0.8,
                                     stuff_threshold=0.7)
  mask_id = maps.mask_id.numpy()[0]
  np.testing.assert_array_equal(mask_id[:, :2], -1)  # Thing at 0.75 < 0.8.
  np.testing.assert_array_equal(mask_id[:, 2:], 1)   # Stuff at 0.75 >= 0.7.


def test_paste_order_by_mask_score_when_weighted():
  # A's binary pixels have probability ~0.5 (shared), D's ~1: with class weight 0 and mask
  # weight 1, D (less class-confident) goes first.
  d = np.array([[-5, -5, -5, 9]] * 4, np.float32)
  a = np.array([[5, 5, -5, -5]] * 4, np.float32)
  a2 = np.array([[5, 5, -5, -5]] * 4, np.float32)
  classes = _classes([(THING, 0.9), (THING, 0.8), (THING, 0.85)])
  logits = _logits(a, d, a2)
  np.testing.assert_array_equal(maskwise.paste_order(logits, classes).numpy(), [[0, 2, 1]])
  np.testing.assert_array_equal(
      maskwise.paste_order(logits, classes, reorder_class_weight=0.0,
                           reorder_mask_weight=1.0).numpy()[0][0], 1)


def test_pixelwise_class_and_pixel_thresholds():
  # Slot 0 (kept) owns column 0; slot 1 (class confidence 0.5, dropped) is the best slot of
  # column 1; columns 2-3 are split evenly between kept slots 0, 2 and 3.
  s0 = np.array([[6, 0, 2, 2]] * 4, np.float32)
  s1 = np.array([[0, 6, 0, 0]] * 4, np.float32)
  s2 = np.array([[0, 3, 2, 2]] * 4, np.float32)
  s3 = np.array([[0, 0, 2, 2]] * 4, np.float32)
  classes = _classes([(THING, 0.9), (THING, 0.5), (STUFF, 0.8), (STUFF, 0.8)])
  maps = pixelwise.pixelwise_slot_maps(_logits(s0, s1, s2, s3), classes, (4, 4),
                                       class_threshold=0.7, pixel_threshold=0.4)
  mask_id = maps.mask_id.numpy()[0]
  np.testing.assert_array_equal(mask_id[:, 0], 0)
  # Column 1: the kept slot 2 has probability ~0.95 among kept slots, but the pixel's best
  # slot overall is the dropped slot 1, so the pixel is void.
  np.testing.assert_array_equal(mask_id[:, 1], -1)
  # Columns 2-3: best kept probability 1/3 < 0.4.
  np.testing.assert_array_equal(mask_id[:, 2:], -1)
  np.testing.assert_allclose(maps.instance_score.numpy()[0][:, 2], 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(maps.semantic_score.numpy()[0][:, 0], 0.9, rtol=1e-6)
  # With a lower pixel threshold the split pixels go to the first kept slot with the max.
  maps = pixelwise.pixelwise_slot_maps(_logits(s0, s1, s2, s3), classes, (4, 4),
                                       class_threshold=0.7, pixel_threshold=0.3)
  np.testing.assert_array_equal(maps.mask_id.numpy()[0][:, 2:], 0)


def test_no_slot_passes_thresholds_gives_void():
  classes = _classes([(THING, 0.5), (STUFF, 0.5)])
  logits = _logits(A, B)
  assert (pixelwise.pixelwise_slot_maps(logits, classes, (4, 4)).mask_id.numpy() == -1).all()
  assert (maskwise.maskwise_slot_maps(logits, classes, (4, 4), 1).mask_id.numpy() == -1).all()


def test_logits_are_resized_align_corners_to_the_crop():
  # 2x2 logits -> 3x3 crop. Edge midpoints next to the corner of slot 0 average to a tie
  # (2 vs 2: probability 0.5, confident, first slot wins); the centre averages the four
  # corners (1 vs 3: slot 1).
  s0 = np.array([[4, 0], [0, 0]], np.float32)
  s1 = np.array([[0, 4], [4, 4]], np.float32)
  classes = _classes([(THING, 0.9), (THING, 0.9)])
  maps = pixelwise.pixelwise_slot_maps(_logits(s0, s1), classes, (3, 3), pixel_threshold=0.4)
  np.testing.assert_array_equal(maps.mask_id.numpy()[0],
                                [[0, 0, 1], [0, 1, 1], [1, 1, 1]])
  np.testing.assert_allclose(maps.instance_score.numpy()[0][0, 1], 0.5, rtol=1e-6)
