"""Stochastic depth (drop path): per-sample keep masks for residual branches."""

import keras
import tensorflow as tf


def generate_drop_path_mask(inputs, keep_prob):
  """A [batch, 1, ..., 1] mask of 0 or 1 / keep_prob, broadcastable to `inputs`.

  Scaling by 1 / keep_prob keeps the expected value of the branch unchanged.
  """
  batch = tf.shape(inputs)[0]
  shape = tf.concat([[batch], tf.ones([len(inputs.shape) - 1], tf.int32)], axis=0)
  random = keep_prob + tf.random.uniform(shape, dtype=tf.float32)
  mask = tf.floor(random) / keep_prob
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
