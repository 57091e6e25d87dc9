"""Residual blocks and block groups (stages) of DeepLab2's (Axial-)ResNets.

A block takes a *non-activated* tensor, activates it first, and returns the non-activated sum
(residual branch + shortcut); the last BN of every residual branch starts with gamma = 0 so each
block starts as the identity.
"""

import keras

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import axial_attention
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ResidualBlock(normalization.NormLayerSerializable, keras.layers.Layer):
  """Bottleneck (3 filters), axial bottleneck (3 filters + 'axial') or basic block (2 filters).

  Input [batch, height, width, channels] (non-activated); output [batch, height / strides,
  width / strides, filters_list[-1]] (non-activated).

  Args:
    filters_list: [f1, f2, f3] for bottlenecks (1x1, 3x3 or attention, 1x1), [f1, f2] for basic.
    strides: Stride of the block (applied in the 3x3 / attention and the shortcut).
    atrous_rate: Dilation of the 3x3 convolutions.
    attention_type: None for convolutions, 'axial' for axial attention (bottleneck only).
    activation: Activation name.
    norm_layer: Batch-norm factory.
    axial_query_shape: Largest length for global axial attention.
    axial_key_expansion, axial_value_expansion: Axial attention's query/key and value
      channels as multiples of filters_list[1] (the value channels are the attention's output).
  """

  def __init__(self, filters_list, strides=1, atrous_rate=1, attention_type=None,
               activation='relu', norm_layer=None, axial_query_shape=129,
               axial_key_expansion=1.0, axial_value_expansion=2.0, **kwargs):
    super().__init__(**kwargs)
    self.filters_list = [int(f) for f in filters_list]
    self.strides = int(strides)
    self.atrous_rate = int(atrous_rate)
    self.attention_type = attention_type
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.axial_query_shape = int(axial_query_shape)
    self.axial_key_expansion = float(axial_key_expansion)
    self.axial_value_expansion = float(axial_value_expansion)
    self._activation_fn = activations.get_activation(activation)
    policy = self.dtype_policy
    conv_args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer, dtype=policy)
    self._attention = None
    if len(self.filters_list) == 3:
      self._conv1_bn_act = convolutions.Conv2DSame(
          self.filters_list[0], 1, 'conv1_bn_act', activation=activation, **conv_args)
      if attention_type in (None, 'none'):
        self._conv2_bn_act = convolutions.Conv2DSame(
            self.filters_list[1], 3, 'conv2_bn_act', strides=self.strides,
            atrous_rate=self.atrous_rate, activation=activation, **conv_args)
      elif attention_type == 'axial':
        self._attention = axial_attention.AxialAttention2D(
            self.filters_list[1], strides=self.strides, key_expansion=self.axial_key_expansion,
            value_expansion=self.axial_value_expansion, query_shape=self.axial_query_shape,
            norm_layer=self.norm_layer, name='attention', dtype=policy)
      else:
        raise ValueError(f'Unsupported attention_type "{attention_type}".')
      self._conv3_bn = convolutions.Conv2DSame(
          self.filters_list[2], 1, 'conv3_bn', bn_gamma_initializer='zeros', activation=None,
          **conv_args)
    elif len(self.filters_list) == 2:
      self._conv1_bn_act = convolutions.Conv2DSame(
          self.filters_list[0], 3, 'conv1_bn_act', strides=self.strides,
          atrous_rate=self.atrous_rate, activation=activation, **conv_args)
      self._conv2_bn = convolutions.Conv2DSame(
          self.filters_list[1], 3, 'conv2_bn', atrous_rate=self.atrous_rate,
          bn_gamma_initializer='zeros', activation=None, **conv_args)
    else:
      raise ValueError('filters_list must have 2 or 3 entries.')
    self._shortcut = None

  def build(self, input_shape):
    if int(input_shape[-1]) != self.filters_list[-1]:
      self._shortcut = convolutions.Conv2DSame(
          self.filters_list[-1], 1, 'shortcut', strides=self.strides, use_bias=False,
          use_bn=True, norm_layer=self.norm_layer, activation=None, dtype=self.dtype_policy)

  def call(self, inputs, training=None, drop_path_mask=None):
    x = inference_fusion.activation(inputs, self.activation, training, self._activation_fn)
    shortcut = x
    if self._shortcut is not None:
      shortcut = self._shortcut(shortcut, training=training)
    elif self.strides > 1:
      shortcut = shortcut[:, ::self.strides, ::self.strides, :]
    if len(self.filters_list) == 3:
      y = self._conv1_bn_act(x, training=training)
      if self._attention is None:
        y = self._conv2_bn_act(y, training=training)
      else:
        y = inference_fusion.activation(self._attention(y, training=training), self.activation,
                                        training, self._activation_fn)
      last_conv = self._conv3_bn
    else:
      y = self._conv1_bn_act(x, training=training)
      last_conv = self._conv2_bn
    if drop_path_mask is not None:
      return last_conv(y, training=training) * drop_path_mask + shortcut
    # The shortcut joins inside the last convolution's BN (one fused step at inference).
    return last_conv(y, training=training, residual=shortcut)

  def get_config(self):
    config = super().get_config()
    config.update({
        'filters_list': self.filters_list, 'strides': self.strides,
        'atrous_rate': self.atrous_rate, 'attention_type': self.attention_type,
        'activation': self.activation, 'axial_query_shape': self.axial_query_shape,
        'axial_key_expansion': self.axial_key_expansion,
        'axial_value_expansion': self.axial_value_expansion,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class BlockGroup(normalization.NormLayerSerializable, keras.layers.Layer):
  """A stage: `num_blocks` residual blocks named block1, block2, ...; the first one strides.

  Input and output are non-activated [batch, height, width, channels].

  Args:
    filters: Base filters f; bottlenecks use [f, f, 4f], axial bottlenecks [2f, f, 4f]
      (DeepLab2's attention_bottleneck_expansion = 2), basic blocks [f, f].
    num_blocks: Number of blocks.
    strides: Stride of the first block.
    block_type: 'bottleneck', 'axial' or 'basic'. With 'axial_after_first' the first block
      is a conv bottleneck and the rest axial (Axial-ResNet's strided stage 4).
    drop_path_keep_prob: Keep probability of the residual branches in training: one float for
      all blocks, or a list with one value per block.
    atrous_rate: Dilation of the blocks' 3x3 convolutions.
    activation, norm_layer, axial_query_shape: As in ResidualBlock.
  """

  def __init__(self, filters, num_blocks, strides=1, block_type='bottleneck',
               drop_path_keep_prob=1.0, atrous_rate=1, activation='relu', norm_layer=None,
               axial_query_shape=129, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.num_blocks = int(num_blocks)
    self.strides = int(strides)
    self.block_type = block_type
    self.atrous_rate = int(atrous_rate)
    if isinstance(drop_path_keep_prob, (list, tuple)):
      if len(drop_path_keep_prob) != self.num_blocks:
        raise ValueError('drop_path_keep_prob needs one value per block.')
      self.drop_path_keep_prob = [float(p) for p in drop_path_keep_prob]
    else:
      self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.axial_query_shape = int(axial_query_shape)
    f = self.filters
    self._blocks = []
    for index in range(self.num_blocks):
      kind = block_type
      if block_type == 'axial_after_first':
        kind = 'bottleneck' if index == 0 else 'axial'
      if kind == 'bottleneck':
        filters_list, attention = [f, f, 4 * f], None
      elif kind == 'axial':
        filters_list, attention = [2 * f, f, 4 * f], 'axial'
      elif kind == 'basic':
        filters_list, attention = [f, f], None
      else:
        raise ValueError(f'Unsupported block_type "{block_type}".')
      self._blocks.append(ResidualBlock(
          filters_list, strides=self.strides if index == 0 else 1,
          atrous_rate=self.atrous_rate, attention_type=attention,
          activation=activation, norm_layer=self.norm_layer,
          axial_query_shape=self.axial_query_shape, name=f'block{index + 1}',
          dtype=self.dtype_policy))

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    x = inputs
    keep_probs = self.drop_path_keep_prob
    if not isinstance(keep_probs, list):
      keep_probs = [keep_probs] * self.num_blocks
    for block, keep_prob in zip(self._blocks, keep_probs):
      mask = None
      if training and keep_prob < 1.0:
        mask = drop_path.generate_drop_path_mask(x, keep_prob)
      x = block(x, training=training, drop_path_mask=mask)
    return x

  def get_config(self):
    config = super().get_config()
    config.update({
        'filters': self.filters, 'num_blocks': self.num_blocks, 'strides': self.strides,
        'block_type': self.block_type, 'drop_path_keep_prob': self.drop_path_keep_prob,
        'atrous_rate': self.atrous_rate,
        'activation': self.activation, 'axial_query_shape': self.axial_query_shape,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
