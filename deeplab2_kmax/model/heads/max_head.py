"""The MaX-DeepLab prediction head (DeepLab2's decoder/max_deeplab.MaXDeepLab, panoptic part).

- pixel_space_head (ConvHead) -> pixel_space_feature_batch_norm -> L2 normalisation over
  channels = `pixel_space_normalized_feature` [batch, height, width, embedding].
- transformer_mask_head: 1x1 Conv1D + BN (no bias, no activation) on the mask features.
- `pixel_space_mask_logits` = BN(einsum(normalized feature, mask kernels)) with one shared
  gamma/beta for all slots (BN on an added channel axis, gamma initialised to 0.1: a low
  initial temperature) [batch, height, width, num_slots].
- transformer_class_head: Conv1D with bias on the class features, plus a constant bias
  log((C - 1) * 0.9 / 0.1) on the last (void) logit, so every slot starts as void with
  probability 0.9 = `transformer_class_logits` [batch, num_slots, C].

Outputs are float32 whatever the compute dtype; the normalisation and the mask-logit BN run in
float32.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model.heads import conv_head
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization

VOID_PRIOR_PROB = 0.9


def transformer_class_head_num_classes(semantic_output_channels, ignore_label):
  """Class-head width: the semantic classes, plus a void channel unless void is one of them."""
  if ignore_label >= semantic_output_channels:
    return semantic_output_channels + 1
  return semantic_output_channels


def void_bias(num_classes):
  return math.log((num_classes - 1) * VOID_PRIOR_PROB / (1 - VOID_PRIOR_PROB))


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class MaXHead(normalization.NormLayerSerializable, keras.layers.Layer):
  """call(features) -> {normalized feature, mask logits, class logits}.

  features: `feature_panoptic` [batch, height, width, channels], `transformer_class_feature`
  and `transformer_mask_feature` [batch, num_slots, channels].

  Args:
    pixel_head_channels: Channels of the pixel-space head's conv block (256).
    embedding_channels: Mask-embedding / pixel-feature dimension (128).
    num_classes: Class-head width including void.
    head_conv_type: 'depthwise_separable_conv' or 'standard_conv'.
    activation: Activation name (gelu).
    norm_layer: Batch-norm factory.
  """

  def __init__(self, pixel_head_channels, embedding_channels, num_classes,
               head_conv_type='depthwise_separable_conv', activation='gelu', norm_layer=None,
               **kwargs):
    super().__init__(**kwargs)
    self.pixel_head_channels = int(pixel_head_channels)
    self.embedding_channels = int(embedding_channels)
    self.num_classes = int(num_classes)
    self.head_conv_type = head_conv_type
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    policy = self.dtype_policy
    self._pixel_space_head = conv_head.ConvHead(
        self.pixel_head_channels, self.embedding_channels, conv_type=head_conv_type,
        activation=activation, norm_layer=self.norm_layer, name='pixel_space_head',
        dtype=policy)
    self._transformer_mask_head = convolutions.Conv1D(
        self.embedding_channels, 'transformer_mask_head', use_bias=False, use_bn=True,
        norm_layer=self.norm_layer, activation=None, dtype=policy)
    self._transformer_class_head = convolutions.Conv1D(
        self.num_classes, 'transformer_class_head', use_bias=True, use_bn=False,
        activation=None, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01),
        dtype=policy)
    self._pixel_space_feature_batch_norm = self.norm_layer(
        axis=-1, name='pixel_space_feature_batch_norm', dtype=policy)
    self._pixel_space_mask_batch_norm = self.norm_layer(
        axis=-1, name='pixel_space_mask_batch_norm',
        gamma_initializer=keras.initializers.Constant(0.1), dtype=policy)
    bias = [0.0] * self.num_classes
    bias[-1] = void_bias(self.num_classes)
    # A numpy array, not an eager tensor: traced graphs then embed it as a constant instead of
    # capturing an outside tensor, which exporters that freeze only variables (tf2onnx) would
    # turn into an extra model input.
    self._void_bias = np.asarray(bias, np.float32)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, features, training=None):
    pixel_feature = self._pixel_space_head(features[common.ENDPOINT_FEATURE_PANOPTIC],
                                           training=training)
    fused = (inference_fusion.is_active(training) and self._pixel_space_mask_batch_norm.built
             and self._pixel_space_feature_batch_norm.built)
    if fused:
      normalized = inference_fusion.affine_l2_normalize(
          pixel_feature, *self._pixel_space_feature_batch_norm.inference_scale_offset())
    else:
      pixel_feature = self._pixel_space_feature_batch_norm(pixel_feature, training=training)
      normalized = tf.math.l2_normalize(tf.cast(pixel_feature, tf.float32), axis=-1)

    class_logits = self._transformer_class_head(features[common.ENDPOINT_TRANSFORMER_CLASS_FEATURE])
    class_logits = tf.cast(class_logits, tf.float32) + self._void_bias

    mask_kernel = self._transformer_mask_head(features[common.ENDPOINT_TRANSFORMER_MASK_FEATURE],
                                              training=training)
    mask_logits = tf.einsum('bhwd,bid->bhwi', tf.cast(normalized, mask_kernel.dtype),
                            mask_kernel)
    if fused:
      # The BN has one channel: its affine broadcasts over the logits.
      mask_logits = inference_fusion.affine_to_float32(
          mask_logits, *self._pixel_space_mask_batch_norm.inference_scale_offset())
    else:
      mask_logits = self._pixel_space_mask_batch_norm(mask_logits[..., None], training=training)
      mask_logits = tf.cast(mask_logits[..., 0], tf.float32)
    return {
        common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE: normalized,
        common.PRED_PIXEL_SPACE_MASK_LOGITS: mask_logits,
        common.PRED_TRANSFORMER_CLASS_LOGITS: class_logits,
    }

  def get_config(self):
    config = super().get_config()
    config.update({
        'pixel_head_channels': self.pixel_head_channels,
        'embedding_channels': self.embedding_channels, 'num_classes': self.num_classes,
        'head_conv_type': self.head_conv_type, 'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
