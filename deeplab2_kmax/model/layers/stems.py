"""Encoder stems: ResNet's 7x7/2 conv (no max-pool) and the Inception stem of ResNet-beta.

Both return a non-activated [batch, (height - 1) / 2 + 1, (width - 1) / 2 + 1, channels]
tensor (DeepLab2's `stage1`); the first residual block activates it.
"""

import keras

from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import normalization


def conv_stem(channels, norm_layer, dtype=None):
  """7x7 stride-2 conv + BN, named 'stem' like DeepLab2's."""
  return convolutions.Conv2DSame(channels, 7, 'stem', strides=2, use_bias=False, use_bn=True,
                                 norm_layer=norm_layer, activation=None, dtype=dtype)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class InceptionStem(normalization.NormLayerSerializable, keras.layers.Layer):
  """3x3/2 (64, BN, act) -> 3x3 (64, BN, act) -> 3x3 (128, BN), widths x width_multiplier."""

  def __init__(self, width_multiplier=1.0, activation='relu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    self.width_multiplier = float(width_multiplier)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    w = self.width_multiplier
    args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer,
                dtype=self.dtype_policy)
    self._conv1_bn_act = convolutions.Conv2DSame(int(round(64 * w)), 3, 'conv1_bn_act',
                                                 strides=2, activation=activation, **args)
    self._conv2_bn_act = convolutions.Conv2DSame(int(round(64 * w)), 3, 'conv2_bn_act',
                                                 activation=activation, **args)
    self._conv3_bn = convolutions.Conv2DSame(int(round(128 * w)), 3, 'conv3_bn',
                                             activation=None, **args)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    x = self._conv1_bn_act(inputs, training=training)
    x = self._conv2_bn_act(x, training=training)
    return self._conv3_bn(x, training=training)

  def get_config(self):
    config = super().get_config()
    config.update({'width_multiplier': self.width_multiplier, 'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config
