"""MaX-DeepLab's dual-path network (DeepLab2's encoder/axial_resnet.AxialResNet, panoptic mode).

An (Axial-)ResNet pixel path with a memory path of N mask slots, a learned variable
`memory_feature` [1, max_num_mask_slots, memory_channels] tiled over the batch. Dual-path
transformer layers (layers/dual_path_transformer.py) follow the residual blocks past a stride
(dual_path_block_group.py), in the backbone stages and in an extra decoder trained from scratch:

  stem -> stage2..stage5 (stage1 too for wide ResNets) -> [stage5_extra] ->
  hour-glass decoder stages: from the output stride (16) down to the high-resolution stride
  (4), back up to 16 and down again per stack; each stage fuses (ResizedFuse) the current
  feature with the last two features of its stride and runs one block group.

Stages inside `backbone_decoder_num_stacks` are part of the (ImageNet-pretrained) backbone and
named decoder_stage{k}; the others decoder_stage{k}_extra. Endpoints: `stage1..5`, `res1..5`
as ResNet encoders, `backbone_output` (activated backbone feature at the output stride),
`feature_semantic` (the backbone output, or the first extra high-resolution feature when there
are extra stacks), `feature_panoptic` (the last activated high-resolution feature), and
`transformer_class_feature` / `transformer_mask_feature` [batch, N, global FFN channels]
(act(BN(Conv1D(memory)))).

Presets (`PRESETS`) are DeepLab2's MaX-DeepLab-S and -L (axial_resnet_instances.py).
"""

import keras
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import dual_path_block_group
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resized_fuse
from deeplab2_kmax.model.layers import stems

# Names DeepLab2 reserves for variables outside the ImageNet-pretrained backbone (they train at
# the full learning rate when backbone_learning_rate_multiplier != 1).
NON_BACKBONE_NAME_PARTS = ('transformer', 'extra', 'memory_feature')

# DeepLab2's MaX-DeepLab-S and -L (axial_resnet_instances.py); every key is a DualPathResNet
# argument and a DualPathOptions field of the same name.
PRESETS = {
    'max_deeplab_s': dict(
        backbone_type='resnet_beta', num_blocks=(3, 4, 6, 3), memory_channels=256,
        backbone_use_transformer_beyond_stride=32,
        extra_decoder_use_transformer_beyond_stride=32, backbone_decoder_num_stacks=0,
        backbone_decoder_blocks_per_stage=1, extra_decoder_num_stacks=0,
        extra_decoder_blocks_per_stage=1, base_transformer_expansion=1.0,
        global_feed_forward_network_channels=256, high_resolution_output_stride=4,
        use_axial_beyond_stride=16, attention_bottleneck_expansion=2, axial_key_expansion=1.0,
        axial_value_expansion=2.0, drop_path_beyond_stride=16, transformer_num_heads=8,
        transformer_bottleneck_expansion=2.0, transformer_key_expansion=1.0,
        transformer_value_expansion=2.0, transformer_ffn_channels=2048, activation='relu'),
}
PRESETS['max_deeplab_l'] = dict(
    PRESETS['max_deeplab_s'], backbone_type='wider_resnet', num_blocks=(3, 6, 3, 3),
    memory_channels=512, backbone_use_transformer_beyond_stride=16,
    extra_decoder_use_transformer_beyond_stride=16, backbone_decoder_num_stacks=1,
    extra_decoder_num_stacks=1, extra_decoder_blocks_per_stage=3, base_transformer_expansion=2.0,
    global_feed_forward_network_channels=512, attention_bottleneck_expansion=4,
    axial_key_expansion=2.0, axial_value_expansion=4.0, drop_path_beyond_stride=4)


def decoder_plan(output_stride, high_resolution_output_stride, backbone_decoder_num_stacks,
                 extra_decoder_num_stacks):
  """The hour-glass decoder's stages, as DeepLab2 walks them.

  Returns a list of dicts: index k (1-based), stride, in_backbone (the stage's ResizedFuse and
  its backbone block group are named without `_extra`), backbone_ends (the backbone output is
  taken after this stage's backbone block group), high_resolution (the stage ends at the
  high-resolution stride; its activated output is a high-resolution feature).
  """
  plan = []
  stack = 0
  in_backbone = backbone_decoder_num_stacks != 0
  going_down = True
  stride = output_stride
  total_stacks = backbone_decoder_num_stacks + extra_decoder_num_stacks
  while stack < total_stacks or stride > high_resolution_output_stride:
    stride = stride // 2 if going_down else stride * 2
    if stride == output_stride:
      stack += 1
      going_down = True
    backbone_ends = (stride == output_stride and stack == backbone_decoder_num_stacks
                     and in_backbone)
    plan.append(dict(index=len(plan) + 1, stride=stride, in_backbone=in_backbone,
                     backbone_ends=backbone_ends,
                     high_resolution=stride == high_resolution_output_stride))
    if backbone_ends:
      in_backbone = False
    if stride == high_resolution_output_stride:
      going_down = False
  return plan


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class DualPathResNet(normalization.NormLayerSerializable, keras.layers.Layer):
  """images [batch, height, width, 3] (scaled to [-1, 1]) -> endpoints dict (module docstring).

  Args: DeepLab2's AxialResNet arguments of the same names (see PRESETS and DualPathOptions in
  protos/model.proto), plus drop_path_keep_prob / drop_path_schedule (backbone options) and
  norm_layer (batch-norm factory).
  """

  def __init__(self, backbone_type='resnet_beta', num_blocks=(3, 4, 6, 3),
               backbone_layer_multiplier=1.0, width_multiplier=1.0, stem_width_multiplier=1.0,
               output_stride=16, use_axial_beyond_stride=16,
               backbone_use_transformer_beyond_stride=32,
               extra_decoder_use_transformer_beyond_stride=32, backbone_decoder_num_stacks=0,
               backbone_decoder_blocks_per_stage=1, extra_decoder_num_stacks=0,
               extra_decoder_blocks_per_stage=1, max_num_mask_slots=128, num_mask_slots=128,
               memory_channels=256, base_transformer_expansion=1.0,
               global_feed_forward_network_channels=256, high_resolution_output_stride=4,
               activation='relu', drop_path_keep_prob=1.0, drop_path_beyond_stride=16,
               drop_path_schedule='constant', attention_bottleneck_expansion=2,
               axial_key_expansion=1.0, axial_value_expansion=2.0, transformer_num_heads=8,
               transformer_bottleneck_expansion=2.0, transformer_key_expansion=1.0,
               transformer_value_expansion=2.0, transformer_ffn_channels=2048, norm_layer=None,
               **kwargs):
    super().__init__(**kwargs)
    if extra_decoder_blocks_per_stage <= 0:
      raise ValueError(f'extra_decoder_blocks_per_stage is {extra_decoder_blocks_per_stage}; '
                       'it must be positive.')
    if num_mask_slots > max_num_mask_slots:
      raise ValueError(f'num_mask_slots ({num_mask_slots}) exceeds max_num_mask_slots '
                       f'({max_num_mask_slots}).')
    if not (backbone_use_transformer_beyond_stride
            or extra_decoder_use_transformer_beyond_stride):
      raise ValueError('MaX-DeepLab needs dual-path transformers: set '
                       'backbone_use_transformer_beyond_stride or '
                       'extra_decoder_use_transformer_beyond_stride above 0.')
    self.backbone_type = backbone_type
    self.num_blocks = [int(n) for n in num_blocks]
    self.backbone_layer_multiplier = float(backbone_layer_multiplier)
    self.width_multiplier = float(width_multiplier)
    self.stem_width_multiplier = float(stem_width_multiplier)
    self.output_stride = int(output_stride)
    self.use_axial_beyond_stride = int(use_axial_beyond_stride)
    self.backbone_use_transformer_beyond_stride = int(backbone_use_transformer_beyond_stride)
    self.extra_decoder_use_transformer_beyond_stride = int(
        extra_decoder_use_transformer_beyond_stride)
    self.backbone_decoder_num_stacks = int(backbone_decoder_num_stacks)
    self.backbone_decoder_blocks_per_stage = int(backbone_decoder_blocks_per_stage)
    self.extra_decoder_num_stacks = int(extra_decoder_num_stacks)
    self.extra_decoder_blocks_per_stage = int(extra_decoder_blocks_per_stage)
    self.max_num_mask_slots = int(max_num_mask_slots)
    self.num_mask_slots = int(num_mask_slots)
    self.memory_channels = int(memory_channels)
    self.base_transformer_expansion = float(base_transformer_expansion)
    self.global_feed_forward_network_channels = int(global_feed_forward_network_channels)
    self.high_resolution_output_stride = int(high_resolution_output_stride)
    self.activation = activation
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.drop_path_beyond_stride = int(drop_path_beyond_stride)
    self.drop_path_schedule = drop_path_schedule
    self.attention_bottleneck_expansion = int(attention_bottleneck_expansion)
    self.axial_key_expansion = float(axial_key_expansion)
    self.axial_value_expansion = float(axial_value_expansion)
    self.transformer_num_heads = int(transformer_num_heads)
    self.transformer_bottleneck_expansion = float(transformer_bottleneck_expansion)
    self.transformer_key_expansion = float(transformer_key_expansion)
    self.transformer_value_expansion = float(transformer_value_expansion)
    self.transformer_ffn_channels = int(transformer_ffn_channels)
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._activation_fn = activations.get_activation(activation)
    policy = self.dtype_policy

    total_strides = [1, 2, 4, 8, 16]
    stage_strides = [2] * 5
    # Stage 1 (wide ResNets only) has 3 blocks; DeepLab2 floors the scaled counts.
    blocks_per_stage = [3] + [int(n * self.backbone_layer_multiplier) for n in self.num_blocks]
    filters = [int(round(s * 32 * self.width_multiplier)) for s in total_strides]
    if backbone_type == 'wider_resnet':
      filters[0] = int(round(32 * self.stem_width_multiplier))
    stem_channels = int(round(64 * self.stem_width_multiplier))
    if backbone_type == 'wider_resnet':
      self._stem = convolutions.Conv2DSame(stem_channels, 3, 'stem', strides=2, use_bias=False,
                                           use_bn=True, norm_layer=self.norm_layer,
                                           activation=None, dtype=policy)
      first_stage = 0
      stage_strides[0], total_strides[0] = 1, 2
    elif backbone_type == 'resnet_beta':
      self._stem = stems.InceptionStem(self.stem_width_multiplier, activation=activation,
                                       norm_layer=self.norm_layer, name='stem', dtype=policy)
      first_stage = 1
    elif backbone_type == 'resnet':
      self._stem = stems.conv_stem(stem_channels, self.norm_layer, dtype=policy)
      first_stage = 1
    else:
      raise ValueError(f'backbone_type "{backbone_type}" is not one of '
                       f'{dual_path_block_group.BACKBONE_TYPES}.')
    self._first_stage = first_stage

    self._stages = []
    for index in range(first_stage, 5):
      self._stages.append(self._block_group(
          f'stage{index + 1}', filters[index], blocks_per_stage[index], stage_strides[index],
          total_strides[index], self.backbone_use_transformer_beyond_stride,
          self.base_transformer_expansion * total_strides[index] / 16.0))
    self._stage5_extra = None
    if self.backbone_decoder_num_stacks == 0:
      self._stage5_extra = self._block_group(
          'stage5_extra', filters[-1], self.extra_decoder_blocks_per_stage, 1, 32,
          self.extra_decoder_use_transformer_beyond_stride, self.base_transformer_expansion)

    self._decoder_plan = decoder_plan(self.output_stride, self.high_resolution_output_stride,
                                      self.backbone_decoder_num_stacks,
                                      self.extra_decoder_num_stacks)
    self._fuses, self._backbone_groups, self._extra_groups = [], [], []
    for step in self._decoder_plan:
      index, stride = step['index'], step['stride']
      input_stride = 32 if stride == self.output_stride else stride
      channels = input_stride * 64 * self.width_multiplier
      expansion = self.base_transformer_expansion * stride / 16.0
      suffix = '' if step['in_backbone'] else '_extra'
      self._fuses.append(resized_fuse.ResizedFuse(
          int(round(channels)), activation=activation, norm_layer=self.norm_layer,
          name=f'decoder_stage{index}{suffix}_resized_fuse', dtype=policy))
      self._backbone_groups.append(None if not step['in_backbone'] else self._block_group(
          f'decoder_stage{index}', channels // 4, self.backbone_decoder_blocks_per_stage, 1,
          input_stride, self.backbone_use_transformer_beyond_stride, expansion))
      extra = not step['in_backbone'] or step['backbone_ends']
      self._extra_groups.append(None if not extra else self._block_group(
          f'decoder_stage{index}_extra', channels // 4, self.extra_decoder_blocks_per_stage, 1,
          input_stride, self.extra_decoder_use_transformer_beyond_stride, expansion))

    head_args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer,
                     activation=activation, dtype=policy)
    self._class_feature_extra = convolutions.Conv1D(
        self.global_feed_forward_network_channels, 'class_feature_extra', **head_args)
    self._mask_feature_extra = convolutions.Conv1D(
        self.global_feed_forward_network_channels, 'mask_feature_extra', **head_args)

  def _block_group(self, name, filters, num_blocks, original_resnet_stride,
                   original_resnet_input_stride, use_transformer_beyond_stride, expansion):
    plan = dual_path_block_group.block_plan(
        int(filters), num_blocks, original_resnet_stride, original_resnet_input_stride,
        output_stride=self.output_stride, backbone_type=self.backbone_type,
        use_axial_beyond_stride=self.use_axial_beyond_stride,
        use_transformer_beyond_stride=use_transformer_beyond_stride,
        attention_bottleneck_expansion=self.attention_bottleneck_expansion,
        drop_path_keep_prob=self.drop_path_keep_prob,
        drop_path_beyond_stride=self.drop_path_beyond_stride,
        drop_path_schedule=self.drop_path_schedule)
    transformer_args = dict(
        num_heads=self.transformer_num_heads,
        bottleneck_expansion=self.transformer_bottleneck_expansion,
        key_expansion=self.transformer_key_expansion,
        value_expansion=self.transformer_value_expansion,
        ffn_channels=self.transformer_ffn_channels)
    return dual_path_block_group.DualPathBlockGroup(
        plan, transformer_filters=int(128 * expansion), transformer_args=transformer_args,
        axial_key_expansion=self.axial_key_expansion,
        axial_value_expansion=self.axial_value_expansion, activation=self.activation,
        norm_layer=self.norm_layer, name=name, dtype=self.dtype_policy)

  def build(self, input_shape):
    self.memory_feature = self.add_weight(
        name='memory_feature', shape=(1, self.max_num_mask_slots, self.memory_channels),
        initializer=keras.initializers.TruncatedNormal(stddev=1.0))

  def call(self, inputs, training=None):
    memory = tf.cast(self.memory_feature[:, :self.num_mask_slots, :], self.compute_dtype)
    memory = tf.tile(memory, [tf.shape(inputs)[0], 1, 1])
    endpoints = {}
    x = self._stem(inputs, training=training)
    endpoints['stage1'] = x
    for index, stage in enumerate(self._stages):
      x, memory = stage((x, memory), training=training)
      endpoints[f'stage{index + self._first_stage + 1}'] = x
    for index in range(1, 6):
      endpoints[f'res{index}'] = self._activation_fn(endpoints[f'stage{index}'])
    backbone_output = endpoints['res5']
    if self._stage5_extra is not None:
      x, memory = self._stage5_extra((x, memory), training=training)

    # Features by stride; the output stride keeps only the latest (stage4 is overridden).
    by_stride = {min(2 ** s, self.output_stride): [endpoints[f'stage{s}']] for s in range(1, 5)}
    by_stride[self.output_stride] = [x]
    high_resolution = []
    for step, fuse, backbone_group, extra_group in zip(
        self._decoder_plan, self._fuses, self._backbone_groups, self._extra_groups):
      x = fuse([x] + by_stride[step['stride']][-2:], training=training)
      if backbone_group is not None:
        x, memory = backbone_group((x, memory), training=training)
      if step['backbone_ends']:
        backbone_output = self._activation_fn(x)
      if extra_group is not None:
        x, memory = extra_group((x, memory), training=training)
      by_stride[step['stride']].append(x)
      if step['high_resolution']:
        high_resolution.append(self._activation_fn(x))

    endpoints[common.ENDPOINT_TRANSFORMER_CLASS_FEATURE] = self._class_feature_extra(
        memory, training=training)
    endpoints[common.ENDPOINT_TRANSFORMER_MASK_FEATURE] = self._mask_feature_extra(
        memory, training=training)
    endpoints[common.ENDPOINT_FEATURE_PANOPTIC] = high_resolution[-1]
    endpoints[common.ENDPOINT_FEATURE_SEMANTIC] = (
        high_resolution[self.backbone_decoder_num_stacks] if self.extra_decoder_num_stacks
        else backbone_output)
    endpoints['backbone_output'] = backbone_output
    return endpoints

  def is_backbone_variable(self, variable):
    """Whether `variable` (one of this layer's) is part of the ImageNet-pretrainable backbone."""
    path = variable.path.split(f'{self.name}/', 1)[-1]
    return not any(part in path for part in NON_BACKBONE_NAME_PARTS)

  def get_config(self):
    config = super().get_config()
    for name in ('backbone_type', 'num_blocks', 'backbone_layer_multiplier',
                 'width_multiplier', 'stem_width_multiplier', 'output_stride',
                 'use_axial_beyond_stride', 'backbone_use_transformer_beyond_stride',
                 'extra_decoder_use_transformer_beyond_stride', 'backbone_decoder_num_stacks',
                 'backbone_decoder_blocks_per_stage', 'extra_decoder_num_stacks',
                 'extra_decoder_blocks_per_stage', 'max_num_mask_slots', 'num_mask_slots',
                 'memory_channels', 'base_transformer_expansion',
                 'global_feed_forward_network_channels', 'high_resolution_output_stride',
                 'activation', 'drop_path_keep_prob', 'drop_path_beyond_stride',
                 'drop_path_schedule', 'attention_bottleneck_expansion', 'axial_key_expansion',
                 'axial_value_expansion', 'transformer_num_heads',
                 'transformer_bottleneck_expansion', 'transformer_key_expansion',
                 'transformer_value_expansion', 'transformer_ffn_channels'):
      config[name] = getattr(self, name)
    config['norm_layer'] = normalization.norm_layer_config(self.norm_layer)
    return config
