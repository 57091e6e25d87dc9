"""Behaviour of the kMaX model and its sub-networks at tiny shapes."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.config import loader
from deeplab2_kmax.model import builder
from deeplab2_kmax.model.pixel_decoder import kmax as kmax_pixel_decoder
from deeplab2_kmax.model.transformer_decoder import kmax as kmax_transformer_decoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_KEYS = (common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE, common.PRED_PIXEL_SPACE_MASK_LOGITS,
            common.PRED_TRANSFORMER_CLASS_LOGITS)


def _images(batch=2, size=65, seed=0):
  return np.random.RandomState(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def tiny_model(tiny_options):
  return builder.build_model(tiny_options)


def test_training_outputs_include_resized_auxiliary_predictions(tiny_model):
  outputs = tiny_model(_images(), training=True)
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (2, 17, 17, 7)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (2, 17, 17, 8)
  # synthetic_panoptic has void = 0 among its 7 classes: no extra void channel.
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (2, 8, 7)
  auxiliary = outputs[common.PRED_AUXILIARY_OUTPUTS]
  assert len(auxiliary) == 3
  for prediction in auxiliary:
    assert set(prediction) == set(MAX_KEYS)
    assert prediction[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (2, 17, 17, 8)
    assert prediction[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE].shape == (2, 17, 17, 8)
    assert prediction[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (2, 8, 7)
  assert common.PRED_AUXILIARY_OUTPUTS not in tiny_model(_images(), training=False)


def test_inference_is_deterministic_and_batch_independent(tiny_model):
  images = _images(batch=2)
  both = tiny_model(images, training=False)
  first = tiny_model(images[:1], training=False)
  for key in MAX_KEYS:
    np.testing.assert_allclose(both[key][:1], first[key], atol=1e-5)


def test_kmeans_assignment_passes_no_gradient_to_the_auxiliary_head():
  layer = kmax_transformer_decoder.KMaXTransformerLayer(
      channels=16, num_heads=2, key_channels=8, value_channels=16, ffn_channels=32,
      auxiliary_head_args=dict(pixel_head_channels=8, embedding_channels=8, num_classes=5))
  pixels = tf.random.normal([2, 5, 5, 12], seed=1)
  centers = tf.random.normal([2, 4, 16], seed=2)
  layer((pixels, centers), training=True)
  # Open every zero-initialised residual branch so the k-means update reaches the output.
  for bn in (layer._kmeans_memory_conv3_bn, layer._memory_conv3_bn, layer._memory_ffn_conv2_bn):
    bn._batch_norm.gamma.assign(tf.ones_like(bn._batch_norm.gamma))
  with tf.GradientTape() as tape:
    new_centers, _ = layer((pixels, centers), training=True)
    loss = tf.reduce_sum(new_centers ** 2)
  variables = layer.trainable_weights
  gradients = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
  auxiliary = [p for p in gradients if '/auxiliary_clustering_predictor/' in p]
  assert auxiliary
  assert all(gradients[p] is None for p in auxiliary)
  assert gradients[[p for p in gradients if 'pixel_v_conv_bn/conv/kernel' in p][0]] is not None
  assert new_centers.shape == (2, 4, 16)


def test_pixel_decoder_alone():
  decoder = kmax_pixel_decoder.KMaXPixelDecoder(dims=(16, 8, 8, 4), num_blocks=(1, 2, 1, 1))
  sizes = {1: 33, 2: 17, 3: 9, 4: 5, 5: 3}
  channels = {1: 4, 2: 8, 3: 16, 4: 32, 5: 64}
  endpoints = {f'stage{i}': tf.random.normal([2, sizes[i], sizes[i], channels[i]])
               for i in sizes}
  outputs = decoder(endpoints)
  assert outputs['decoder_stage1'].shape == (2, 3, 3, 64)
  assert outputs['decoder_stage2'].shape == (2, 5, 5, 32)
  assert outputs['decoder_stage3'].shape == (2, 9, 9, 32)
  assert outputs['decoder_output'].shape == (2, 17, 17, 16)


def test_transformer_decoder_alone():
  decoder = kmax_transformer_decoder.KMaXTransformerDecoder(
      num_cluster_centers=6, num_blocks=(1, 1, 1), channels=16, num_heads=2, key_channels=8,
      value_channels=16, ffn_channels=32,
      auxiliary_head_args=dict(pixel_head_channels=8, embedding_channels=8, num_classes=5))
  endpoints = {'decoder_stage1': tf.zeros([2, 3, 3, 32]), 'decoder_stage2': tf.zeros([2, 5, 5, 16]),
               'decoder_stage3': tf.zeros([2, 9, 9, 8]), 'decoder_output': tf.zeros([2, 17, 17, 4]),
               'stage5': tf.zeros([2, 3, 3, 40])}
  outputs = decoder(endpoints)
  assert outputs['transformer_class_feature'].shape == (2, 6, 16)
  assert outputs['transformer_mask_feature'].shape == (2, 6, 16)
  assert outputs['feature_panoptic'] is endpoints['decoder_output']
  assert outputs['feature_semantic'] is endpoints['stage5']
  mask_shapes = [p[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape
                 for p in outputs[common.PRED_AUXILIARY_OUTPUTS]]
  assert mask_shapes == [(2, 3, 3, 6), (2, 5, 5, 6), (2, 9, 9, 6)]
  assert tuple(decoder.cluster_centers.shape) == (1, 6, 16)


def assert_keras_config_round_trip(model):
  """The model's Keras config is JSON-clean and rebuilds a model with the same variables that
  computes the same outputs (to 1e-5) once given the same weights."""
  config = keras.saving.serialize_keras_object(model)
  json.dumps(config)  # JSON-clean
  clone = keras.saving.deserialize_keras_object(config)
  clone(_images(batch=1), training=False)
  assert [w.path for w in clone.weights] == [w.path for w in model.weights]
  clone.set_weights(model.get_weights())
  images = _images(batch=1, seed=3)
  expected = model(images, training=False)
  actual = clone(images, training=False)
  for key in MAX_KEYS + (common.PRED_SEMANTIC_LOGITS,):
    np.testing.assert_allclose(actual[key], expected[key], atol=1e-5)


def test_get_config_round_trip(tiny_model):
  assert_keras_config_round_trip(tiny_model)


def test_save_and_load_weights(tiny_model, tmp_path):
  path = str(tmp_path / 'kmax.weights.h5')
  images = _images(batch=1, seed=4)
  expected = tiny_model(images, training=False)
  saved = tiny_model.get_weights()
  tiny_model.save_weights(path)
  try:
    for variable in tiny_model.weights:
      variable.assign(tf.zeros_like(variable) + 0.5)
    changed = tiny_model(images, training=False)
    assert not np.allclose(changed[common.PRED_PIXEL_SPACE_MASK_LOGITS],
                           expected[common.PRED_PIXEL_SPACE_MASK_LOGITS])
    tiny_model.load_weights(path)
    actual = tiny_model(images, training=False)
    for key in MAX_KEYS:
      np.testing.assert_allclose(actual[key], expected[key], atol=1e-5)
  finally:
    tiny_model.set_weights(saved)


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'mixed_float16'])
def test_mixed_precision(tiny_options, policy):
  model = builder.build_model(tiny_options, dtype=policy)
  assert all(w.dtype == 'float32' for w in model.weights)
  compute = policy.split('_')[1]
  endpoints = model.encoder(tf.zeros([1, 65, 65, 3]))
  assert endpoints['stage5'].dtype == compute
  outputs = model(_images(batch=2), training=True)
  flat = [outputs[k] for k in MAX_KEYS + (common.PRED_SEMANTIC_LOGITS,)]
  flat += [p[k] for p in outputs[common.PRED_AUXILIARY_OUTPUTS] for k in MAX_KEYS]
  for tensor in flat:
    assert tensor.dtype == tf.float32
    assert np.isfinite(tensor.numpy()).all()
  norms = np.linalg.norm(outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE], axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-3)


def test_synthetic_config_builds():
  config = loader.load_config(
      os.path.join(REPO, 'configs/synthetic/kmax_r50_os32_synthetic.textproto'),
      environ={common.ENV_SYNTHETIC_DATA_DIR: '/tmp/unused'})
  # Built at crop 65 to keep the test fast; the config's crop is 129.
  model = builder.build_model(config, crop_size=(65, 65))
  outputs = model(_images(batch=1, size=65), training=False)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (1, 17, 17, 16)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (1, 16, 7)
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (1, 17, 17, 7)


def test_build_model_rejects_other_meta_architectures(tiny_options):
  options = type(tiny_options)()
  options.CopyFrom(tiny_options)
  # max_deeplab { } builds since issue 16, but only on a dual-path (MaX-DeepLab) backbone.
  options.model_options.max_deeplab.num_mask_slots = 4
  with pytest.raises(ValueError, match='max_deeplab_s'):
    builder.build_model(options)
  options.model_options.ClearField('max_deeplab')
  assert options.model_options.WhichOneof('meta_architecture') is None
  with pytest.raises(ValueError, match='kmax'):
    builder.build_model(options)


def test_keras_summary_runs(tiny_model):
  lines = []
  tiny_model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
  text = '\n'.join(lines)
  assert 'encoder' in text and 'transformer_decoder' in text


def test_encoder_in_a_functional_keras_model(tiny_model):
  inputs = keras.Input((65, 65, 3))
  endpoints = tiny_model.encoder(inputs)
  features = keras.Model(inputs, [endpoints['res2'], endpoints['stage5']])
  res2, stage5 = features(np.zeros((1, 65, 65, 3), np.float32))
  assert res2.shape[1:3] == (17, 17) and stage5.shape[1:3] == (3, 3)


def test_drop_path_makes_training_stochastic_and_inference_deterministic():
  def make(keep):
    return kmax_transformer_decoder.KMaXTransformerLayer(
        channels=16, num_heads=2, key_channels=8, value_channels=16, ffn_channels=32,
        drop_path_keep_prob=keep,
        auxiliary_head_args=dict(pixel_head_channels=8, embedding_channels=8, num_classes=5))
  pixels = tf.random.normal([16, 3, 3, 12], seed=3)
  centers = tf.random.normal([16, 4, 16], seed=4)
  for keep, stochastic in ((0.5, True), (1.0, False)):
    layer = make(keep)
    layer((pixels, centers), training=True)
    for bn in (layer._kmeans_memory_conv3_bn, layer._memory_conv3_bn,
               layer._memory_ffn_conv2_bn):
      bn._batch_norm.gamma.assign(tf.ones_like(bn._batch_norm.gamma))
    tf.random.set_seed(5)
    first, _ = layer((pixels, centers), training=True)
    second, _ = layer((pixels, centers), training=True)
    assert (not np.allclose(first, second)) == stochastic
    np.testing.assert_allclose(layer((pixels, centers), training=False)[0],
                               layer((pixels, centers), training=False)[0])


def test_cityscapes_style_model(coco_r50_options):
  # Cityscapes in DeepLab2: 256 centers, final features at stride 2 (a fifth decoder stage),
  # no semantic decoder (the semantic head runs on stage5), 19 classes + a void class.
  options = coco_r50_options(**{
      'coco_panoptic': 'cityscapes_panoptic',
      'output_channels: 134': 'output_channels: 19',
      'pixel_space_head {': 'num_cluster_centers: 256 high_resolution_output_stride: 2 '
                            'use_auxiliary_semantic_decoder: false pixel_space_head {',
  })
  model = builder.build_model(options, crop_size=(65, 65))
  assert model.semantic_decoder is None
  outputs = model(_images(batch=1), training=False)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (1, 33, 33, 256)
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (1, 3, 3, 19)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (1, 256, 20)
  assert model.pixel_decoder.dims == [512, 256, 128, 64, 32]
