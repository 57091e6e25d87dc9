"""Axial attention with relative positional encodings (Axial-DeepLab, as in DeepLab2).

One `AxialAttention` attends along the length axis of [batch, length, channels]: a single qkv
projection (+ BN), similarity = BN over the stacked [q.k, q.r_q, k.r_k] terms with per-(term,
head) statistics, softmax over keys, retrieval = BN over the stacked [A.v, A.r_v] terms with
per-(term, head, channel) statistics, summed. There is no 1/sqrt(d) scaling: the BN replaces it.
`AxialAttention2D` applies it along the height then the width axis.

Relative positional encodings are tables of MAX_SPAN * 2 - 1 = 509 embeddings gathered by
relative distance. Only global attention (length <= query_shape = 129) is supported, as in
DeepLab2.
"""

import keras
import numpy as np
import tensorflow as tf

from deeplab2_kmax.model.layers import normalization

MAX_SPAN = 255


def relative_distance_matrix(query_length, key_length):
  """[query_length, key_length] int32 indices into the 2 * MAX_SPAN - 1 embedding table.

  Queries and keys are centred on each other; distances beyond MAX_SPAN share the last entry.
  """
  if (key_length - query_length) % 2:
    raise ValueError('key_length - query_length must be even.')
  key_index = np.arange(key_length)
  query_index = np.arange(query_length) + (key_length - query_length) // 2
  distance = key_index[None, :] - query_index[:, None] + MAX_SPAN - 1
  return np.clip(distance, 0, 2 * MAX_SPAN - 2).astype(np.int32)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class RelativePositionalEncoding(keras.layers.Layer):
  """A [2 * MAX_SPAN - 1, depth] table; call(distance_index [q, k] int32) -> [q, k, depth]."""

  def __init__(self, depth, initialization_std=1.0, **kwargs):
    super().__init__(**kwargs)
    self.depth = int(depth)
    self.initialization_std = float(initialization_std)

  def build(self, input_shape=None):
    self.embeddings = self.add_weight(
        name='embeddings', shape=(2 * MAX_SPAN - 1, self.depth),
        initializer=keras.initializers.TruncatedNormal(stddev=self.initialization_std))

  def call(self, distance_index):
    return tf.gather(self.embeddings, distance_index)

  def get_config(self):
    config = super().get_config()
    config.update({'depth': self.depth, 'initialization_std': self.initialization_std})
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class AxialAttention(normalization.NormLayerSerializable, keras.layers.Layer):
  """Global 1-D multi-head attention with relative positional encodings.

  Input [batch, length, channels]; output [batch, length, total_value_depth].

  Args:
    total_key_depth: Query/key channels over all heads.
    total_value_depth: Value channels over all heads.
    num_heads: Number of heads.
    query_shape: Largest supported length (global attention only).
    norm_layer: Batch-norm factory.
    initialization_std_for_query_key_rpe, initialization_std_for_value_rpe: RPE init std.
  """

  def __init__(self, total_key_depth, total_value_depth, num_heads=8, query_shape=129,
               norm_layer=None, initialization_std_for_query_key_rpe=1.0,
               initialization_std_for_value_rpe=1.0, **kwargs):
    super().__init__(**kwargs)
    if total_key_depth % num_heads or total_value_depth % num_heads:
      raise ValueError('Key and value depths must be divisible by num_heads.')
    self.total_key_depth = int(total_key_depth)
    self.total_value_depth = int(total_value_depth)
    self.num_heads = int(num_heads)
    self.query_shape = int(query_shape)
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.initialization_std_for_query_key_rpe = float(initialization_std_for_query_key_rpe)
    self.initialization_std_for_value_rpe = float(initialization_std_for_value_rpe)
    self._key_depth_per_head = self.total_key_depth // self.num_heads
    self._value_depth_per_head = self.total_value_depth // self.num_heads
    policy = self.dtype_policy
    self._batch_norm_qkv = self.norm_layer(axis=-1, name='batch_norm_qkv', dtype=policy)
    # Statistics per (term, head) on [terms, batch, heads, length, length].
    self._batch_norm_similarity = self.norm_layer(axis=[0, 2], name='batch_norm_similarity',
                                                  dtype=policy)
    # Statistics per (term, head, channel) on [terms, batch, heads, length, depth].
    self._batch_norm_retrieved_output = self.norm_layer(
        axis=[0, 2, 4], name='batch_norm_retrieved_output', dtype=policy)
    self._query_rpe = RelativePositionalEncoding(
        self._key_depth_per_head, self.initialization_std_for_query_key_rpe, name='query_rpe',
        dtype=policy)
    self._key_rpe = RelativePositionalEncoding(
        self._key_depth_per_head, self.initialization_std_for_query_key_rpe, name='key_rpe',
        dtype=policy)
    self._value_rpe = RelativePositionalEncoding(
        self._value_depth_per_head, self.initialization_std_for_value_rpe, name='value_rpe',
        dtype=policy)

  def build(self, input_shape):
    length, channels = int(input_shape[1]), int(input_shape[2])
    if length > self.query_shape:
      raise NotImplementedError(
          f'Local axial attention is not implemented: length {length} > query_shape '
          f'{self.query_shape}; use a smaller crop or a larger output stride.')
    self.qkv_kernel = self.add_weight(
        name='qkv_kernel', shape=(channels, 2 * self.total_key_depth + self.total_value_depth),
        initializer=keras.initializers.TruncatedNormal(stddev=channels ** -0.5))
    # The inference path folds these BNs into einsums without calling them: build them here.
    self._batch_norm_similarity.build((3, None, self.num_heads, length, length))
    self._batch_norm_retrieved_output.build(
        (2, None, self.num_heads, length, self._value_depth_per_head))

  def call(self, inputs, training=None):
    length = inputs.shape[1]
    heads = self.num_heads
    qkv = self._project_qkv(inputs, training)
    query, key, value = tf.split(
        qkv, [self.total_key_depth, self.total_key_depth, self.total_value_depth], axis=-1)
    query = tf.transpose(tf.reshape(query, [-1, length, heads, self._key_depth_per_head]),
                         [0, 2, 1, 3])
    key = tf.transpose(tf.reshape(key, [-1, length, heads, self._key_depth_per_head]),
                       [0, 2, 1, 3])
    value = tf.reshape(value, [-1, length, heads, self._value_depth_per_head])

    distance_index = tf.constant(relative_distance_matrix(length, length))
    query_rpe = tf.cast(self._query_rpe(distance_index), query.dtype)
    key_rpe = tf.cast(self._key_rpe(distance_index), query.dtype)
    value_rpe = tf.cast(self._value_rpe(distance_index), query.dtype)
    if training:
      retrieved = self._attend_with_batch_statistics(query, key, value, query_rpe, key_rpe,
                                                     value_rpe)
    else:
      retrieved = self._attend_folded(query, key, value, query_rpe, key_rpe, value_rpe)
    retrieved = tf.transpose(retrieved, [0, 2, 1, 3])
    return tf.reshape(retrieved, [-1, length, self.total_value_depth])

  def _project_qkv(self, inputs, training):
    """[batch, length, channels] -> BN'd [batch, length, 2 * key depth + value depth]."""
    length, channels = inputs.shape[1], inputs.shape[2]
    batch = inputs.shape[0]
    outputs = None if batch is None else batch * length * self.qkv_kernel.shape[1]
    if (training or not self._batch_norm_qkv.built or outputs is None
        or 2 * self.qkv_kernel.shape[0] * self.qkv_kernel.shape[1] >= outputs):
      qkv = tf.einsum('nlc,cd->nld', inputs, self.qkv_kernel)
      return self._batch_norm_qkv(qkv, training=training)
    # Inference on a long enough input: the BN scales the kernel's columns (cheaper than a
    # pass over the output) and its offset becomes a bias, fused into the matmul by Grappler.
    # Under mixed precision the kernel is read in bfloat16, so it is rounded once more.
    scale, offset = self._batch_norm_qkv.inference_scale_offset()
    kernel = tf.cast(self.qkv_kernel * scale, inputs.dtype)
    qkv = tf.nn.bias_add(tf.matmul(tf.reshape(inputs, [-1, channels]), kernel),
                         tf.cast(offset, inputs.dtype))
    return tf.reshape(qkv, [-1, length, kernel.shape[1]])

  def _attend_with_batch_statistics(self, query, key, value, query_rpe, key_rpe, value_rpe):
    """Training: DeepLab2's stacked terms, each BN'd with batch statistics per (term, head)."""
    similarity = tf.stack([
        tf.einsum('bhld,bhmd->bhlm', query, key),
        tf.einsum('bhld,lmd->bhlm', query, query_rpe),
        tf.einsum('bhmd,lmd->bhlm', key, key_rpe),
    ])
    similarity = self._batch_norm_similarity(similarity, training=True)
    similarity = tf.reduce_sum(tf.cast(similarity, tf.float32), axis=0)
    # Softmax over keys in float32: bfloat16 exponentials of BN-scaled logits saturate.
    weights = tf.cast(tf.nn.softmax(similarity, axis=-1), query.dtype)
    retrieved = tf.stack([
        tf.einsum('bhlm,bmhd->bhld', weights, value),
        tf.einsum('bhlm,lmd->bhld', weights, value_rpe),
    ])
    retrieved = self._batch_norm_retrieved_output(retrieved, training=True)
    return tf.reduce_sum(retrieved, axis=0)

  def _attend_folded(self, query, key, value, query_rpe, key_rpe, value_rpe):
    """Inference: the same function with both BNs folded into the einsum operands.

    With moving statistics each BN is affine per (term, head[, channel]). The similarity
    offsets are constant along the key axis, so the softmax ignores them; the scales multiply
    the query / key of each term. The retrieval BN scales each term's output per (head,
    channel) and adds one offset. No stacked [terms, ...] tensor is materialised.
    """
    dtype = query.dtype
    sim_scale, _ = self._batch_norm_similarity.inference_scale_offset()  # [3, 1, H, 1, 1]
    sim_scale = tf.cast(sim_scale, dtype)
    similarity = (
        tf.einsum('bhld,bhmd->bhlm', query * sim_scale[0], key)
        + tf.einsum('bhld,lmd->bhlm', query * sim_scale[1], query_rpe)
        + tf.einsum('bhmd,lmd->bhlm', key * sim_scale[2], key_rpe))
    weights = tf.cast(tf.nn.softmax(tf.cast(similarity, tf.float32), axis=-1), dtype)
    out_scale, out_offset = self._batch_norm_retrieved_output.inference_scale_offset()
    out_scale = tf.cast(out_scale, dtype)  # [2, 1, H, 1, D]
    value_scale = tf.transpose(out_scale[0], [0, 2, 1, 3])  # [1, 1, H, D] for [b, m, h, d]
    retrieved = (tf.einsum('bhlm,bmhd->bhld', weights, value * value_scale)
                 + tf.einsum('bhlm,lmd->bhld', weights, value_rpe) * out_scale[1])
    return retrieved + tf.cast(tf.reduce_sum(out_offset, axis=0), dtype)

  def get_config(self):
    config = super().get_config()
    config.update({
        'total_key_depth': self.total_key_depth, 'total_value_depth': self.total_value_depth,
        'num_heads': self.num_heads, 'query_shape': self.query_shape,
        'initialization_std_for_query_key_rpe': self.initialization_std_for_query_key_rpe,
        'initialization_std_for_value_rpe': self.initialization_std_for_value_rpe,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class AxialAttention2D(normalization.NormLayerSerializable, keras.layers.Layer):
  """Height-axis then width-axis axial attention on [batch, height, width, channels].

  Output [batch, height / strides, width / strides, filters * value_expansion]; a stride
  subsamples after each axis, as DeepLab2 does.
  """

  def __init__(self, filters, strides=1, key_expansion=1, value_expansion=2, num_heads=8,
               query_shape=129, norm_layer=None, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.strides = int(strides)
    self.key_expansion = float(key_expansion)
    self.value_expansion = float(value_expansion)
    self.num_heads = int(num_heads)
    self.query_shape = int(query_shape)
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self._total_key_depth = int(round(self.filters * self.key_expansion))
    self._total_value_depth = int(round(self.filters * self.value_expansion))
    common_args = dict(total_key_depth=self._total_key_depth,
                       total_value_depth=self._total_value_depth, num_heads=self.num_heads,
                       query_shape=self.query_shape, norm_layer=self.norm_layer,
                       dtype=self.dtype_policy)
    self._height_axis = AxialAttention(name='height_axis', **common_args)
    self._width_axis = AxialAttention(name='width_axis', **common_args)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    _, height, width, channels = inputs.shape
    x = tf.transpose(inputs, [0, 2, 1, 3])
    x = tf.reshape(x, [-1, height, channels])
    x = self._height_axis(x, training=training)
    x = tf.reshape(x, [-1, width, height, self._total_value_depth])
    x = tf.transpose(x, [0, 2, 1, 3])
    if self.strides > 1:
      x = x[:, ::self.strides, :, :]
    strided_height = x.shape[1]
    x = tf.reshape(x, [-1, width, self._total_value_depth])
    x = self._width_axis(x, training=training)
    x = tf.reshape(x, [-1, strided_height, width, self._total_value_depth])
    if self.strides > 1:
      x = x[:, :, ::self.strides, :]
    return x

  def get_config(self):
    config = super().get_config()
    config.update({
        'filters': self.filters, 'strides': self.strides, 'key_expansion': self.key_expansion,
        'value_expansion': self.value_expansion, 'num_heads': self.num_heads,
        'query_shape': self.query_shape,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
