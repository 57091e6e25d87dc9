"""A convolutional prediction head (DeepLab2's PanopticDeepLabSingleHead).

conv_block: one 5x5 depthwise-separable (or standard) conv with BN and activation to
head_channels; final_conv: 1x1 conv with bias to output_channels (truncated normal 0.01).
"""

import keras

from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import recomputed_activation


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ConvHead(normalization.NormLayerSerializable, keras.layers.Layer):
  """[batch, height, width, channels] -> [batch, height, width, output_channels]."""

  def __init__(self, head_channels, output_channels, conv_type='depthwise_separable_conv',
               activation='gelu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    self.head_channels = int(head_channels)
    self.output_channels = int(output_channels)
    self.conv_type = conv_type
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.conv_block = convolutions.StackedConv2DSame(
        1, self.head_channels, 5, 'conv_block', conv_type=conv_type,
        norm_layer=self.norm_layer, activation=activation, dtype=self.dtype_policy)
    self.final_conv = keras.layers.Conv2D(
        self.output_channels, 1, use_bias=True,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01),
        name='final_conv', dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    features = self.conv_block(inputs, training=training)
    return recomputed_activation.keras_convolution(self.final_conv, features, training)

  def get_config(self):
    config = super().get_config()
    config.update({'head_channels': self.head_channels,
                   'output_channels': self.output_channels, 'conv_type': self.conv_type,
                   'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config
