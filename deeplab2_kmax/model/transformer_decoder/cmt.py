"""CMT-DeepLab transformer decoder: cluster centers and pixel features refined by clustering.

CMT-DeepLab (Yu et al., CVPR 2022) has no public code; the paper's equations could not be read
(../shared/reference/cmt-deeplab-paper.md §0), so this layer is a reconstruction from the
abstract, the authors' blog and deeplab2 issue #119. Choices the sources leave open are marked
[choice] and listed with their reasons in docs/cmt.md.

Per layer, with pixel features P ([batch, height, width, Cp], non-activated), centers C
([batch, N, D]) and "BN0" a BN with gamma initialised to 0 (every residual branch starts as the
identity):
1. Projections: p = act(BN(Conv1D_D([act(P) ; Y ; X]))), c = act(BN(Conv1D_D(C))), where
   (Y, X) are coordinate channels in [-1, 1] on the layer's grid (coordinate convolution, when
   use_coordinate_features) [choice: coordinates enter the pixel projection and the pixel update].
2. [q | k | v_c] = BN(Conv1D(c)) (queries, keys, values of the centers) and
   [k_p | v_p] = BN(Conv1D(p)) (keys and values of the pixels).
3. Pixel-cluster assignment: an auxiliary MaX head on (p, c) predicts mask logits L
   [batch, h, w, N] (the layer's auxiliary output, deeply supervised as in kMaX). With reference
   masks, each center predicts a 2D Gaussian R_j on the grid (centre tanh(.), scale in
   (0.02, 2.02), from an MLP on c) and L <- L + beta * log(R + 1e-6) with a learnable scalar beta
   initialised to 0 [choice: location enters the assignment as a prior that starts switched
   off]. A = softmax of L over the **cluster** axis: every pixel's assignment sums to 1 over the
   N centers. The gradient flows through A unless stop_gradient_assignment.
4. Center update, two parallel residual branches from the same input (the clustering term is
   "complementary" to the original cross-attention, deeplab2 #119):
     clustering: BN0(Conv1D_D(BN(A^T v_p)))  (a sum of assigned pixel values, as in kMaX);
     attention: multi-head attention of q over the keys [k_p ; k] with one softmax over the
       h*w pixels and the N centers (MaX-DeepLab's memory-to-pixel + memory-to-memory), then
       BN0(Conv1D_D(.)).
   C2 = act(C + drop(clustering) + drop(attention)); C3 = act(C2 + drop(BN0(FFN(C2)))).
5. Pixel update (when update_pixel_features): P' = P + drop(BN0(Conv1D_Cp([A v_c ; Y ; X])))
   with the pre-update center values v_c, so each pixel moves towards the mixture of the
   centers it is assigned to.

The decoder runs the layers from stride 32 to 8 (kMaX's layout). [choice] A group's pixel
update reaches the next stride: the accumulated change of the pixel features is resized (align
corners) and added through BN0(Conv1D) to the next group's pixel features, and the last
group's change to `decoder_output`, which becomes `feature_panoptic`; so the updates reach the
final masks. All softmaxes and the sums over pixels run in float32.
"""

import keras
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.model.layers import dual_path_transformer
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resize
from deeplab2_kmax.model.transformer_decoder import kmax

# Reference-mask scale bounds in normalised coordinates ([-1, 1] spans the image).
_MIN_REFERENCE_SIGMA = 0.02
_REFERENCE_SIGMA_RANGE = 2.0
# log(R + eps) keeps the location prior finite where a Gaussian underflows.
_REFERENCE_PRIOR_EPSILON = 1e-6


# Constructor switches of the CMT layer and decoder (CMTDeepLabOptions fields of the same names).
CMT_SWITCHES = ('use_coordinate_features', 'update_pixel_features', 'use_reference_masks',
                'stop_gradient_assignment')


def coordinate_features(height, width):
  """float32 [height * width, 2]: (y, x) in [-1, 1] on a corner-aligned grid, row-major."""
  def axis(size):
    if size == 1:
      return tf.zeros([1], tf.float32)
    return tf.linspace(-1.0, 1.0, size)
  y, x = tf.meshgrid(axis(height), axis(width), indexing='ij')
  return tf.reshape(tf.stack([y, x], axis=-1), [height * width, 2])


def gaussian_reference_mask_logits(parameters, coordinates):
  """log R of per-center 2D Gaussians on a grid.

  Args:
    parameters: float32 [batch, N, 4]: raw (mu_y, mu_x, s_y, s_x); centres are tanh(mu), scales
      0.02 + 2 sigmoid(s).
    coordinates: float32 [pixels, 2] (y, x) from `coordinate_features`.

  Returns:
    float32 [batch, pixels, N]: -((y - mu_y)^2 / s_y^2 + (x - mu_x)^2 / s_x^2) / 2 (<= 0).
  """
  centre = tf.tanh(parameters[..., :2])
  sigma = _MIN_REFERENCE_SIGMA + _REFERENCE_SIGMA_RANGE * tf.sigmoid(parameters[..., 2:])
  offset = (coordinates[None, :, None, :] - centre[:, None, :, :]) / sigma[:, None, :, :]
  return -0.5 * tf.reduce_sum(tf.square(offset), axis=-1)


def pixel_cluster_assignment(mask_logits, reference_mask_logits=None, prior_scale=None):
  """The soft assignment A = softmax over clusters of L (+ beta log(R + eps)).

  Args:
    mask_logits: [batch, pixels, N] assignment logits.
    reference_mask_logits: optional float32 [batch, pixels, N], log R.
    prior_scale: scalar beta multiplying log(R + eps).

  Returns:
    float32 [batch, pixels, N]; each pixel's row sums to 1 over the N centers.
  """
  logits = tf.cast(mask_logits, tf.float32)
  if reference_mask_logits is not None:
    prior = tf.math.log(tf.exp(reference_mask_logits) + _REFERENCE_PRIOR_EPSILON)
    logits = logits + tf.cast(prior_scale, tf.float32) * prior
  return tf.nn.softmax(logits, axis=-1)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class CMTTransformerLayer(kmax.KMaXTransformerLayer):
  """call((pixel_feature, centers)) -> (centers, pixel_feature, auxiliary, assignment).

  pixel_feature [batch, height, width, Cp] (non-activated), centers [batch, N, D]. Returns the
  new centers [batch, N, D], the new pixel features [batch, height, width, Cp] (the input when
  update_pixel_features is off), the auxiliary prediction dict (MaX keys, plus
  `reference_mask_logits` [batch, height, width, N] = log R with reference masks) and the
  assignment A float32 [batch, height * width, N].

  Args (besides KMaXTransformerLayer's, which mean the same):
    use_coordinate_features: Concatenate (y, x) channels to the pixel projection and update.
    update_pixel_features: Update the pixel features from the centers.
    use_reference_masks: Per-center Gaussian reference masks and the location prior.
    stop_gradient_assignment: Stop the gradient through A.
  """

  def __init__(self, use_coordinate_features=True, update_pixel_features=True,
               use_reference_masks=True, stop_gradient_assignment=False, **kwargs):
    super().__init__(**kwargs)
    self.use_coordinate_features = bool(use_coordinate_features)
    self.update_pixel_features = bool(update_pixel_features)
    self.use_reference_masks = bool(use_reference_masks)
    self.stop_gradient_assignment = bool(stop_gradient_assignment)
    policy = self.dtype_policy
    bn_args = dict(use_bias=False, use_bn=True, norm_layer=self.norm_layer, dtype=policy)
    # kMaX has pixel values only; CMT's cross-attention also needs pixel keys.
    self._pixel_k_conv_bn = convolutions.Conv1D(
        self.key_channels, 'pixel_k_conv_bn', activation=None, **bn_args)
    self._pixel_update_conv_bn = None
    if self.use_reference_masks:
      self._reference_mask_mlp1_bn_act = convolutions.Conv1D(
          self.channels, 'reference_mask_mlp1_bn_act', activation=self.activation, **bn_args)
      self._reference_mask_mlp2 = convolutions.Conv1D(
          4, 'reference_mask_mlp2', use_bias=True, activation=None, dtype=policy)

  def build(self, input_shape):
    pixel_channels = input_shape[0][-1]
    if self.update_pixel_features:
      # Writes back into the pixel features, so its width is the input's.
      self._pixel_update_conv_bn = convolutions.Conv1D(
          pixel_channels, 'pixel_update_conv_bn', use_bias=False, use_bn=True,
          norm_layer=self.norm_layer, bn_gamma_initializer='zeros', activation=None,
          dtype=self.dtype_policy)
    if self.use_reference_masks:
      self.reference_mask_prior_scale = self.add_weight(
          name='reference_mask_prior_scale', shape=(), initializer='zeros', dtype='float32')

  def _maybe_add_coordinates(self, features, coordinates):
    if not self.use_coordinate_features:
      return features
    batch = tf.shape(features)[0]
    tiled = tf.tile(tf.cast(coordinates, features.dtype)[None], [batch, 1, 1])
    return tf.concat([features, tiled], axis=-1)

  def call(self, inputs, training=None):
    pixel_input, centers = inputs
    _, height, width, pixel_channels = pixel_input.shape
    num_centers = centers.shape[1]
    masks = [None] * 4
    if training and self.drop_path_keep_prob < 1.0:
      masks = [drop_path.generate_drop_path_mask(centers, self.drop_path_keep_prob)
               for _ in range(3)]
      masks.append(drop_path.generate_drop_path_mask(pixel_input, self.drop_path_keep_prob))
    coordinates = coordinate_features(height, width)

    flat_input = tf.reshape(pixel_input, [-1, height * width, pixel_channels])
    memory = self._memory_conv1_bn_act(centers, training=training)
    pixels = self._pixel_conv1_bn_act(
        self._maybe_add_coordinates(self._activation_fn(flat_input), coordinates),
        training=training)
    qkv = self._memory_qkv_conv_bn(memory, training=training)
    query, memory_key, memory_value = tf.split(
        qkv, [self.key_channels, self.key_channels, self.value_channels], axis=-1)
    pixel_key = self._pixel_k_conv_bn(pixels, training=training)
    pixel_value = self._pixel_v_conv_bn(pixels, training=training)

    auxiliary = dict(self._auxiliary_clustering_predictor({
        common.ENDPOINT_FEATURE_PANOPTIC: tf.reshape(pixels, [-1, height, width, self.channels]),
        common.ENDPOINT_TRANSFORMER_CLASS_FEATURE: memory,
        common.ENDPOINT_TRANSFORMER_MASK_FEATURE: memory,
    }, training=training))
    mask_logits = tf.reshape(auxiliary[common.PRED_PIXEL_SPACE_MASK_LOGITS],
                             [-1, height * width, num_centers])
    reference_logits = None
    if self.use_reference_masks:
      parameters = self._reference_mask_mlp2(
          self._reference_mask_mlp1_bn_act(memory, training=training))
      reference_logits = gaussian_reference_mask_logits(tf.cast(parameters, tf.float32),
                                                        coordinates)
      auxiliary[common.PRED_REFERENCE_MASK_LOGITS] = tf.reshape(
          reference_logits, [-1, height, width, num_centers])
    assignment = pixel_cluster_assignment(
        mask_logits, reference_logits,
        self.reference_mask_prior_scale if self.use_reference_masks else None)
    if self.stop_gradient_assignment:
      assignment = tf.stop_gradient(assignment)

    # Clustering term: sum of the pixel values assigned to each center, in float32.
    clustering = tf.einsum('blm,bld->bmd', assignment, tf.cast(pixel_value, tf.float32))
    clustering = self._kmeans_memory_batch_norm_retrieved_value(clustering, training=training)
    clustering = self._kmeans_memory_conv3_bn(clustering, training=training)
    if masks[0] is not None:
      clustering = clustering * masks[0]

    # Cross-attention over pixels and centers with one softmax (MaX's M2P + M2M).
    key = tf.concat([dual_path_transformer.split_heads(pixel_key, self.num_heads),
                     dual_path_transformer.split_heads(memory_key, self.num_heads)], axis=2)
    value = dual_path_transformer.value_heads(tf.concat([pixel_value, memory_value], axis=1),
                                              self.num_heads)
    attended = self._memory_attention(
        (dual_path_transformer.split_heads(query, self.num_heads), key, value),
        training=training)
    attended = self._memory_conv3_bn(attended, training=training)
    if masks[1] is not None:
      attended = attended * masks[1]
    output = self._activation_fn(centers + tf.cast(clustering, centers.dtype) + attended)

    output = dual_path_transformer.memory_feed_forward(
        output, self._memory_ffn_conv1_bn_act, self._memory_ffn_conv2_bn, self._activation_fn,
        masks[2], training=training)

    pixel_output = pixel_input
    if self.update_pixel_features:
      # Each pixel gathers the pre-update center values it is assigned to.
      gathered = tf.einsum('blm,bmd->bld', assignment, tf.cast(memory_value, tf.float32))
      update = self._pixel_update_conv_bn(
          self._maybe_add_coordinates(tf.cast(gathered, pixel_input.dtype), coordinates),
          training=training)
      update = tf.reshape(update, [-1, height, width, pixel_channels])
      if masks[3] is not None:
        update = update * masks[3]
      pixel_output = pixel_input + update
    return output, pixel_output, auxiliary, assignment

  def get_config(self):
    config = super().get_config()
    config.update({name: getattr(self, name) for name in CMT_SWITCHES})
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class CMTTransformerDecoder(kmax.KMaXTransformerDecoder):
  """call(endpoints) -> endpoints as KMaXTransformerDecoder's, from CMT layers.

  `feature_panoptic` is `decoder_output` plus the carried pixel updates (when
  update_pixel_features). Each auxiliary prediction dict also holds `reference_mask_logits`
  [batch, h, w, N] at the layer's stride (with reference masks).

  Args (besides KMaXTransformerDecoder's): the four CMT flags of CMTTransformerLayer.
  """

  def __init__(self, use_coordinate_features=True, update_pixel_features=True,
               use_reference_masks=True, stop_gradient_assignment=False, **kwargs):
    self.use_coordinate_features = bool(use_coordinate_features)
    self.update_pixel_features = bool(update_pixel_features)
    self.use_reference_masks = bool(use_reference_masks)
    self.stop_gradient_assignment = bool(stop_gradient_assignment)
    super().__init__(**kwargs)
    self._pixel_carry = {}

  def _make_layer(self, index, **layer_args):
    return CMTTransformerLayer(
        use_coordinate_features=self.use_coordinate_features,
        update_pixel_features=self.update_pixel_features,
        use_reference_masks=self.use_reference_masks,
        stop_gradient_assignment=self.stop_gradient_assignment,
        name=f'cmt_decoder_{index}', **layer_args)

  def build(self, input_shape):
    super().build(input_shape)
    if not self.update_pixel_features:
      return
    # One carry into every later stride group and one into decoder_output; their widths are
    # the pixel decoder's, known from the endpoint shapes.
    targets = {f'pixel_carry_to_stride{stride}': common.decoder_stage_endpoint(stride)
               for stride in dict.fromkeys(self._layer_strides[1:])
               if stride != self._layer_strides[0]}
    if self._layer_strides:
      targets['pixel_carry_to_output'] = common.ENDPOINT_DECODER_OUTPUT
    carries = {}
    for name, endpoint in targets.items():
      carries[name] = convolutions.Conv1D(
          input_shape[endpoint][-1], name, use_bias=False, use_bn=True,
          norm_layer=self.norm_layer, bn_gamma_initializer='zeros', activation=None,
          dtype=self.dtype_policy)
    self._pixel_carry = carries

  def _carry(self, name, change, target, training):
    """target + BN0(Conv1D(resize(change))): a pixel update carried to another stride."""
    _, height, width, channels = target.shape
    change = resize.resize_align_corners(change, (height, width))
    change = tf.reshape(change, [-1, height * width, change.shape[-1]])
    carried = self._pixel_carry[name](change, training=training)
    return target + tf.reshape(carried, [-1, height, width, channels])

  def call(self, endpoints, training=None):
    endpoints = dict(endpoints)
    centers = self.initial_centers(endpoints)
    auxiliary_outputs = []
    change = None  # accumulated pixel update of the previous stride group
    previous_stride = None
    pixels = start = None
    for layer, stride in zip(self._kmax_decoder, self._layer_strides):
      if stride != previous_stride:
        if pixels is not None:
          change = pixels - start
        pixels = endpoints[common.decoder_stage_endpoint(stride)]
        if change is not None:
          pixels = self._carry(f'pixel_carry_to_stride{stride}', change, pixels, training)
        start = pixels
        previous_stride = stride
      centers, pixels, auxiliary, _ = self.call_layer(layer, (pixels, centers), training)
      auxiliary_outputs.append(auxiliary)
    endpoints = self.finish(endpoints, centers, auxiliary_outputs, training=training)
    if self.update_pixel_features and pixels is not None:
      endpoints[common.ENDPOINT_FEATURE_PANOPTIC] = self._carry(
          'pixel_carry_to_output', pixels - start, endpoints[common.ENDPOINT_DECODER_OUTPUT],
          training)
    return endpoints

  def get_config(self):
    config = super().get_config()
    config.update({name: getattr(self, name) for name in CMT_SWITCHES})
    return config
