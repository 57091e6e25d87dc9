"""Stochastic depth (drop path): per-sample keep masks for residual branches.

Inside `recorded_masks(masks)` every mask drawn is appended to `masks`; inside
`replayed_masks(masks)` the masks are taken from `masks` in order instead of drawn. The
activation recomputation (model/recompute.py) records the forward pass's masks and replays
them when the backward pass recomputes the part, so its gradient belongs to the masks of the
forward output.
"""

import contextlib
import threading

import keras
import tensorflow as tf

_STATE = threading.local()


@contextlib.contextmanager
def _masks_state(masks, replay):
  previous = getattr(_STATE, 'current', None)
  _STATE.current = (masks, replay, [0])
  try:
    yield
  finally:
    _STATE.current = previous


def recorded_masks(masks: list):
  """Masks drawn inside are appended to `masks`."""
  return _masks_state(masks, replay=False)


def replayed_masks(masks: list):
  """Masks are taken from `masks` (recorded by `recorded_masks`) in order, not drawn."""
  return _masks_state(masks, replay=True)


def _uniform(shape):
  """Uniform [0, 1) draws of `shape` (a function of its own so tests can make it
  deterministic)."""
  return tf.random.uniform(shape, dtype=tf.float32)


def generate_drop_path_mask(inputs, keep_prob):
  """A [batch, 1, ..., 1] mask of 0 or 1 / keep_prob, broadcastable to `inputs`.

  Scaling by 1 / keep_prob keeps the expected value of the branch unchanged.
  """
  state = getattr(_STATE, 'current', None)
  if state is not None and state[1]:
    masks, _, index = state
    if index[0] >= len(masks):
      raise RuntimeError('A recomputation drew more drop-path masks than its forward pass.')
    mask = masks[index[0]]
    index[0] += 1
    return tf.cast(mask, inputs.dtype)
  batch = tf.shape(inputs)[0]
  shape = tf.concat([[batch], tf.ones([len(inputs.shape) - 1], tf.int32)], axis=0)
  random = keep_prob + _uniform(shape)
  mask = tf.floor(random) / keep_prob
  if state is not None:
    state[0].append(mask)
  return tf.cast(mask, inputs.dtype)


def linear_keep_prob(keep_prob, current_stage, num_stages=4):
  """DeepLab2's linear schedule: 1 - (1 - keep_prob) * current_stage / num_stages."""
  return 1.0 - (1.0 - keep_prob) * current_stage / num_stages


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class DropPath(keras.layers.Layer):
  """Multiplies the input by a drop-path mask in training; identity otherwise."""

  def __init__(self, keep_prob=1.0, **kwargs):
    super().__init__(**kwargs)
    self.keep_prob = float(keep_prob)

  def call(self, inputs, training=None):
    if not training or self.keep_prob >= 1.0:
      return inputs
    return inputs * generate_drop_path_mask(inputs, self.keep_prob)

  def get_config(self):
    config = super().get_config()
    config['keep_prob'] = self.keep_prob
    return config
