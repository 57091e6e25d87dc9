"""Fuses features of different sizes into one [batch, height, width, channels] map (DeepLab2's
ResizedFuse): per input, channels == target -> align-corners resize only; exactly 2x larger ->
activation, 1x1 stride-2 conv + BN; otherwise activation, 1x1 conv + BN, align-corners resize.
The results are summed (non-activated).
"""

import keras
import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resize


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ResizedFuse(normalization.NormLayerSerializable, keras.layers.Layer):
  """call([x_1, ..., x_n]) -> sum of the n inputs mapped to [batch, height, width, channels].

  height and width default to the spatial size of the last input at each call (kMaX fuses the
  upsampled decoder feature into the size of the encoder skip feature), so the layer runs at
  any crop.
  """

  def __init__(self, channels, height=None, width=None, activation='relu', norm_layer=None,
               **kwargs):
    super().__init__(**kwargs)
    self.height = None if height is None else int(height)
    self.width = None if width is None else int(width)
    self.channels = int(channels)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._activation_fn = activations.get_activation(activation)
    # Input index -> (attribute name, strided); the layers themselves are attributes so that
    # Keras tracks each once.
    self._conv_index = {}

  def _target_size(self, shapes):
    if self.height is None:
      return int(shapes[-1][1]), int(shapes[-1][2])
    return self.height, self.width

  def build(self, input_shapes):
    target_height, target_width = self._target_size(input_shapes)
    for index, shape in enumerate(input_shapes):
      _, height, width, channels = shape
      if channels == self.channels:
        continue
      strided = (height + 1) // 2 == target_height and (width + 1) // 2 == target_width
      name = f'{"strided" if strided else "resized"}_conv_bn{index + 1}'
      layer = convolutions.Conv2DSame(
          self.channels, 1, name, strides=2 if strided else 1, use_bias=False, use_bn=True,
          norm_layer=self.norm_layer, activation=None, dtype=self.dtype_policy)
      setattr(self, '_' + name, layer)
      self._conv_index[index] = ('_' + name, strided)

  def call(self, inputs, training=None):
    size = self._target_size([x.shape for x in inputs])
    outputs = []
    for index, feature in enumerate(inputs):
      if index in self._conv_index:
        attribute, strided = self._conv_index[index]
        feature = inference_fusion.activation(feature, self.activation, training,
                                              self._activation_fn)
        feature = getattr(self, attribute)(feature, training=training)
        if not strided:
          feature = resize.resize_align_corners(feature, size)
      else:
        feature = resize.resize_align_corners(feature, size)
      outputs.append(feature)
    return tf.add_n(outputs)

  def get_config(self):
    config = super().get_config()
    config.update({'height': self.height, 'width': self.width, 'channels': self.channels,
                   'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config
