"""Undoing padding and resizing, against TF's own align-corners resizes per image."""

import numpy as np
import tensorflow as tf

from deeplab2_kmax.model.post_processing import undo_preprocessing


def _reference(image, resized, raw, method):
  cropped = image[:resized[0], :resized[1], None]
  return tf.compat.v1.image.resize(cropped, list(raw), method=method,
                                   align_corners=True).numpy()[..., 0]


def test_crop_and_resize_each_image_to_its_raw_size():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 50, size=(2, 9, 9)).astype(np.int32)
  scores = rng.uniform(size=(2, 9, 9)).astype(np.float32)
  resized = np.array([[9, 7], [5, 9]])
  raw = np.array([[17, 13], [11, 20]])
  out_labels = undo_preprocessing.resize_nearest(tf.constant(labels), resized, raw, -1).numpy()
  out_scores = undo_preprocessing.resize_bilinear(tf.constant(scores), resized, raw).numpy()
  assert out_labels.shape == out_scores.shape == (2, 17, 20)
  for b in range(2):
    h, w = raw[b]
    np.testing.assert_array_equal(
        out_labels[b, :h, :w],
        _reference(labels[b], resized[b], raw[b], tf.image.ResizeMethod.NEAREST_NEIGHBOR))
    np.testing.assert_allclose(
        out_scores[b, :h, :w],
        _reference(scores[b], resized[b], raw[b], tf.image.ResizeMethod.BILINEAR), atol=1e-5)
    # Outside the image: fill values.
    assert (out_labels[b, h:, :] == -1).all() and (out_labels[b, :, w:] == -1).all()
    assert (out_scores[b, h:, :] == 0).all() and (out_scores[b, :, w:] == 0).all()


def test_padding_is_removed_before_resizing():
  # The padded region (value 99) must never reach the output.
  labels = np.full((1, 5, 5), 99, np.int32)
  labels[0, :3, :2] = [[1, 2], [3, 4], [5, 6]]
  out = undo_preprocessing.resize_nearest(tf.constant(labels), [[3, 2]], [[3, 2]], 0).numpy()
  np.testing.assert_array_equal(out[0], [[1, 2], [3, 4], [5, 6]])
  out = undo_preprocessing.resize_nearest(tf.constant(labels), [[3, 2]], [[5, 3]], 0).numpy()
  assert 99 not in out
  # Align corners, scale 0.5: output index i reads round-half-up(i / 2).
  np.testing.assert_array_equal(out[0], [[1, 2, 2], [3, 4, 4], [3, 4, 4], [5, 6, 6],
                                         [5, 6, 6]])
