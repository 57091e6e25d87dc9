"""DeepLab2's ResNet-50 and Axial-ResNet-50 (MaX-S with GELU) pixel encoders for kMaX.

ResNet-50 (DeepLab2's variant): 7x7/2 conv stem with BN and no max-pool; stages of 3, 4, 6, 3
bottlenecks with base filters 64, 128, 256, 512 (outputs 4x); every stage strides by 2 in the
3x3 conv of its first block. ReLU.

Axial-ResNet-50: the Inception stem (128 channels), the same stages, but blocks whose original
ResNet stride is >= 16 use axial attention (stage 4 blocks 2..6 and all of stage 5; stage 4's
strided first block stays a conv bottleneck). GELU.

Endpoints: `stage1` (stem, stride 2) .. `stage5` (stride 32) are non-activated; `res1`..`res5`
are their activations. With crop k * 32 + 1, `stageN` is (crop - 1) / 2^N + 1 wide.
"""

import keras

from deeplab2_kmax.model import recompute
from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import blocks
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import stems

RESNET50_BLOCKS = (3, 4, 6, 3)
# Blocks with an original ResNet stride >= this use axial attention (Axial-ResNet).
AXIAL_BEYOND_STRIDE = 16
# Blocks with an original ResNet stride >= this get stochastic depth (DeepLab2's default).
DROP_PATH_BEYOND_STRIDE = 16


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class ResNet(normalization.NormLayerSerializable, keras.layers.Layer):
  """(Axial-)ResNet-50 returning a dict of endpoints from a [batch, height, width, 3] input.

  Args:
    backbone_type: 'resnet' (conv stem, conv bottlenecks, ReLU by default) or 'axial_resnet'
      (Inception stem, axial attention beyond stride 16, GELU by default).
    width_multiplier: Scales every stage's filters.
    stem_width_multiplier: Scales the stem's filters.
    layer_multiplier: Scales the number of blocks per stage.
    drop_path_keep_prob: Stochastic-depth keep probability of the last stage.
    drop_path_schedule: 'constant' or 'linear' (DeepLab2's kMaX encoders use 'linear').
    activation: Activation name; defaults by backbone_type.
    norm_layer: Batch-norm factory.
  """

  def __init__(self, backbone_type='resnet', width_multiplier=1.0, stem_width_multiplier=1.0,
               layer_multiplier=1.0, drop_path_keep_prob=1.0, drop_path_schedule='linear',
               activation=None, norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    if backbone_type not in ('resnet', 'axial_resnet'):
      raise ValueError(f'Unsupported backbone_type "{backbone_type}".')
    self.backbone_type = backbone_type
    self.width_multiplier = float(width_multiplier)
    self.stem_width_multiplier = float(stem_width_multiplier)
    self.layer_multiplier = float(layer_multiplier)
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.drop_path_schedule = drop_path_schedule
    if activation is None:
      activation = 'relu' if backbone_type == 'resnet' else 'gelu'
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._activation_fn = activations.get_activation(activation)
    policy = self.dtype_policy
    if backbone_type == 'resnet':
      self._stem = stems.conv_stem(int(round(64 * self.stem_width_multiplier)),
                                   self.norm_layer, dtype=policy)
    else:
      self._stem = stems.InceptionStem(self.stem_width_multiplier, activation=activation,
                                       norm_layer=self.norm_layer, name='stem', dtype=policy)
    self._stages = []
    for index, num_blocks in enumerate(RESNET50_BLOCKS):
      input_stride = 2 ** (index + 1)
      num_blocks = max(1, int(round(num_blocks * self.layer_multiplier)))
      block_type, keep_probs = [], []
      for block_index in range(num_blocks):
        # DeepLab2 decides per block by its "original ResNet stride": the input stride for the
        # first (strided) block, twice that afterwards.
        current_stride = input_stride if block_index == 0 else 2 * input_stride
        axial = backbone_type == 'axial_resnet' and current_stride >= AXIAL_BEYOND_STRIDE
        block_type.append('axial' if axial else 'bottleneck')
        keep_probs.append(self._keep_prob(current_stride))
      if len(set(block_type)) == 1:
        group_type = block_type[0]
      else:
        group_type = 'axial_after_first'
      self._stages.append(blocks.BlockGroup(
          int(round(input_stride * 32 * self.width_multiplier)), num_blocks, strides=2,
          block_type=group_type, drop_path_keep_prob=keep_probs, activation=activation,
          norm_layer=self.norm_layer, name=f'stage{index + 2}', dtype=policy))
    # trainer_options.recompute "encoder": each stage's activations are recomputed in the
    # backward pass (model/recompute.py); a training option, not part of the config.
    self.recompute_stages = False

  def _keep_prob(self, current_stride):
    if current_stride < DROP_PATH_BEYOND_STRIDE:
      return 1.0
    if self.drop_path_schedule == 'linear':
      stage = int(round(math_log2(current_stride))) - 1
      return drop_path.linear_keep_prob(self.drop_path_keep_prob, stage)
    return self.drop_path_keep_prob

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    endpoints = {}
    x = self._stem(inputs, training=training)
    endpoints['stage1'] = x
    for index, stage in enumerate(self._stages):
      if training and self.recompute_stages and stage.built:
        x = recompute.call(lambda y, stage=stage: stage(y, training=True), x)
      else:
        x = stage(x, training=training)
      endpoints[f'stage{index + 2}'] = x
    for index in range(1, 6):
      endpoints[f'res{index}'] = inference_fusion.activation(
          endpoints[f'stage{index}'], self.activation, training, self._activation_fn)
    return endpoints

  def get_config(self):
    config = super().get_config()
    config.update({
        'backbone_type': self.backbone_type, 'width_multiplier': self.width_multiplier,
        'stem_width_multiplier': self.stem_width_multiplier,
        'layer_multiplier': self.layer_multiplier,
        'drop_path_keep_prob': self.drop_path_keep_prob,
        'drop_path_schedule': self.drop_path_schedule, 'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config


def math_log2(value):
  return value.bit_length() - 1


def resnet50(**kwargs):
  """DeepLab2's kMaX ResNet-50 (23,508,032 trainable parameters at width 1)."""
  return ResNet(backbone_type='resnet', **kwargs)


def axial_resnet50(**kwargs):
  """DeepLab2's kMaX Axial-ResNet-50 = MaX-S with GELU (41,343,424 trainable parameters)."""
  return ResNet(backbone_type='axial_resnet', **kwargs)
