"""Atrous spatial pyramid pooling (DeepLab2's ASPP).

Branches on [batch, height, width, channels]: 1x1 conv (`conv_bn_act`), three 3x3 atrous convs
(`aspp_conv1..3`), image pooling (`aspp_pool`: global average, 1x1 conv, broadcast back); the
concatenation is projected by `proj_conv_bn_act` (1x1) and followed by dropout 0.1.
"""

import keras
import tensorflow as tf

from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import normalization


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ASPP(normalization.NormLayerSerializable, keras.layers.Layer):
  """[batch, height, width, channels] -> [batch, height, width, output_channels]."""

  def __init__(self, output_channels, atrous_rates=(6, 12, 18), use_only_1x1_proj_conv=False,
               activation='gelu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    if len(atrous_rates) != 3:
      raise ValueError('ASPP takes three atrous rates.')
    self.output_channels = int(output_channels)
    self.atrous_rates = [int(r) for r in atrous_rates]
    self.use_only_1x1_proj_conv = bool(use_only_1x1_proj_conv)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer,
                activation=activation, dtype=self.dtype_policy)
    self._proj_conv_bn_act = convolutions.Conv2DSame(self.output_channels, 1,
                                                     'proj_conv_bn_act', **args)
    if not self.use_only_1x1_proj_conv:
      self._conv_bn_act = convolutions.Conv2DSame(self.output_channels, 1, 'conv_bn_act',
                                                  **args)
      self._aspp_convs = [
          _ASPPConv(self.output_channels, rate, name=f'aspp_conv{i + 1}', **args)
          for i, rate in enumerate(self.atrous_rates)]
      self._aspp_pool = _ASPPPool(self.output_channels, name='aspp_pool', **args)
      self._dropout = keras.layers.Dropout(0.1, name='dropout', dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    if self.use_only_1x1_proj_conv:
      return self._proj_conv_bn_act(inputs, training=training)
    branches = [self._conv_bn_act(inputs, training=training)]
    branches += [conv(inputs, training=training) for conv in self._aspp_convs]
    branches.append(self._aspp_pool(inputs, training=training))
    x = self._proj_conv_bn_act(tf.concat(branches, axis=-1), training=training)
    return self._dropout(x, training=training)

  def get_config(self):
    config = super().get_config()
    config.update({'output_channels': self.output_channels, 'atrous_rates': self.atrous_rates,
                   'use_only_1x1_proj_conv': self.use_only_1x1_proj_conv,
                   'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config


class _ASPPConv(keras.layers.Layer):
  """A 3x3 atrous conv + BN + act, wrapped as `conv_bn_act` like DeepLab2's ASPPConv."""

  def __init__(self, output_channels, atrous_rate, name, **conv_args):
    super().__init__(name=name, dtype=conv_args.get('dtype'))
    self._conv_bn_act = convolutions.Conv2DSame(output_channels, 3, 'conv_bn_act',
                                                atrous_rate=atrous_rate, **conv_args)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    return self._conv_bn_act(inputs, training=training)


class _ASPPPool(keras.layers.Layer):
  """Global average pooling, 1x1 conv + BN + act, broadcast back to the input size."""

  def __init__(self, output_channels, name, **conv_args):
    super().__init__(name=name, dtype=conv_args.get('dtype'))
    self._conv_bn_act = convolutions.Conv2DSame(output_channels, 1, 'conv_bn_act',
                                                **conv_args)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    pooled = tf.reduce_mean(inputs, axis=[1, 2], keepdims=True)
    pooled = self._conv_bn_act(pooled, training=training)
    # Align-corners resizing of a 1x1 map is a broadcast.
    return tf.tile(pooled, [1, tf.shape(inputs)[1], tf.shape(inputs)[2], 1])
