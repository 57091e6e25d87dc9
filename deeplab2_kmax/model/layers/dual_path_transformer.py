"""MaX-DeepLab's dual-path transformer layer: a pixel path and a memory (mask-slot) path.

With pixels P (non-activated, [batch, height, width, Cp]) and memory M ([batch, N, Cm]), "BN0"
a BN whose gamma starts at 0 (every residual branch starts as the identity):
1. m = act(BN(Conv1D_b(M))); p = act(BN(Conv1D_b(act(P)))), b = bottleneck channels.
2. [q_m | k_m | v_m] = BN(Conv1D(m)); [q_p | k_p | v_p] = BN(Conv1D(p)).
3. Memory-to-pixel and memory-to-memory attention share one softmax: the memory queries q_m
   attend over the concatenated keys [k_p, k_m] and values [v_p, v_m] (a spatial softmax over
   height * width + N positions): M1 = act(M + drop(BN0(Conv1D_Cm(attention)))).
4. Feed-forward network on the memory: M2 = act(M1 + drop(BN0(Conv1D_Cm(act(BN(Conv1D_ffn(M1))))))).
5. Pixel-to-memory attention: the pixel queries q_p attend over the memory keys and values of
   step 2 (from the layer's *input* memory): P1 = P + drop(BN0(Conv1D_Cp(attention))).
Returns (P1 [batch, height, width, Cp] non-activated, M2 [batch, N, Cm]). Pixel-to-pixel
attention is the axial block that precedes the layer (dual_path_block_group.py). kMaX's layer
(transformer_decoder/kmax.py) replaces step 3's pixel half by k-means cross-attention.
"""

import keras
import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import attention_operation
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization


def split_heads(x, num_heads):
  """[batch, length, heads * depth] -> [batch, heads, length, depth]."""
  length = x.shape[1]
  x = tf.reshape(x, [-1, length, num_heads, x.shape[-1] // num_heads])
  return tf.transpose(x, [0, 2, 1, 3])


def value_heads(x, num_heads):
  """[batch, length, heads * depth] -> [batch, length, heads, depth] (AttentionOperation's)."""
  return tf.reshape(x, [-1, x.shape[1], num_heads, x.shape[-1] // num_heads])


def memory_feed_forward(memory, conv1_bn_act, conv2_bn, activation_fn, drop_path_mask=None,
                        training=None):
  """act(memory + drop(conv2_bn(conv1_bn_act(memory)))): the memory path's FFN residual.

  Shared by the dual-path and k-means layers, whose two Conv1Ds keep DeepLab2's names
  (`memory_ffn_conv1_bn_act`, `memory_ffn_conv2_bn`) as attributes of the layer itself.
  """
  ffn = conv2_bn(conv1_bn_act(memory, training=training), training=training)
  if drop_path_mask is not None:
    ffn = ffn * drop_path_mask
  return activation_fn(memory + ffn)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class DualPathTransformerLayer(normalization.NormLayerSerializable, keras.layers.Layer):
  """call((pixels, memory), training, drop_path_masks) -> (pixels, memory).

  pixels [batch, height, width, Cp] (non-activated), memory [batch, N, Cm].

  Args:
    filters: Base channels (DeepLab2: 128 * transformer expansion of the block group).
    num_heads: Attention heads.
    bottleneck_expansion, key_expansion, value_expansion: Bottleneck, total query/key and total
      value channels as multiples of `filters`.
    ffn_channels: Hidden channels of the memory feed-forward network.
    activation: Activation name (DeepLab2's MaX-DeepLab: relu).
    norm_layer: Batch-norm factory.
  """

  def __init__(self, filters=128, num_heads=8, bottleneck_expansion=2.0, key_expansion=1.0,
               value_expansion=2.0, ffn_channels=2048, activation='relu', norm_layer=None,
               **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.num_heads = int(num_heads)
    self.bottleneck_expansion = float(bottleneck_expansion)
    self.key_expansion = float(key_expansion)
    self.value_expansion = float(value_expansion)
    self.ffn_channels = int(ffn_channels)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._bottleneck = int(round(self.filters * self.bottleneck_expansion))
    self._key_depth = int(round(self.filters * self.key_expansion))
    self._value_depth = int(round(self.filters * self.value_expansion))
    if self._key_depth % self.num_heads or self._value_depth % self.num_heads:
      raise ValueError(f'DualPathTransformerLayer {self.name}: key channels {self._key_depth} '
                       f'and value channels {self._value_depth} must be multiples of '
                       f'num_heads {self.num_heads}.')
    self._activation_fn = activations.get_activation(activation)
    policy = self.dtype_policy
    bn_args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer, dtype=policy)
    # DeepLab2 initialises the q/k/v projections like a transformer without BN.
    qkv_init = keras.initializers.TruncatedNormal(stddev=self._bottleneck ** -0.5)
    qkv_channels = 2 * self._key_depth + self._value_depth
    self._memory_conv1_bn_act = convolutions.Conv1D(
        self._bottleneck, 'memory_conv1_bn_act', activation=activation, **bn_args)
    self._pixel_conv1_bn_act = convolutions.Conv1D(
        self._bottleneck, 'pixel_conv1_bn_act', activation=activation, **bn_args)
    self._memory_qkv_conv_bn = convolutions.Conv1D(
        qkv_channels, 'memory_qkv_conv_bn', activation=None, kernel_initializer=qkv_init,
        **bn_args)
    self._pixel_qkv_conv_bn = convolutions.Conv1D(
        qkv_channels, 'pixel_qkv_conv_bn', activation=None, kernel_initializer=qkv_init,
        **bn_args)
    self._memory_attention = attention_operation.AttentionOperation(
        activation=activation, norm_layer=self.norm_layer, name='memory_attention',
        dtype=policy)
    self._pixel_attention = attention_operation.AttentionOperation(
        activation=activation, norm_layer=self.norm_layer, name='pixel_attention',
        dtype=policy)
    self._bn_args = bn_args

  def build(self, input_shape):
    pixel_shape, memory_shape = input_shape
    zero_bn = dict(bn_gamma_initializer='zeros', activation=None, **self._bn_args)
    self._memory_conv3_bn = convolutions.Conv1D(int(memory_shape[-1]), 'memory_conv3_bn',
                                                **zero_bn)
    self._memory_ffn_conv1_bn_act = convolutions.Conv1D(
        self.ffn_channels, 'memory_ffn_conv1_bn_act', activation=self.activation,
        **self._bn_args)
    self._memory_ffn_conv2_bn = convolutions.Conv1D(int(memory_shape[-1]),
                                                    'memory_ffn_conv2_bn', **zero_bn)
    self._pixel_conv3_bn = convolutions.Conv1D(int(pixel_shape[-1]), 'pixel_conv3_bn',
                                               **zero_bn)

  def _split_qkv(self, qkv):
    query, key, value = tf.split(qkv, [self._key_depth, self._key_depth, self._value_depth],
                                 axis=-1)
    return (split_heads(query, self.num_heads), split_heads(key, self.num_heads),
            value_heads(value, self.num_heads))

  def call(self, inputs, training=None, drop_path_masks=None):
    """drop_path_masks: None, or [pixel, memory attention, memory FFN] masks [batch, 1, 1]."""
    pixel_input, memory_input = inputs
    _, height, width, pixel_channels = pixel_input.shape
    pixel_flat = tf.reshape(pixel_input, [-1, height * width, pixel_channels])
    pixel_mask, memory_mask, ffn_mask = drop_path_masks or (None, None, None)

    memory = self._memory_conv1_bn_act(memory_input, training=training)
    pixels = inference_fusion.activation(pixel_flat, self.activation, training,
                                         self._activation_fn)
    pixels = self._pixel_conv1_bn_act(pixels, training=training)
    memory_query, memory_key, memory_value = self._split_qkv(
        self._memory_qkv_conv_bn(memory, training=training))
    pixel_query, pixel_key, pixel_value = self._split_qkv(
        self._pixel_qkv_conv_bn(pixels, training=training))

    # Memory-to-pixel and memory-to-memory attention under one softmax.
    attended = self._memory_attention(
        (memory_query, tf.concat([pixel_key, memory_key], axis=2),
         tf.concat([pixel_value, memory_value], axis=1)), training=training)
    attended = self._memory_conv3_bn(attended, training=training)
    if memory_mask is not None:
      attended = attended * memory_mask
    memory_output = self._activation_fn(memory_input + attended)

    memory_output = memory_feed_forward(memory_output, self._memory_ffn_conv1_bn_act,
                                        self._memory_ffn_conv2_bn, self._activation_fn,
                                        ffn_mask, training=training)

    # Pixel-to-memory attention reads the input memory's keys and values.
    retrieved = self._pixel_attention((pixel_query, memory_key, memory_value),
                                      training=training)
    retrieved = self._pixel_conv3_bn(retrieved, training=training)
    if pixel_mask is not None:
      retrieved = retrieved * pixel_mask
    pixel_output = tf.reshape(pixel_flat + retrieved, [-1, height, width, pixel_channels])
    return pixel_output, memory_output

  def get_config(self):
    config = super().get_config()
    config.update({
        'filters': self.filters, 'num_heads': self.num_heads,
        'bottleneck_expansion': self.bottleneck_expansion,
        'key_expansion': self.key_expansion, 'value_expansion': self.value_expansion,
        'ffn_channels': self.ffn_channels, 'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
