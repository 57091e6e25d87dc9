"""A stage of MaX-DeepLab's dual-path network: residual blocks, each optionally followed by a
dual-path transformer layer (DeepLab2's axial_block_groups.BlockGroup).

Every per-block choice follows DeepLab2 from the block's "original ResNet stride" s (the
stage's input stride for the first block, times the stage's stride afterwards):
- the block is an axial bottleneck [e f, f, 4 f] (e = attention_bottleneck_expansion) when
  s >= use_axial_beyond_stride > 0; else a bottleneck [f, f, 4 f] for ResNet / ResNet-beta, and
  for a wide ResNet a basic block [4 f, 4 f] below stride 32 or a bottleneck [f, 2 f, 4 f];
- the first block strides when the stage's input stride is below the output stride; past the
  output stride convolutions dilate by s / output_stride;
- stochastic depth applies when s >= drop_path_beyond_stride (keep probability by
  `drop_path_schedule` over 4 stages: stage log2(s) - 1);
- a dual-path transformer of 128 * transformer_expansion channels follows the block when
  s >= use_transformer_beyond_stride > 0 (s counted after the first block's stride).
Blocks are named block1, block2, ..., their transformers block1_transformer, ....
"""

import math

import keras

from deeplab2_kmax.model.layers import blocks
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.model.layers import dual_path_transformer
from deeplab2_kmax.model.layers import normalization

BACKBONE_TYPES = ('resnet', 'resnet_beta', 'wider_resnet')


def stage_keep_prob(keep_prob, schedule, stride):
  """DeepLab2's get_drop_path_keep_prob for a block at original ResNet stride `stride`."""
  if schedule == 'constant':
    return keep_prob
  if schedule == 'linear':
    return drop_path.linear_keep_prob(keep_prob, int(round(math.log2(stride) - 1)))
  raise ValueError(f'drop_path_schedule "{schedule}" is not "constant" or "linear".')


def block_plan(filters, num_blocks, original_resnet_stride, original_resnet_input_stride,
               output_stride=16, backbone_type='resnet_beta', use_axial_beyond_stride=16,
               use_transformer_beyond_stride=32, attention_bottleneck_expansion=2,
               drop_path_keep_prob=1.0, drop_path_beyond_stride=16,
               drop_path_schedule='constant'):
  """Per block: dict(filters_list, strides, atrous_rate, attention_type, keep_prob, transformer).

  The arguments are DeepLab2's BlockGroup arguments of the same names.
  """
  if backbone_type not in BACKBONE_TYPES:
    raise ValueError(f'backbone_type "{backbone_type}" is not one of {BACKBONE_TYPES}.')
  for name, value in (('original_resnet_input_stride', original_resnet_input_stride),
                      ('output_stride', output_stride)):
    if value <= 0 or value & (value - 1):
      raise ValueError(f'{name} is {value}; it must be a power of 2.')
  current = original_resnet_input_stride
  final_stride = original_resnet_input_stride * original_resnet_stride
  plan = []
  for index in range(num_blocks):
    strides = (original_resnet_stride
               if index == 0 and original_resnet_input_stride < output_stride else 1)
    atrous_rate = current // output_stride if current > output_stride else 1
    keep_prob = 1.0
    if current >= drop_path_beyond_stride:
      keep_prob = stage_keep_prob(drop_path_keep_prob, drop_path_schedule, current)
    attention = None
    if current >= use_axial_beyond_stride > 0:
      attention = 'axial'
      filters_list = [filters * attention_bottleneck_expansion, filters, filters * 4]
    elif backbone_type in ('resnet', 'resnet_beta'):
      filters_list = [filters, filters, filters * 4]
    elif final_stride < 32:
      # A wide ResNet's basic block; its second 3x3 conv dilates by the stage's final stride.
      filters_list = [filters * 4, filters * 4]
      second_rate = (final_stride // output_stride
                     if index == 0 and final_stride > output_stride else atrous_rate)
      if second_rate != atrous_rate:
        raise ValueError(f'A basic block with atrous rates {atrous_rate} and {second_rate} '
                         f'(output_stride {output_stride}) is not supported; MaX-DeepLab uses '
                         'output_stride 16.')
    else:
      filters_list = [filters, filters * 2, filters * 4]
    if index == 0 and original_resnet_stride > 1:
      current *= original_resnet_stride
    plan.append(dict(filters_list=[int(f) for f in filters_list], strides=strides,
                     atrous_rate=atrous_rate, attention_type=attention, keep_prob=keep_prob,
                     transformer=current >= use_transformer_beyond_stride > 0))
  return plan


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class DualPathBlockGroup(normalization.NormLayerSerializable, keras.layers.Layer):
  """call((pixels, memory)) -> (pixels, memory).

  pixels [batch, height, width, channels] non-activated in and out (strided by the first
  block); memory [batch, N, Cm] (may be None when no block has a transformer).

  Args:
    plan: block_plan(...) output, one dict per block.
    transformer_filters: Base channels of the transformer layers (128 * expansion).
    transformer_args: kwargs of DualPathTransformerLayer (num_heads, bottleneck_expansion,
      key_expansion, value_expansion, ffn_channels).
    axial_key_expansion, axial_value_expansion: Of the axial blocks.
    activation: Activation name.
    norm_layer: Batch-norm factory.
  """

  def __init__(self, plan, transformer_filters=128, transformer_args=None,
               axial_key_expansion=1.0, axial_value_expansion=2.0, activation='relu',
               norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    self.plan = [dict(step) for step in plan]
    self.transformer_filters = int(transformer_filters)
    self.transformer_args = dict(transformer_args or {})
    self.axial_key_expansion = float(axial_key_expansion)
    self.axial_value_expansion = float(axial_value_expansion)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    policy = self.dtype_policy
    self._blocks, self._transformers = [], []
    for index, step in enumerate(self.plan):
      self._blocks.append(blocks.ResidualBlock(
          step['filters_list'], strides=step['strides'], atrous_rate=step['atrous_rate'],
          attention_type=step['attention_type'], activation=activation,
          norm_layer=self.norm_layer, axial_key_expansion=self.axial_key_expansion,
          axial_value_expansion=self.axial_value_expansion, name=f'block{index + 1}',
          dtype=policy))
      transformer = None
      if step['transformer']:
        transformer = dual_path_transformer.DualPathTransformerLayer(
            self.transformer_filters, activation=activation, norm_layer=self.norm_layer,
            name=f'block{index + 1}_transformer', dtype=policy, **self.transformer_args)
      self._transformers.append(transformer)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    pixels, memory = inputs
    for step, block, transformer in zip(self.plan, self._blocks, self._transformers):
      keep_prob = step['keep_prob']
      drop = bool(training) and keep_prob < 1.0
      mask = drop_path.generate_drop_path_mask(pixels, keep_prob) if drop else None
      pixels = block(pixels, training=training, drop_path_mask=mask)
      if transformer is not None:
        masks = None
        if drop:
          masks = [drop_path.generate_drop_path_mask(memory, keep_prob) for _ in range(3)]
        pixels, memory = transformer((pixels, memory), training=training,
                                     drop_path_masks=masks)
    return pixels, memory

  def get_config(self):
    config = super().get_config()
    config.update({
        'plan': self.plan, 'transformer_filters': self.transformer_filters,
        'transformer_args': self.transformer_args,
        'axial_key_expansion': self.axial_key_expansion,
        'axial_value_expansion': self.axial_value_expansion, 'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
