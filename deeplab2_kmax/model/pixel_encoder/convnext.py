"""ConvNeXt T/S/B/L pixel encoders as DeepLab2's kMaX uses them.

Stem: 4x4 stride-4 conv + LayerNorm; three downsamplers: LayerNorm + 2x2 stride-2 conv; blocks:
7x7 depthwise conv -> LayerNorm -> Dense(4d) -> exact GELU -> Dense(d) -> layer scale (init
1e-6) -> drop path -> residual. Drop-path keep rates are linearly spaced from 1 to
drop_path_keep_prob over all blocks. kMaX's zero padding ((1, 2) before the stem, (0, 1)
before each downsampler) makes k * 32 + 1 inputs give the ResNet sizes: 1281 -> 321, 161, 81,
41. Endpoints: `stage1` = stem output (stride 4), `stage2..5` = stage outputs (stride 4, 8,
16, 32), `resN` = GELU(stageN). No classification head and no final norm.
"""

import keras
import numpy as np
import tensorflow as tf

from deeplab2_kmax.model import recompute
from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import drop_path

CONFIGS = {
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
    'xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def _trunc_normal():
  return keras.initializers.TruncatedNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ConvNeXtBlock(keras.layers.Layer):
  """[batch, height, width, dim] -> same shape."""

  def __init__(self, dim, drop_path_keep_prob=1.0, layer_scale_init_value=1e-6, **kwargs):
    super().__init__(**kwargs)
    self.dim = int(dim)
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.layer_scale_init_value = float(layer_scale_init_value)
    policy = self.dtype_policy
    self.depthwise_conv = keras.layers.DepthwiseConv2D(
        7, padding='same', depthwise_initializer=_trunc_normal(), name='depthwise_conv',
        dtype=policy)
    self.norm = keras.layers.LayerNormalization(epsilon=1e-6, name='norm', dtype=policy)
    self.pointwise_conv1 = keras.layers.Dense(4 * self.dim, kernel_initializer=_trunc_normal(),
                                              name='pointwise_conv1', dtype=policy)
    self.pointwise_conv2 = keras.layers.Dense(self.dim, kernel_initializer=_trunc_normal(),
                                              name='pointwise_conv2', dtype=policy)
    self.drop_path = drop_path.DropPath(self.drop_path_keep_prob, name='drop_path',
                                        dtype=policy)

  def build(self, input_shape):
    self.gamma = self.add_weight(
        name='layer_scale', shape=(1, 1, 1, self.dim),
        initializer=keras.initializers.Constant(self.layer_scale_init_value))

  def call(self, inputs, training=None):
    x = self.depthwise_conv(inputs)
    x = self.norm(x)
    x = activations.get_activation('gelu')(self.pointwise_conv1(x))
    x = self.pointwise_conv2(x) * self.gamma
    return inputs + self.drop_path(x, training=training)

  def get_config(self):
    config = super().get_config()
    config.update({'dim': self.dim, 'drop_path_keep_prob': self.drop_path_keep_prob,
                   'layer_scale_init_value': self.layer_scale_init_value})
    return config


class _Downsample(keras.layers.Layer):
  """Optional zero padding, then LayerNorm + conv (downsamplers) or conv + LayerNorm (stem)."""

  def __init__(self, channels, kernel_size, padding, norm_first, **kwargs):
    super().__init__(**kwargs)
    self.channels = int(channels)
    self.kernel_size = int(kernel_size)
    self.padding = tuple(padding) if padding else None
    self.norm_first = bool(norm_first)
    self.conv = keras.layers.Conv2D(self.channels, self.kernel_size, strides=self.kernel_size,
                                    kernel_initializer=_trunc_normal(), name='conv',
                                    dtype=self.dtype_policy)
    self.norm = keras.layers.LayerNormalization(epsilon=1e-6, name='norm',
                                                dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs):
    x = inputs
    if self.padding:
      begin, end = self.padding
      x = tf.pad(x, [[0, 0], [begin, end], [begin, end], [0, 0]])
    if self.norm_first:
      return self.conv(self.norm(x))
    return self.norm(self.conv(x))

  def get_config(self):
    config = super().get_config()
    config.update({'channels': self.channels, 'kernel_size': self.kernel_size,
                   'padding': self.padding, 'norm_first': self.norm_first})
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ConvNeXt(keras.layers.Layer):
  """ConvNeXt encoder: [batch, height, width, 3] -> endpoints dict.

  Args:
    size: 'tiny', 'small', 'base', 'large' or 'xlarge'.
    drop_path_keep_prob: Keep probability of the last block (linear from 1.0).
    width_multiplier: Scales the stage widths (1.0 for the published models).
    layer_multiplier: Scales the blocks per stage (1.0 for the published models).
    zero_padding_for_downstream: kMaX's padding for k * 32 + 1 inputs.
  """

  def __init__(self, size='tiny', drop_path_keep_prob=1.0, width_multiplier=1.0,
               layer_multiplier=1.0, zero_padding_for_downstream=True, **kwargs):
    super().__init__(**kwargs)
    if size not in CONFIGS:
      raise ValueError(f'Unsupported ConvNeXt size "{size}"; use one of {sorted(CONFIGS)}.')
    self.size = size
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.width_multiplier = float(width_multiplier)
    self.layer_multiplier = float(layer_multiplier)
    self.zero_padding_for_downstream = bool(zero_padding_for_downstream)
    depths, dims = CONFIGS[size]
    depths = [max(1, int(round(d * self.layer_multiplier))) for d in depths]
    dims = [int(round(d * self.width_multiplier)) for d in dims]
    policy = self.dtype_policy
    pad = self.zero_padding_for_downstream
    self.downsample_layers = [
        _Downsample(dims[0], 4, (1, 2) if pad else None, norm_first=False, name='stem',
                    dtype=policy)]
    for i in range(3):
      self.downsample_layers.append(_Downsample(
          dims[i + 1], 2, (0, 1) if pad else None, norm_first=True,
          name=f'downsampling_block_{i}', dtype=policy))
    keep_rates = np.linspace(1.0, self.drop_path_keep_prob, sum(depths))
    self.stages = []
    index = 0
    for i in range(4):
      stage = []
      for j in range(depths[i]):
        stage.append(ConvNeXtBlock(dims[i], float(keep_rates[index]),
                                   name=f'convnext_block_{i}_{j}', dtype=policy))
        index += 1
      self.stages.append(stage)
    # trainer_options.recompute "encoder": each stage (its downsampler and blocks) is
    # recomputed in the backward pass (model/recompute.py); not part of the config.
    self.recompute_stages = False

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    gelu = activations.get_activation('gelu')
    endpoints = {}
    x = inputs
    for i in range(4):
      if training and self.recompute_stages and self.stages[i][-1].built:
        if i == 0:  # the stem's output is an endpoint: keep it outside the recomputed block
          x = self.downsample_layers[0](x)
          endpoints['stage1'] = x
          x = recompute.call(lambda y: self._stage(0, y, training, downsample=False), x)
        else:
          x = recompute.call(lambda y, i=i: self._stage(i, y, training), x)
      else:
        x = self.downsample_layers[i](x)
        if i == 0:
          endpoints['stage1'] = x
        x = self._stage(i, x, training, downsample=False)
      endpoints[f'stage{i + 2}'] = x
    for i in range(1, 6):
      endpoints[f'res{i}'] = gelu(endpoints[f'stage{i}'])
    return endpoints

  def _stage(self, index, x, training, downsample=True):
    if downsample:
      x = self.downsample_layers[index](x)
    for block in self.stages[index]:
      x = block(x, training=training)
    return x

  def get_config(self):
    config = super().get_config()
    config.update({'size': self.size, 'drop_path_keep_prob': self.drop_path_keep_prob,
                   'width_multiplier': self.width_multiplier,
                   'layer_multiplier': self.layer_multiplier,
                   'zero_padding_for_downstream': self.zero_padding_for_downstream})
    return config
