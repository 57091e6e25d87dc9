"""kMaX transformer decoder: cluster centers refined by k-means cross-attention.

Per layer, with pixel features P (non-activated, [batch, height, width, Cp]) and centers C
([batch, N, D]); "BN0" is a BN with gamma initialised to 0, so every residual branch starts
as the identity:
1. p = act(BN(Conv1D_D(act(P)))); c = act(BN(Conv1D_D(C))).
2. v = BN(Conv1D_value(p)); [q | k | v_c] = BN(Conv1D_{2 key + value}(c)).
3. Assignment: an auxiliary MaX head on (p, c) predicts mask logits [batch, h, w, N] (these
   predictions are the layer's auxiliary output); A = one_hot(argmax over the N clusters),
   without gradient.
4. Update: C1 = C + drop(BN0(Conv1D_D(BN(A^T v)))) (a sum of the assigned pixel values).
5. Self-attention over centers from the layer's *input* projections q, k, v_c of step 2 (as
   DeepLab2's code does, deeplab2 issue #157): C2 = C1 + drop(BN0(Conv1D_D(attention))).
6. C3 = act(C2); C4 = act(C3 + drop(BN0(Conv1D_D(act(BN(Conv1D_ffn(C3))))))).
After all layers the class and mask embeddings are act(BN(Conv1D_D(C))).
"""

import keras
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model import recompute
from deeplab2_kmax.model.heads import max_head
from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import attention_operation
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.model.layers import dual_path_transformer
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import segment_sum


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class KMaXTransformerLayer(normalization.NormLayerSerializable, keras.layers.Layer):
  """call((pixel_feature, centers)) -> (new centers [batch, N, D], auxiliary prediction dict).

  pixel_feature [batch, height, width, Cp] (non-activated), centers [batch, N, D].

  Args:
    channels: Center (and pixel-bottleneck) channels D.
    num_heads, key_channels, value_channels: Self-attention sizes (over all heads).
    ffn_channels: Hidden width of the center FFN.
    drop_path_keep_prob: Stochastic-depth keep probability of the three residual branches.
    auxiliary_head_args: kwargs of the per-layer MaXHead (pixel_head_channels,
      embedding_channels, num_classes, head_conv_type).
    activation: Activation name (gelu).
    norm_layer: Batch-norm factory.
  """

  def __init__(self, channels=256, num_heads=8, key_channels=128, value_channels=256,
               ffn_channels=2048, drop_path_keep_prob=1.0, auxiliary_head_args=None,
               activation='gelu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    self.channels = int(channels)
    self.num_heads = int(num_heads)
    self.key_channels = int(key_channels)
    self.value_channels = int(value_channels)
    self.ffn_channels = int(ffn_channels)
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.auxiliary_head_args = dict(auxiliary_head_args or {})
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._activation_fn = activations.get_activation(activation)
    policy = self.dtype_policy
    bn_args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer, dtype=policy)
    self._memory_conv1_bn_act = convolutions.Conv1D(
        self.channels, 'memory_conv1_bn_act', activation=activation, **bn_args)
    self._pixel_conv1_bn_act = convolutions.Conv1D(
        self.channels, 'pixel_conv1_bn_act', activation=activation, **bn_args)
    self._memory_qkv_conv_bn = convolutions.Conv1D(
        2 * self.key_channels + self.value_channels, 'memory_qkv_conv_bn', activation=None,
        **bn_args)
    self._pixel_v_conv_bn = convolutions.Conv1D(
        self.value_channels, 'pixel_v_conv_bn', activation=None, **bn_args)
    self._memory_attention = attention_operation.AttentionOperation(
        activation=activation, norm_layer=self.norm_layer, name='memory_attention',
        dtype=policy)
    self._memory_conv3_bn = convolutions.Conv1D(
        self.channels, 'memory_conv3_bn', bn_gamma_initializer='zeros', activation=None,
        **bn_args)
    self._memory_ffn_conv1_bn_act = convolutions.Conv1D(
        self.ffn_channels, 'memory_ffn_conv1_bn_act', activation=activation, **bn_args)
    self._memory_ffn_conv2_bn = convolutions.Conv1D(
        self.channels, 'memory_ffn_conv2_bn', bn_gamma_initializer='zeros', activation=None,
        **bn_args)
    self._kmeans_memory_batch_norm_retrieved_value = self.norm_layer(
        axis=-1, name='kmeans_memory_batch_norm_retrieved_value', dtype=policy)
    self._kmeans_memory_conv3_bn = convolutions.Conv1D(
        self.channels, 'kmeans_memory_conv3_bn', bn_gamma_initializer='zeros',
        activation=None, **bn_args)
    self._auxiliary_clustering_predictor = max_head.MaXHead(
        activation=activation, norm_layer=self.norm_layer,
        name='auxiliary_clustering_predictor', dtype=policy, **self.auxiliary_head_args)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    pixel_input, centers = inputs
    _, height, width, pixel_channels = pixel_input.shape
    num_centers = centers.shape[1]
    masks = [None, None, None]
    if training and self.drop_path_keep_prob < 1.0:
      masks = [drop_path.generate_drop_path_mask(centers, self.drop_path_keep_prob)
               for _ in range(3)]

    pixels = tf.reshape(pixel_input, [-1, height * width, pixel_channels])
    memory = self._memory_conv1_bn_act(centers, training=training)
    pixels = inference_fusion.activation(pixels, self.activation, training, self._activation_fn)
    pixels = self._pixel_conv1_bn_act(pixels, training=training)
    qkv = self._memory_qkv_conv_bn(memory, training=training)
    query, key, value = tf.split(
        qkv, [self.key_channels, self.key_channels, self.value_channels], axis=-1)
    query = dual_path_transformer.split_heads(query, self.num_heads)
    key = dual_path_transformer.split_heads(key, self.num_heads)
    value = dual_path_transformer.value_heads(value, self.num_heads)
    pixel_value = self._pixel_v_conv_bn(pixels, training=training)

    # k-means assignment: each pixel to its arg-max cluster (float32 argmax, no gradient).
    auxiliary = self._auxiliary_clustering_predictor({
        common.ENDPOINT_FEATURE_PANOPTIC: tf.reshape(pixels, [-1, height, width, self.channels]),
        common.ENDPOINT_TRANSFORMER_CLASS_FEATURE: memory,
        common.ENDPOINT_TRANSFORMER_MASK_FEATURE: memory,
    }, training=training)
    assignment = tf.argmax(auxiliary[common.PRED_PIXEL_SPACE_MASK_LOGITS], axis=-1,
                           output_type=tf.int32)
    # k-means update: sum (not mean) of the assigned pixel values, accumulated in float32.
    # DeepLab2 multiplies by the one-hot assignment (P x K x D multiply-adds); a segment sum
    # over the cluster indices adds the same values in P x D.
    kmeans = segment_sum.batched_segment_sum(
        tf.cast(pixel_value, tf.float32), tf.reshape(assignment, [-1, height * width]),
        num_centers)
    kmeans = self._kmeans_memory_batch_norm_retrieved_value(kmeans, training=training)
    kmeans = self._kmeans_memory_conv3_bn(kmeans, training=training)
    if masks[0] is not None:
      kmeans = kmeans * masks[0]
    output = centers + tf.cast(kmeans, centers.dtype)

    attended = self._memory_attention((query, key, value), training=training)
    attended = self._memory_conv3_bn(attended, training=training)
    if masks[1] is not None:
      attended = attended * masks[1]
    output = self._activation_fn(output + attended)

    output = dual_path_transformer.memory_feed_forward(
        output, self._memory_ffn_conv1_bn_act, self._memory_ffn_conv2_bn, self._activation_fn,
        masks[2], training=training)
    return output, auxiliary

  def get_config(self):
    config = super().get_config()
    config.update({
        'channels': self.channels, 'num_heads': self.num_heads,
        'key_channels': self.key_channels, 'value_channels': self.value_channels,
        'ffn_channels': self.ffn_channels, 'drop_path_keep_prob': self.drop_path_keep_prob,
        'auxiliary_head_args': self.auxiliary_head_args, 'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class KMaXTransformerDecoder(normalization.NormLayerSerializable, keras.layers.Layer):
  """call(endpoints) -> endpoints + transformer features and auxiliary predictions.

  Reads `decoder_stage{i}` at stride 32 / 2^(i-1) for the layers at that stride,
  `decoder_output` and `stage5`. Adds `transformer_class_feature` and
  `transformer_mask_feature` [batch, N, D], `feature_panoptic` (= decoder_output),
  `feature_semantic` (= stage5) and `auxiliary_outputs_pred`: a tuple with one MaX-head
  prediction dict per layer (at the layer's stride, not resized).

  Args:
    num_cluster_centers: N.
    num_blocks: Layers per stride.
    strides: Feature strides of the layer groups (DeepLab2: 32, 16, 8).
    channels, num_heads, key_channels, value_channels, ffn_channels: Layer sizes.
    drop_path_keep_prob: Stochastic depth of every layer's residual branches.
    auxiliary_head_args: kwargs of each layer's auxiliary MaXHead.
    activation: Activation name (gelu).
    norm_layer: Batch-norm factory.
  """

  def __init__(self, num_cluster_centers=128, num_blocks=(2, 2, 2), strides=(32, 16, 8),
               channels=256, num_heads=8, key_channels=128, value_channels=256,
               ffn_channels=2048, drop_path_keep_prob=1.0, auxiliary_head_args=None,
               activation='gelu', norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    if len(num_blocks) != len(strides):
      raise ValueError('num_blocks and strides need the same length.')
    self.num_cluster_centers = int(num_cluster_centers)
    self.num_blocks = [int(n) for n in num_blocks]
    self.strides = [int(s) for s in strides]
    self.channels = int(channels)
    self.num_heads = int(num_heads)
    self.key_channels = int(key_channels)
    self.value_channels = int(value_channels)
    self.ffn_channels = int(ffn_channels)
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.auxiliary_head_args = dict(auxiliary_head_args or {})
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    policy = self.dtype_policy
    self._layer_strides = []
    self._kmax_decoder = []
    for stride, count in zip(self.strides, self.num_blocks):
      for _ in range(count):
        self._kmax_decoder.append(self._make_layer(
            len(self._kmax_decoder), channels=self.channels, num_heads=self.num_heads,
            key_channels=self.key_channels, value_channels=self.value_channels,
            ffn_channels=self.ffn_channels, drop_path_keep_prob=self.drop_path_keep_prob,
            auxiliary_head_args=self.auxiliary_head_args, activation=activation,
            norm_layer=self.norm_layer, dtype=policy))
        self._layer_strides.append(stride)
    conv_args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer,
                     activation=activation, dtype=policy)
    self._class_embedding_projection = convolutions.Conv1D(
        self.channels, 'class_embedding_projection', **conv_args)
    self._mask_embedding_projection = convolutions.Conv1D(
        self.channels, 'mask_embedding_projection', **conv_args)
    # trainer_options.recompute "transformer_decoder": each layer's activations are
    # recomputed in the backward pass (model/recompute.py); not part of the config.
    self.recompute_layers = False

  def _make_layer(self, index, **layer_args):
    """The decoder's layer `index`; subclasses (CMT) return their own layer type."""
    return KMaXTransformerLayer(name=f'kmax_decoder_{index}', **layer_args)

  def build(self, input_shape):
    self.cluster_centers = self.add_weight(
        name='cluster_centers', shape=(1, self.num_cluster_centers, self.channels),
        initializer=keras.initializers.TruncatedNormal(stddev=1.0))

  def initial_centers(self, endpoints):
    """The learned centers tiled over the batch: [batch, N, D]."""
    first = endpoints[common.decoder_stage_endpoint(self._layer_strides[0])]
    return tf.tile(tf.cast(self.cluster_centers, self.compute_dtype),
                   [tf.shape(first)[0], 1, 1])

  def call(self, endpoints, training=None):
    endpoints = dict(endpoints)
    centers = self.initial_centers(endpoints)
    auxiliary_outputs = []
    for layer, stride in zip(self._kmax_decoder, self._layer_strides):
      centers, auxiliary = self.call_layer(
          layer, (endpoints[common.decoder_stage_endpoint(stride)], centers), training)
      auxiliary_outputs.append(auxiliary)
    return self.finish(endpoints, centers, auxiliary_outputs, training=training)

  def call_layer(self, layer, inputs, training):
    """layer(inputs), recomputed in the backward pass with recompute_layers (in training)."""
    if training and self.recompute_layers and layer.built:
      return recompute.call(lambda x: layer(x, training=True), inputs)
    return layer(inputs, training=training)

  def finish(self, endpoints, centers, auxiliary_outputs, training=None):
    """Adds the class/mask embeddings of the final centers and the head inputs."""
    endpoints[common.ENDPOINT_TRANSFORMER_CLASS_FEATURE] = self._class_embedding_projection(
        centers, training=training)
    endpoints[common.ENDPOINT_TRANSFORMER_MASK_FEATURE] = self._mask_embedding_projection(
        centers, training=training)
    endpoints[common.ENDPOINT_FEATURE_PANOPTIC] = endpoints[common.ENDPOINT_DECODER_OUTPUT]
    endpoints[common.ENDPOINT_FEATURE_SEMANTIC] = endpoints['stage5']
    endpoints[common.PRED_AUXILIARY_OUTPUTS] = tuple(auxiliary_outputs)
    return endpoints

  def get_config(self):
    config = super().get_config()
    config.update({
        'num_cluster_centers': self.num_cluster_centers, 'num_blocks': self.num_blocks,
        'strides': self.strides, 'channels': self.channels, 'num_heads': self.num_heads,
        'key_channels': self.key_channels, 'value_channels': self.value_channels,
        'ffn_channels': self.ffn_channels, 'drop_path_keep_prob': self.drop_path_keep_prob,
        'auxiliary_head_args': self.auxiliary_head_args, 'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
