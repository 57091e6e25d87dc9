"""Multi-head attention with batch-normalised logits and outputs (DeepLab2's AttentionOperation).

No 1/sqrt(d) scaling: the similarity BN (per head) replaces it. The retrieved values get a BN
with per-(head, channel) statistics and an activation before the heads are concatenated.
"""

import keras
import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import normalization


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class AttentionOperation(normalization.NormLayerSerializable, keras.layers.Layer):
  """call((query, key, value)) -> [batch, query_length, heads * value_channels].

  query [batch, heads, query_length, channels], key [batch, heads, key_length, channels],
  value [batch, key_length, heads, value_channels].
  """

  def __init__(self, activation='gelu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._activation_fn = activations.get_activation(activation)
    self._batch_norm_similarity = self.norm_layer(axis=1, name='batch_norm_similarity',
                                                  dtype=self.dtype_policy)
    self._batch_norm_retrieved_value = self.norm_layer(
        axis=[1, 3], name='batch_norm_retrieved_value', dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    query, key, value = inputs
    similarity = tf.einsum('bhld,bhmd->bhlm', query, key)
    similarity = self._batch_norm_similarity(similarity, training=training)
    # Softmax over the keys in float32.
    weights = tf.cast(tf.nn.softmax(tf.cast(similarity, tf.float32), axis=-1), value.dtype)
    retrieved = tf.einsum('bhlm,bmhd->bhld', weights, value)
    retrieved = self._batch_norm_retrieved_value(retrieved, training=training)
    retrieved = self._activation_fn(retrieved)
    _, heads, length, depth = retrieved.shape
    retrieved = tf.transpose(retrieved, [0, 2, 1, 3])
    return tf.reshape(retrieved, [-1, length, heads * depth])

  def get_config(self):
    config = super().get_config()
    config.update({'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config
