"""The kMaX-DeepLab meta-architecture as a Keras 3 model (also CMT-DeepLab's: same parts, CMT
transformer decoder).

images [batch, height, width, 3] in [0, 255] -> x / 127.5 - 1 -> pixel encoder -> kMaX pixel
decoder -> kMaX transformer decoder -> MaX head (+ auxiliary semantic decoder and head).

Outputs (DeepLab2's keys, all float32): `semantic_logits` [batch, h, w, classes] (when the
semantic head is used), `pixel_space_normalized_feature` [batch, h, w, embedding],
`pixel_space_mask_logits` [batch, h, w, N], `transformer_class_logits` [batch, N, classes],
and in training `auxiliary_outputs_pred`: one dict per transformer layer with the same three
MaX keys (CMT: plus `reference_mask_logits`), the dense ones resized (align corners) to the
final output size.

`set_recompute(parts)` (trainer_options.recompute) makes training-mode calls recompute the
activations of those parts in the backward pass instead of keeping them (model/recompute.py).
"""

import keras
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model import recompute
from deeplab2_kmax.model.layers import resize

_DENSE_AUXILIARY_KEYS = (common.PRED_PIXEL_SPACE_MASK_LOGITS,
                         common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE,
                         common.PRED_REFERENCE_MASK_LOGITS)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class KMaXDeepLab(keras.Model):
  """Composes the sub-networks; each is usable on its own (see their docstrings).

  Args:
    encoder: images -> endpoints dict (`stage1..5`, `res1..5`).
    pixel_decoder: endpoints -> endpoints + `decoder_stage*`, `decoder_output`.
    transformer_decoder: endpoints -> endpoints + transformer features, auxiliary outputs.
    predictor: MaX head on the transformer decoder's endpoints.
    semantic_decoder: Optional; endpoints -> semantic features (skipped when
      `feature_semantic` already has the panoptic resolution, as in DeepLab2).
    semantic_head: Optional ConvHead -> `semantic_logits`.
  """

  def __init__(self, encoder, pixel_decoder, transformer_decoder, predictor,
               semantic_decoder=None, semantic_head=None, **kwargs):
    super().__init__(**kwargs)
    self.encoder = encoder
    self.pixel_decoder = pixel_decoder
    self.transformer_decoder = transformer_decoder
    self.predictor = predictor
    self.semantic_decoder = semantic_decoder
    self.semantic_head = semantic_head
    self.recompute_pixel_decoder = False

  def set_recompute(self, parts):
    """Recomputes the activations of `parts` (values of recompute.PARTS) in training."""
    parts = set(parts)
    unknown = parts - set(recompute.PARTS)
    if unknown:
      raise ValueError(f'Unknown recompute parts {sorted(unknown)}; use {recompute.PARTS}.')
    if self.pixel_decoder is None and parts:
      raise ValueError('MaX-DeepLab has no recomputable parts.')
    self.encoder.recompute_stages = recompute.ENCODER in parts
    self.recompute_pixel_decoder = recompute.PIXEL_DECODER in parts
    self.transformer_decoder.recompute_layers = recompute.TRANSFORMER_DECODER in parts

  def _pixel_decoder(self, endpoints, training):
    if not (training and self.recompute_pixel_decoder and self.pixel_decoder.built):
      return self.pixel_decoder(endpoints, training=training)
    # Only the endpoints the decoder reads go in and only the ones it adds come out, so the
    # recomputed block holds no pass-through tensors.
    inputs = {key: endpoints[key] for key in self.pixel_decoder.input_endpoints()}

    def decode(inputs):
      outputs = self.pixel_decoder(inputs, training=True)
      return {key: value for key, value in outputs.items() if key not in inputs}

    return {**endpoints, **recompute.call(decode, inputs)}

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, images, training=None):
    x = tf.cast(images, tf.float32) / 127.5 - 1.0
    x = tf.cast(x, self.compute_dtype)
    endpoints = self.encoder(x, training=training)
    if self.pixel_decoder is not None:  # MaX-DeepLab's encoder decodes and has the memory
      endpoints = self._pixel_decoder(endpoints, training)
      endpoints = self.transformer_decoder(endpoints, training=training)
    results = dict(self.predictor(endpoints, training=training))
    if self.semantic_head is not None:
      semantic = endpoints[common.ENDPOINT_FEATURE_SEMANTIC]
      if (self.semantic_decoder is not None
          and semantic.shape[1:3] != endpoints[common.ENDPOINT_FEATURE_PANOPTIC].shape[1:3]):
        semantic = self.semantic_decoder(endpoints, training=training)
      results[common.PRED_SEMANTIC_LOGITS] = tf.cast(
          self.semantic_head(semantic, training=training), tf.float32)
    if training:
      size = results[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape[1:3]
      auxiliary = []
      for prediction in endpoints.get(common.PRED_AUXILIARY_OUTPUTS, ()):
        prediction = dict(prediction)
        for key in _DENSE_AUXILIARY_KEYS:
          if key in prediction:  # reference masks: CMT only
              prediction[key] = resize.resize_align_corners(prediction[key], size)
        auxiliary.append(prediction)
      results[common.PRED_AUXILIARY_OUTPUTS] = tuple(auxiliary)
    return results

  def components(self):
    """Named sub-networks (DeepLab2's checkpoint items, grouped) for summaries."""
    names = ('encoder', 'pixel_decoder', 'transformer_decoder', 'predictor',
             'semantic_decoder', 'semantic_head')
    return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

  def backbone_trainable_variables(self):
    """The variables backbone_learning_rate_multiplier scales: kMaX's whole pixel encoder."""
    return list(self.encoder.trainable_variables)

  def get_build_config(self):
    # Variables are created by the first call (their paths then nest under the model's name);
    # a deserialised model is built the same way instead of by Keras' generic build().
    return None

  def get_config(self):
    config = super().get_config()
    for name in ('encoder', 'pixel_decoder', 'transformer_decoder', 'predictor',
                 'semantic_decoder', 'semantic_head'):
      layer = getattr(self, name)
      if layer is None:
        config[name] = None
        continue
      serialized = keras.saving.serialize_keras_object(layer)
      # Sub-networks are built by the model's first call, inside its name scope.
      serialized.pop('build_config', None)
      config[name] = serialized
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    for name in ('encoder', 'pixel_decoder', 'transformer_decoder', 'predictor',
                 'semantic_decoder', 'semantic_head'):
      if config.get(name) is not None:
        config[name] = keras.saving.deserialize_keras_object(config[name])
    return cls(**config)
