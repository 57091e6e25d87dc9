"""The auxiliary semantic decoder and head of kMaX (DeepLab2's PanopticDeepLabSingleDecoder).

Decoder: ASPP on the high-level feature (`feature_semantic` = encoder stage5), then for each
low-level skip (ordered from low to high resolution, e.g. res3 then res2): 1x1 projection conv
(`low_level_conv{i}`, BN, act), align-corners upsampling of the running feature to the skip's
size, concatenation, and a 5x5 depthwise-separable fusion conv (`fusion_conv{i}`) to
decoder_channels. The head is a ConvHead to num_classes (`semantic_logits`).
"""

import keras
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model.heads import aspp
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resize


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class SemanticDecoder(normalization.NormLayerSerializable, keras.layers.Layer):
  """call(endpoints) -> [batch, h, w, decoder_channels] at the last low-level key's stride.

  Args:
    high_level_feature_key: Endpoint fed to the ASPP.
    low_level_feature_keys: Skip endpoints, low to high resolution.
    low_level_channels_project: Projection channels of each skip.
    aspp_channels, atrous_rates, aspp_use_only_1x1_proj_conv: ASPP options.
    decoder_channels: Fusion-conv channels.
    decoder_conv_type: 'depthwise_separable_conv' or 'standard_conv'.
    activation: Activation name (gelu in kMaX).
    norm_layer: Batch-norm factory.
  """

  def __init__(self, high_level_feature_key=common.ENDPOINT_FEATURE_SEMANTIC,
               low_level_feature_keys=('res3', 'res2'), low_level_channels_project=(64, 32),
               aspp_channels=256, atrous_rates=(6, 12, 18), aspp_use_only_1x1_proj_conv=False,
               decoder_channels=256, decoder_conv_type='depthwise_separable_conv',
               activation='gelu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    if len(low_level_feature_keys) != len(low_level_channels_project):
      raise ValueError('One projection width per low-level feature is needed.')
    self.high_level_feature_key = high_level_feature_key
    self.low_level_feature_keys = list(low_level_feature_keys)
    self.low_level_channels_project = [int(c) for c in low_level_channels_project]
    self.aspp_channels = int(aspp_channels)
    self.atrous_rates = [int(r) for r in atrous_rates]
    self.aspp_use_only_1x1_proj_conv = bool(aspp_use_only_1x1_proj_conv)
    self.decoder_channels = int(decoder_channels)
    self.decoder_conv_type = decoder_conv_type
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    policy = self.dtype_policy
    self._aspp = aspp.ASPP(self.aspp_channels, self.atrous_rates,
                           use_only_1x1_proj_conv=self.aspp_use_only_1x1_proj_conv,
                           activation=activation, norm_layer=self.norm_layer, name='aspp',
                           dtype=policy)
    self._low_level_convs = []
    self._fusion_convs = []
    for index, channels in enumerate(self.low_level_channels_project):
      self._low_level_convs.append(convolutions.Conv2DSame(
          channels, 1, f'low_level_conv{index + 1}', use_bias=False, use_bn=True,
          norm_layer=self.norm_layer, activation=activation, dtype=policy))
      self._fusion_convs.append(convolutions.StackedConv2DSame(
          1, self.decoder_channels, 5, f'fusion_conv{index + 1}',
          conv_type=decoder_conv_type, norm_layer=self.norm_layer, activation=activation,
          dtype=policy))

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, endpoints, training=None):
    x = self._aspp(endpoints[self.high_level_feature_key], training=training)
    for key, low_conv, fusion_conv in zip(self.low_level_feature_keys, self._low_level_convs,
                                          self._fusion_convs):
      low = low_conv(endpoints[key], training=training)
      x = resize.resize_align_corners(x, low.shape[1:3])
      x = fusion_conv(tf.concat([x, tf.cast(low, x.dtype)], axis=-1), training=training)
    return x

  def get_config(self):
    config = super().get_config()
    config.update({
        'high_level_feature_key': self.high_level_feature_key,
        'low_level_feature_keys': self.low_level_feature_keys,
        'low_level_channels_project': self.low_level_channels_project,
        'aspp_channels': self.aspp_channels, 'atrous_rates': self.atrous_rates,
        'aspp_use_only_1x1_proj_conv': self.aspp_use_only_1x1_proj_conv,
        'decoder_channels': self.decoder_channels, 'decoder_conv_type': self.decoder_conv_type,
        'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
