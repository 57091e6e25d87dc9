"""Behaviour of the CMT-DeepLab decoder and model at tiny shapes."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.data.input import sample_generator
from deeplab2_kmax.model import builder
from deeplab2_kmax.model.loss import builder as loss_builder
from deeplab2_kmax.model.transformer_decoder import cmt
from tests.model.conftest import TINY_TEXTPROTO
from tests.model.conftest import parse
from tests.model.test_kmax_model import MAX_KEYS
from tests.model.test_kmax_model import _images
from tests.model.test_kmax_model import assert_keras_config_round_trip

# The tiny kMaX of conftest as a CMT, without stochastic depth (the gradient test needs every
# branch), with the reference-mask loss and the losses of the synthetic demo.
TINY_CMT = TINY_TEXTPROTO.replace('kmax {', 'cmt {').replace(
    'crop_size: 65 crop_size: 65', 'crop_size: 65 crop_size: 65 max_thing_id: 16').replace(
    'transformer_decoder_drop_path_keep_prob: 0.8',
    'transformer_decoder_drop_path_keep_prob: 1.0') + '''
trainer_options { loss_options {
  semantic_loss { weight: 1.0 } pq_style_loss { weight: 3.0 }
  mask_id_cross_entropy_loss { weight: 0.3 } instance_discrimination_loss { weight: 1.0 }
  reference_mask_loss { weight: 1.0 } } }
'''
HEAD_ARGS = dict(pixel_head_channels=8, embedding_channels=8, num_classes=5)


def _layer(**flags):
  return cmt.CMTTransformerLayer(channels=16, num_heads=2, key_channels=8, value_channels=16,
                                 ffn_channels=32, auxiliary_head_args=HEAD_ARGS, **flags)


def _open_residual_branches(layer):
  """Sets every zero-initialised BN gamma (the residual branches) to 1."""
  for variable in layer.trainable_weights:
    if variable.path.endswith('/gamma') and not np.any(variable.numpy()):
      variable.assign(tf.ones_like(variable))


@pytest.fixture(scope='module')
def tiny_cmt_options():
  return parse(TINY_CMT)


@pytest.fixture(scope='module')
def tiny_cmt(tiny_cmt_options):
  return builder.build_model(tiny_cmt_options)


def test_outputs_have_the_kmax_keys_and_shapes(tiny_cmt):
  assert tiny_cmt.name == 'cmt_deeplab'
  assert isinstance(tiny_cmt.transformer_decoder, cmt.CMTTransformerDecoder)
  outputs = tiny_cmt(_images(), training=True)
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (2, 17, 17, 7)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (2, 17, 17, 8)
  assert outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE].shape == (2, 17, 17, 8)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (2, 8, 7)
  auxiliary = outputs[common.PRED_AUXILIARY_OUTPUTS]
  assert len(auxiliary) == 3
  for prediction in auxiliary:
    assert set(prediction) == set(MAX_KEYS) | {common.PRED_REFERENCE_MASK_LOGITS}
    assert prediction[common.PRED_REFERENCE_MASK_LOGITS].shape == (2, 17, 17, 8)
    assert np.all(prediction[common.PRED_REFERENCE_MASK_LOGITS].numpy() <= 0.0)  # log R
  inference = tiny_cmt(_images(), training=False)
  assert set(inference) == set(MAX_KEYS) | {common.PRED_SEMANTIC_LOGITS}


def test_assignment_is_a_softmax_over_the_cluster_axis():
  layer = _layer()
  pixels = tf.random.normal([2, 5, 5, 12], seed=1)
  centers = tf.random.normal([2, 4, 16], seed=2)
  layer((pixels, centers), training=False)
  layer.reference_mask_prior_scale.assign(0.7)  # switch the location prior on
  new_centers, new_pixels, auxiliary, assignment = layer((pixels, centers), training=False)
  assert new_centers.shape == (2, 4, 16) and new_pixels.shape == (2, 5, 5, 12)
  assert assignment.shape == (2, 25, 4)
  np.testing.assert_allclose(tf.reduce_sum(assignment, axis=-1), 1.0, atol=1e-5)
  # Independent numpy softmax over the 4 centers of (mask logits + 0.7 log(R + 1e-6)).
  logits = auxiliary[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(2, 25, 4)
  reference = auxiliary[common.PRED_REFERENCE_MASK_LOGITS].numpy().reshape(2, 25, 4)
  logits = logits.astype(np.float64) + 0.7 * np.log(np.exp(reference) + 1e-6)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(assignment, expected, atol=1e-5)
  # Not a spatial softmax: the columns do not sum to 1.
  assert not np.allclose(tf.reduce_sum(assignment, axis=1), 1.0, atol=1e-2)


def test_coordinates_and_gaussian_reference_masks_by_hand():
  grid = cmt.coordinate_features(3, 2).numpy()
  np.testing.assert_allclose(grid, [[-1, -1], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 1]])
  np.testing.assert_allclose(cmt.coordinate_features(1, 1), [[0.0, 0.0]])
  # Centre (tanh(atanh 0.5), 0) = (0.5, 0); sigma_y = 0.02 + 2 sigmoid(0) = 1.02, sigma_x too.
  parameters = tf.constant([[[np.arctanh(0.5), 0.0, 0.0, 0.0]]], tf.float32)
  logits = cmt.gaussian_reference_mask_logits(parameters, tf.constant(grid)).numpy()[0, :, 0]
  expected = [-0.5 * ((y - 0.5) ** 2 + x ** 2) / 1.02 ** 2 for y, x in grid]
  np.testing.assert_allclose(logits, expected, rtol=1e-5)


def test_location_prior_starts_switched_off():
  layer = _layer()
  pixels = tf.random.normal([1, 4, 4, 12], seed=3)
  centers = tf.random.normal([1, 4, 16], seed=4)

  def softmax_of_mask_logits(auxiliary):
    logits = auxiliary[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(1, 16, 4)
    return tf.nn.softmax(tf.constant(logits, tf.float64), axis=-1).numpy()

  # beta = 0 at initialisation: purely feature-based clustering.
  _, _, auxiliary, assignment = layer((pixels, centers), training=False)
  assert float(layer.reference_mask_prior_scale.numpy()) == 0.0
  np.testing.assert_allclose(assignment, softmax_of_mask_logits(auxiliary), atol=1e-6)
  # beta > 0: each center gains the pixels near its reference mask.
  layer.reference_mask_prior_scale.assign(1.0)
  _, _, auxiliary, assignment = layer((pixels, centers), training=False)
  shift = np.log(assignment.numpy()) - np.log(softmax_of_mask_logits(auxiliary))
  prior = np.log(np.exp(auxiliary[common.PRED_REFERENCE_MASK_LOGITS].numpy().reshape(1, 16, 4))
                 + 1e-6)
  # Equal up to a per-pixel constant (the softmax normaliser).
  np.testing.assert_allclose(shift - shift.mean(-1, keepdims=True),
                             prior - prior.mean(-1, keepdims=True), atol=1e-4)
  assert np.abs(prior - prior.mean(-1, keepdims=True)).max() > 1e-2


def test_pixel_update_starts_as_identity_and_is_off_when_disabled():
  pixels = tf.random.normal([2, 5, 5, 12], seed=5)
  centers = tf.random.normal([2, 4, 16], seed=6)
  layer = _layer()
  _, new_pixels, _, _ = layer((pixels, centers), training=False)
  np.testing.assert_allclose(new_pixels, pixels, atol=1e-6)  # BN0 at initialisation
  _open_residual_branches(layer)
  _, new_pixels, _, _ = layer((pixels, centers), training=False)
  assert np.abs(new_pixels - pixels).max() > 1e-3
  frozen = _layer(update_pixel_features=False, use_reference_masks=False)
  _, same, auxiliary, _ = frozen((pixels, centers), training=False)
  assert same is pixels
  assert common.PRED_REFERENCE_MASK_LOGITS not in auxiliary
  assert not [v for v in frozen.weights if 'reference_mask' in v.path or 'pixel_update' in v.path]


def _ground_truth(descriptor, size, batch):
  """A 3x3 grid of segments cycling through the dataset's thing and stuff classes."""
  classes = list(descriptor.thing_class_ids[:3]) + list(descriptor.stuff_class_ids[:3])
  label = np.zeros([size, size], np.int32)
  cell = -(-size // 3)
  for index in range(9):
    row, col = divmod(index, 3)
    class_id = classes[index % len(classes)]
    instance = index + 1 if class_id in descriptor.thing_class_ids else 0
    label[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = (
        class_id * descriptor.panoptic_label_divisor + instance)
  targets, _ = sample_generator.panoptic_targets(
      tf.constant(label), label_divisor=descriptor.panoptic_label_divisor,
      ignore_label=descriptor.ignore_label, thing_class_ids=descriptor.thing_class_ids,
      max_thing_id=16)
  return {k: tf.stack([v] * batch) for k, v in targets.items()}


def test_gradient_reaches_every_trainable_variable(tiny_cmt_options):
  model = builder.build_model(tiny_cmt_options)
  _open_residual_branches(model)
  for layer in model.transformer_decoder._kmax_decoder:
    layer.reference_mask_prior_scale.assign(0.5)
  descriptor = builder.dataset_descriptor(tiny_cmt_options)
  loss = loss_builder.build_loss(tiny_cmt_options, descriptor)
  assert 'aux_2reference_mask_loss' in loss.loss_terms
  ground_truth = _ground_truth(descriptor, 65, 2)
  with tf.GradientTape() as tape:
    outputs = model(_images(), training=True)
    total = tf.reduce_sum(loss(ground_truth, outputs, seed=tf.constant([1, 2]))[
        common.TOTAL_LOSS])
  variables = model.trainable_weights
  gradients = tape.gradient(total, variables)
  missing = [v.path for v, g in zip(variables, gradients) if g is None]
  assert not missing
  zero = [v.path for v, g in zip(variables, gradients)
          if not np.any(tf.convert_to_tensor(g).numpy())]
  assert not zero
  decoder_paths = {v.path for v in model.transformer_decoder.trainable_weights}
  for name in ('reference_mask_mlp2', 'reference_mask_prior_scale', 'pixel_update_conv_bn',
               'pixel_carry_to_stride16', 'pixel_carry_to_output', 'pixel_k_conv_bn'):
    assert any(name in p for p in decoder_paths), name


def test_get_config_round_trip(tiny_cmt):
  assert_keras_config_round_trip(tiny_cmt)
