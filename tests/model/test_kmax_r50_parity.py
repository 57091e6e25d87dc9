"""Parity of our COCO kMaX-R50 with DeepLab2's: parameter counts and the checkpoint mapping.

The reference numbers come from upstream DeepLab2 (../shared/reference/upstream-kmax-r50/). Parameter counts do
not depend on the crop, so the model is built at crop 65.
"""

import json
import os

import numpy as np

from deeplab2_kmax import common
from deeplab2_kmax.checkpoint import deeplab2_key_map
from tests.conftest import upstream_reference



def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _reference_counts():
  with open(upstream_reference('param_count.json')) as f:
    return json.load(f)


def upstream_variable_shapes():
  """{DeepLab2 checkpoint key: shape} of every variable in checkpoint_variables.txt."""
  shapes = {}
  with open(upstream_reference('checkpoint_variables.txt')) as f:
    for line in f:
      if line.startswith('#') or not line.strip():
        continue
      key, shape = line.rstrip('\n').split('\t')
      if key.endswith(deeplab2_key_map.CHECKPOINT_SUFFIX):
        shapes[key] = tuple(json.loads(shape))
  return shapes


def test_total_and_trainable_parameters(coco_r50_model):
  reference = _reference_counts()
  assert _count(coco_r50_model.weights) == reference['total'] == 72_650_796
  assert _count(coco_r50_model.trainable_weights) == reference['trainable'] == 72_436_862
  assert len(coco_r50_model.weights) == reference['num_weight_tensors'] == 1184


def test_component_parameters(coco_r50_model):
  reference = _reference_counts()['per_checkpoint_item']
  parts = coco_r50_model.components()
  for name in ('encoder', 'pixel_decoder', 'transformer_decoder', 'semantic_decoder'):
    assert _count(parts[name].weights) == reference[name]['total'], name
    assert _count(parts[name].trainable_weights) == reference[name]['trainable'], name
  assert _count(parts['encoder'].weights) == 23_561_152
  assert _count(parts['pixel_decoder'].weights) == 21_238_144
  assert _count(parts['transformer_decoder'].weights) == 11_813_116
  assert _count(parts['semantic_decoder'].weights) == 15_754_848


def test_every_checkpoint_variable_maps_to_one_variable_of_the_same_shape(coco_r50_model):
  upstream = upstream_variable_shapes()
  assert len(upstream) == 1184
  mapping, unmatched, unmapped = deeplab2_key_map.build_mapping(upstream, coco_r50_model)
  assert unmatched == []
  assert unmapped == []
  assert len(set(mapping.values())) == len(mapping) == 1184
  ours = deeplab2_key_map.model_variable_paths(coco_r50_model)
  for key, path in mapping.items():
    assert tuple(ours[path].shape) == upstream[key], (key, path)
    # Trainability follows the variable kind (BN moving statistics are not trained).
    assert ours[path].trainable == ('moving_' not in key), key


def test_per_checkpoint_item_counts_through_the_mapping(coco_r50_model):
  reference = _reference_counts()['per_checkpoint_item']
  upstream = upstream_variable_shapes()
  mapping, _, _ = deeplab2_key_map.build_mapping(upstream, coco_r50_model)
  ours = deeplab2_key_map.model_variable_paths(coco_r50_model)
  per_item = {}
  for key, path in mapping.items():
    item = key.split('/')[0]
    per_item[item] = per_item.get(item, 0) + int(np.prod(ours[path].shape))
  assert per_item == {item: counts['total'] for item, counts in reference.items()}


def test_mapping_rules_on_examples():
  suffix = deeplab2_key_map.CHECKPOINT_SUFFIX
  cases = {
      'encoder/_stem/_conv/kernel': 'encoder/stem/conv/kernel',
      'pixel_decoder/_stages/1/_block3/_attention/_width_axis/_key_rpe/embeddings':
          'pixel_decoder/stages_1/block3/attention/width_axis/key_rpe/embeddings',
      'transformer_decoder/_kmax_decoder/5/_block1_transformer/_auxiliary_clustering_predictor'
      '/_pixel_space_head/conv_block/_conv1_bn_act/_depthwise/_depthwise_conv/depthwise_kernel':
          'transformer_decoder/kmax_decoder_5/auxiliary_clustering_predictor/pixel_space_head/'
          'conv_block/conv1_bn_act/depthwise/depthwise_conv/kernel',
      'semantic_last_layer/kernel': 'semantic_head/final_conv/kernel',
      'pixel_space_mask_batch_norm/gamma': 'predictor/pixel_space_mask_batch_norm/gamma',
  }
  for key, path in cases.items():
    assert deeplab2_key_map.upstream_to_ours(key + suffix) == path
  assert deeplab2_key_map.upstream_to_ours('_CHECKPOINTABLE_OBJECT_GRAPH') is None


def test_outputs_at_crop_65(coco_r50_model):
  images = np.random.RandomState(0).uniform(0, 255, (1, 65, 65, 3)).astype(np.float32)
  outputs = coco_r50_model(images, training=False)
  assert set(outputs) == {common.PRED_SEMANTIC_LOGITS, common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE,
                          common.PRED_PIXEL_SPACE_MASK_LOGITS,
                          common.PRED_TRANSFORMER_CLASS_LOGITS}
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (1, 17, 17, 134)
  assert outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE].shape == (1, 17, 17, 128)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (1, 17, 17, 128)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (1, 128, 134)
  # Pixel features are unit vectors.
  norms = np.linalg.norm(outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE], axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-4)
  # At initialisation every slot predicts void with probability ~0.9 (bias log(133 * 9)).
  probs = tf_softmax(outputs[common.PRED_TRANSFORMER_CLASS_LOGITS])
  assert abs(float(np.mean(probs[..., -1])) - 0.9) < 0.02


def tf_softmax(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_convnext_base_kmax_coco_parameters(coco_r50_options):
  # DeepLab2's kmax_deeplab_test: ConvNeXt-B on COCO, trainable parameters excluding the
  # auxiliary semantic decoder and head.
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  options = coco_r50_options(kmax_resnet50='kmax_convnext_base')
  model = builder.build_model(options, crop_size=(65, 65))
  kept = [w for w in model.trainable_weights
          if not any(part in w.path.split('/') for part in ('semantic_decoder', 'semantic_head'))]
  assert _count(kept) == 121_513_304
  outputs = model(np.zeros((2, 65, 65, 3), np.float32), training=True)
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (2, 17, 17, 134)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (2, 128, 134)
  assert outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE].shape == (2, 17, 17, 128)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (2, 17, 17, 128)


def test_convnext_mapping_rules_and_layout():
  suffix = deeplab2_key_map.CHECKPOINT_SUFFIX
  cases = {
      'encoder/downsample_layers/0/layer_with_weights-0/kernel': 'encoder/stem/conv/kernel',
      'encoder/downsample_layers/0/layer_with_weights-1/gamma': 'encoder/stem/norm/gamma',
      'encoder/downsample_layers/2/layer_with_weights-0/beta':
          'encoder/downsampling_block_1/norm/beta',
      'encoder/downsample_layers/3/layer_with_weights-1/bias':
          'encoder/downsampling_block_2/conv/bias',
      'encoder/stages/2/layer_with_weights-26/layer_scale':
          'encoder/convnext_block_2_26/layer_scale',
      'encoder/stages/0/layer_with_weights-1/depthwise_conv/kernel':
          'encoder/convnext_block_0_1/depthwise_conv/kernel',
  }
  for key, path in cases.items():
    assert deeplab2_key_map.upstream_to_ours(key + suffix) == path
  grouped = np.arange(7 * 7 * 4, dtype=np.float32).reshape(7, 7, 1, 4)
  depthwise = deeplab2_key_map.to_our_layout(grouped, (7, 7, 4, 1))
  assert depthwise.shape == (7, 7, 4, 1)
  assert depthwise[3, 2, 1, 0] == grouped[3, 2, 0, 1]
