"""MaX-DeepLab (issue 16): block and decoder plans, DeepLab2's published counts and shapes, the
dual-path transformer layer against an independent numpy reference, and the tiny model
(outputs, loss, backbone variable group, Keras config round trips)."""

import json

import keras
import numpy as np
import pytest
import scipy.special
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model import builder
from deeplab2_kmax.model import max_deeplab
from deeplab2_kmax.model.layers import dual_path_block_group
from deeplab2_kmax.model.layers import dual_path_transformer
from deeplab2_kmax.model.loss import builder as loss_builder
from deeplab2_kmax.model.pixel_encoder import dual_path_resnet
from tests.model.conftest import parse
from tests.model.test_cmt_model import _ground_truth
from tests.model.test_kmax_model import MAX_KEYS
from tests.model.test_kmax_model import _images
from tests.model.test_kmax_model import assert_keras_config_round_trip

# A tiny MaX-DeepLab-S: widths 1/16 (stem 1/4), blocks [3, 4, 6, 3] * 0.34 -> [1, 1, 2, 1],
# 8 mask slots; transformers of 128 * 0.125 = 16 channels, 2 heads. Stochastic depth on (keep
# 0.8, linear) so that the training call exercises the drop-path masks.
TINY_MAX_TEXTPROTO = """
model_options {
  backbone { name: "max_deeplab_s" output_stride: 16 backbone_width_multiplier: 0.0625
             stem_width_multiplier: 0.25 backbone_layer_multiplier: 0.34
             drop_path_keep_prob: 0.8 drop_path_schedule: "linear" }
  decoder { feature_key: "feature_semantic" decoder_channels: 16 aspp_channels: 16
            atrous_rates: 1 atrous_rates: 2 atrous_rates: 3 }
  max_deeplab {
    pixel_space_head { output_channels: 8 head_channels: 16 }
    auxiliary_low_level { feature_key: "res3" channels_project: 8 }
    auxiliary_low_level { feature_key: "res2" channels_project: 4 }
    auxiliary_semantic_head { output_channels: 7 head_channels: 16 }
    instance_discrimination_sample_k: 0
    num_mask_slots: 8
    max_num_mask_slots: 8
    dual_path { memory_channels: 16 base_transformer_expansion: 0.125
                transformer_num_heads: 2 transformer_ffn_channels: 32
                global_feed_forward_network_channels: 16 }
  }
}
train_dataset_options { dataset: "synthetic_panoptic" crop_size: 65 crop_size: 65
                        max_thing_id: 16 }
trainer_options { loss_options {
  semantic_loss { weight: 1.0 } pq_style_loss { weight: 3.0 }
  mask_id_cross_entropy_loss { weight: 0.3 } instance_discrimination_loss { weight: 1.0 } } }
"""

# The same tiny network as DualPathResNet keyword arguments (for the encoder-only tests).
TINY_ENCODER_ARGS = dict(
    dual_path_resnet.PRESETS['max_deeplab_s'], width_multiplier=0.0625,
    stem_width_multiplier=0.25, backbone_layer_multiplier=0.34, memory_channels=16,
    base_transformer_expansion=0.125, transformer_num_heads=2, transformer_ffn_channels=32,
    global_feed_forward_network_channels=16, num_mask_slots=8, max_num_mask_slots=8)


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


# ---------------------------------------------------------------------------------------------
# Block plans, derived by hand from DeepLab2's axial_block_groups.BlockGroup.__init__:
#   current = original_resnet_input_stride (s below)
#   per block i:  strides = original_resnet_stride if i == 0 and input_stride < output_stride
#                 atrous  = current // output_stride if current > output_stride else 1
#                 keep    = 1 - (1 - 0.8) * (log2(current) - 1) / 4   if current >= 16 (linear)
#                 axial   -> [2f, f, 4f] if current >= 16; else ResNet-beta [f, f, 4f]
#                 then, for i == 0, current *= original_resnet_stride
#                 transformer if current >= use_transformer_beyond_stride (32 for MaX-S)
# MaX-DeepLab-S (AxialResNet, resnet_beta): filters s * 32 for total strides [1, 2, 4, 8, 16],
# stage strides 2, stages 2..5 with [3, 4, 6, 3] blocks, output stride 16.
# ---------------------------------------------------------------------------------------------
def _row(filters_list, strides, atrous_rate, attention_type, keep_prob, transformer):
  return dict(filters_list=filters_list, strides=strides, atrous_rate=atrous_rate,
              attention_type=attention_type, keep_prob=keep_prob, transformer=transformer)


MAX_S_STAGES = {
    # stage2: f 64, input stride 2 < 16 -> first block strides 2; current 2 then 4: < 16, so
    # no drop path (keep 1), no axial attention, no transformer.
    'stage2': (dict(filters=64, num_blocks=3, original_resnet_stride=2,
                    original_resnet_input_stride=2),
               [_row([64, 64, 256], 2, 1, None, 1.0, False)]
               + [_row([64, 64, 256], 1, 1, None, 1.0, False)] * 2),
    # stage3: f 128, input stride 4 -> strides 2, current 8 afterwards.
    'stage3': (dict(filters=128, num_blocks=4, original_resnet_stride=2,
                    original_resnet_input_stride=4),
               [_row([128, 128, 512], 2, 1, None, 1.0, False)]
               + [_row([128, 128, 512], 1, 1, None, 1.0, False)] * 3),
    # stage4: f 256, input stride 8 -> block 1 strides 2 as a bottleneck (current 8 < 16);
    # blocks 2-6 at current 16: axial [512, 256, 1024], rate 1 (16 is not > 16), keep
    # 1 - 0.2 * (log2 16 - 1) / 4 = 0.85; no transformer (16 < 32).
    'stage4': (dict(filters=256, num_blocks=6, original_resnet_stride=2,
                    original_resnet_input_stride=8),
               [_row([256, 256, 1024], 2, 1, None, 1.0, False)]
               + [_row([512, 256, 1024], 1, 1, 'axial', 0.85, False)] * 5),
    # stage5: f 512, input stride 16 is not < 16 -> no stride; block 1 at current 16 (rate 1,
    # keep 0.85, axial), then current 32 -> transformer after every block; blocks 2-3 at 32:
    # rate 32 / 16 = 2, keep 1 - 0.2 * 4 / 4 = 0.8.
    'stage5': (dict(filters=512, num_blocks=3, original_resnet_stride=2,
                    original_resnet_input_stride=16),
               [_row([1024, 512, 2048], 1, 1, 'axial', 0.85, True)]
               + [_row([1024, 512, 2048], 1, 2, 'axial', 0.8, True)] * 2),
    # stage5_extra (AxialResNet with no backbone decoder stacks): f 512, 1 block, stride 1,
    # input stride 32: rate 2, keep 0.8, axial, transformer (extra decoder beyond 32).
    'stage5_extra': (dict(filters=512, num_blocks=1, original_resnet_stride=1,
                          original_resnet_input_stride=32),
                     [_row([1024, 512, 2048], 1, 2, 'axial', 0.8, True)]),
    # decoder stages: filters (input stride * 64) // 4, stride 1, one block. Stride 8: f 128,
    # current 8 -> bottleneck, keep 1, no transformer; stride 4: f 64 likewise.
    'decoder_stage1_extra': (dict(filters=128, num_blocks=1, original_resnet_stride=1,
                                  original_resnet_input_stride=8),
                             [_row([128, 128, 512], 1, 1, None, 1.0, False)]),
    'decoder_stage2_extra': (dict(filters=64, num_blocks=1, original_resnet_stride=1,
                                  original_resnet_input_stride=4),
                             [_row([64, 64, 256], 1, 1, None, 1.0, False)]),
}


@pytest.mark.parametrize('stage', sorted(MAX_S_STAGES))
def test_max_s_block_plan_matches_deeplab2_block_group(stage):
  arguments, expected = MAX_S_STAGES[stage]
  plan = dual_path_block_group.block_plan(
      **arguments, output_stride=16, backbone_type='resnet_beta', use_axial_beyond_stride=16,
      use_transformer_beyond_stride=32, attention_bottleneck_expansion=2,
      drop_path_keep_prob=0.8, drop_path_beyond_stride=16, drop_path_schedule='linear')
  assert len(plan) == len(expected)
  for index, (got, want) in enumerate(zip(plan, expected)):
    got, want = dict(got), dict(want)  # the table repeats one dict per stage
    keep = got.pop('keep_prob')
    assert keep == pytest.approx(want.pop('keep_prob')), (stage, index)
    assert got == want, (stage, index)


def test_max_l_wide_block_plan_and_constant_schedule():
  # MaX-DeepLab-L's stage4 (wider ResNet, f 256, input stride 8, stride 2, final 16 < 32):
  # basic blocks [4f, 4f]; drop path beyond stride 4 with the constant schedule: keep 0.8
  # everywhere (8 >= 4); transformers beyond stride 16: after every block (current 16 after
  # the first block's stride).
  plan = dual_path_block_group.block_plan(
      256, 3, 2, 8, output_stride=16, backbone_type='wider_resnet', use_axial_beyond_stride=16,
      use_transformer_beyond_stride=16, attention_bottleneck_expansion=4,
      drop_path_keep_prob=0.8, drop_path_beyond_stride=4, drop_path_schedule='constant')
  assert plan == ([_row([1024, 1024], 2, 1, None, 0.8, True)]
                  + [_row([1024, 256, 1024], 1, 1, 'axial', 0.8, True)] * 2)
  # Its stage5 (input 16, final 32): block 1 axial at 16; the wide "last stage" bottleneck
  # [f, 2f, 4f] never shows because every block there is axial. Without axial attention:
  plan = dual_path_block_group.block_plan(
      512, 2, 2, 16, output_stride=16, backbone_type='wider_resnet', use_axial_beyond_stride=0,
      use_transformer_beyond_stride=0)
  assert [step['filters_list'] for step in plan] == [[512, 1024, 2048]] * 2
  assert [step['atrous_rate'] for step in plan] == [1, 2]
  assert not any(step['transformer'] for step in plan)


def test_block_plan_rejects_bad_arguments():
  with pytest.raises(ValueError, match='power of 2'):
    dual_path_block_group.block_plan(64, 1, 2, 6)
  with pytest.raises(ValueError, match='backbone_type'):
    dual_path_block_group.block_plan(64, 1, 2, 4, backbone_type='vit')


def _stage(index, stride, in_backbone=False, backbone_ends=False):
  return dict(index=index, stride=stride, in_backbone=in_backbone, backbone_ends=backbone_ends,
              high_resolution=stride == 4)


def test_decoder_plan_of_max_s():
  # AxialResNet's loop with no stacks: from 16 halve while the stride is above 4: 8, 4.
  assert dual_path_resnet.decoder_plan(16, 4, 0, 0) == [_stage(1, 8), _stage(2, 4)]


def test_decoder_plan_of_max_l():
  # One backbone and one extra stack: down 16 -> 8 -> 4, up 4 -> 8 -> 16 (stack 1 ends; it is
  # the backbone's last stack, so the backbone output is taken there and the stage also gets
  # an extra block group), down 8 -> 4, up 8 -> 16 (stack 2), and down again to 4 because the
  # loop runs while the stride is above the high-resolution stride.
  plan = dual_path_resnet.decoder_plan(16, 4, 1, 1)
  assert [step['stride'] for step in plan] == [8, 4, 8, 16, 8, 4, 8, 16, 8, 4]
  assert plan[:4] == [_stage(1, 8, True), _stage(2, 4, True), _stage(3, 8, True),
                      _stage(4, 16, True, True)]
  assert plan[4:] == [_stage(k, s) for k, s in zip(range(5, 11), [8, 4, 8, 16, 8, 4])]
  # feature_semantic is the second high-resolution output (stage 6), feature_panoptic the last.
  assert [step['index'] for step in plan if step['high_resolution']] == [2, 6, 10]


def test_presets_are_the_proto_table():
  s, l = dual_path_resnet.PRESETS['max_deeplab_s'], dual_path_resnet.PRESETS['max_deeplab_l']
  changed = {k for k in s if s[k] != l[k]}
  assert changed == {'backbone_type', 'num_blocks', 'memory_channels',
                     'backbone_use_transformer_beyond_stride',
                     'extra_decoder_use_transformer_beyond_stride',
                     'backbone_decoder_num_stacks', 'extra_decoder_num_stacks',
                     'extra_decoder_blocks_per_stage', 'base_transformer_expansion',
                     'global_feed_forward_network_channels', 'attention_bottleneck_expansion',
                     'axial_key_expansion', 'axial_value_expansion', 'drop_path_beyond_stride'}


# ---------------------------------------------------------------------------------------------
# DeepLab2's published numbers (axial_resnet_instances_test, deeplab_test): counts at crop 65.
# ---------------------------------------------------------------------------------------------
def _preset_encoder(name):
  encoder = dual_path_resnet.DualPathResNet(name='encoder', **dual_path_resnet.PRESETS[name])
  endpoints = encoder(np.zeros([1, 65, 65, 3], np.float32), training=False)
  return encoder, endpoints


# ~10 s to build.
def test_max_s_encoder_count_and_shapes_equal_deeplab2():
  encoder, endpoints = _preset_encoder('max_deeplab_s')
  assert _count(encoder.trainable_weights) == 61_726_624
  shapes = {k: list(v.shape) for k, v in endpoints.items()}
  assert shapes['backbone_output'] == [1, 5, 5, 2048]
  assert shapes['feature_panoptic'] == [1, 17, 17, 256]
  assert shapes['feature_semantic'] == [1, 5, 5, 2048]
  assert shapes['transformer_class_feature'] == [1, 128, 256]
  assert shapes['transformer_mask_feature'] == [1, 128, 256]


# 450 M parameters: 24 s on 2 idle cores but 2.7 GB peak memory, so not in CI.
@pytest.mark.slow
def test_max_l_encoder_count_and_shapes_equal_deeplab2():
  encoder, endpoints = _preset_encoder('max_deeplab_l')
  assert _count(encoder.trainable_weights) == 450_523_232
  shapes = {k: list(v.shape) for k, v in endpoints.items()}
  assert shapes['backbone_output'] == [1, 5, 5, 2048]
  assert shapes['feature_panoptic'] == [1, 17, 17, 256]
  assert shapes['feature_semantic'] == [1, 17, 17, 256]
  assert shapes['transformer_class_feature'] == [1, 128, 512]


# DeepLab2's deeplab_test builds MaX-DeepLab-S on COCO (134 classes, pixel head 256 -> 128)
# and counts 61,900,200 trainable parameters without the auxiliary semantic branch.
MAX_S_COCO_TEXTPROTO = """
model_options {
  backbone { name: "max_deeplab_s" output_stride: 16 }
  decoder { feature_key: "feature_semantic" decoder_channels: 256 aspp_channels: 256
            atrous_rates: 6 atrous_rates: 12 atrous_rates: 18 }
  max_deeplab {
    pixel_space_head { output_channels: 128 head_channels: 256 }
    auxiliary_low_level { feature_key: "res3" channels_project: 64 }
    auxiliary_low_level { feature_key: "res2" channels_project: 32 }
    auxiliary_semantic_head { output_channels: 134 head_channels: 256 }
    use_auxiliary_semantic_head: false
  }
}
train_dataset_options { dataset: "coco_panoptic" crop_size: 65 crop_size: 65 }
"""


# ~15 s to build.
def test_max_s_model_count_without_semantic_branch_equals_deeplab2():
  model = builder.build_model(parse(MAX_S_COCO_TEXTPROTO), crop_size=(65, 65))
  assert isinstance(model, max_deeplab.MaXDeepLab)
  assert model.semantic_head is None and model.semantic_decoder is None
  assert _count(model.trainable_weights) == 61_900_200
  outputs = model(np.zeros([1, 65, 65, 3], np.float32), training=False)
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (1, 17, 17, 128)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (1, 128, 134)


# ---------------------------------------------------------------------------------------------
# The dual-path transformer layer against an independent numpy reference.
# ---------------------------------------------------------------------------------------------
def _randomise_batch_norms(layer, seed):
  """Random gammas (the zero-initialised ones too), betas and moving statistics: no BN is the
  identity and every residual branch is open."""
  rng = np.random.default_rng(seed)
  for variable in layer.weights:
    name = variable.path.rsplit('/', 1)[-1]
    if name in ('gamma', 'beta', 'moving_mean'):
      low, high = (0.5, 1.5) if name == 'gamma' else (-0.5, 0.5)
      variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))
    elif name == 'moving_variance':
      variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(np.float32))


class _Reference:
  """float64 numpy forward of DeepLab2's DualPathTransformerLayer.call (inference mode), reading
  the weights by their DeepLab2 names."""

  def __init__(self, layer, num_heads, key_depth, value_depth, activation, epsilon=1e-3):
    self.weights = {v.path.split('/', 1)[1]: v.numpy().astype(np.float64) for v in layer.weights}
    self.act = _ACTIVATIONS[activation]
    self.heads, self.key_depth, self.value_depth = num_heads, key_depth, value_depth
    self.epsilon = epsilon

  def bn(self, x, name, shape=None):
    get = lambda part: self.weights[f'{name}/{part}'].reshape(shape or (-1,))
    return ((x - get('moving_mean')) / np.sqrt(get('moving_variance') + self.epsilon)
            * get('gamma') + get('beta'))

  def conv_bn(self, x, name):
    return self.bn(x @ self.weights[f'{name}/conv/kernel'][0], f'{name}/batch_norm')

  def split(self, qkv):
    """[b, l, 2k + v] -> q, k [b, heads, l, k / heads], v [b, l, heads, v / heads]."""
    b, l, _ = qkv.shape
    q, k, v = np.split(qkv, [self.key_depth, 2 * self.key_depth], axis=-1)
    to_heads = lambda x: x.reshape(b, l, self.heads, -1).transpose(0, 2, 1, 3)
    return to_heads(q), to_heads(k), v.reshape(b, l, self.heads, -1)

  def attention(self, name, query, key, value, softmax_groups=None):
    """BN(per head) logits -> softmax over keys -> BN(per head, channel) -> relu -> concat heads.

    softmax_groups: split the keys at this index and normalise the two parts separately (a
    deliberately wrong variant, to show the comparison can tell).
    """
    logits = np.einsum('bhld,bhmd->bhlm', query, key)
    logits = self.bn(logits, f'{name}/batch_norm_similarity', (1, -1, 1, 1))
    if softmax_groups is None:
      weights = _softmax(logits)
    else:
      weights = np.concatenate([_softmax(logits[..., :softmax_groups]),
                                _softmax(logits[..., softmax_groups:])], axis=-1)
    retrieved = np.einsum('bhlm,bmhd->bhld', weights, value)
    retrieved = self.act(self.bn(retrieved, f'{name}/batch_norm_retrieved_value',
                              (1, self.heads, 1, -1)))
    b, h, l, d = retrieved.shape
    return retrieved.transpose(0, 2, 1, 3).reshape(b, l, h * d)

  def __call__(self, pixels, memory, variant=None):
    b, height, width, channels = pixels.shape
    pixels = pixels.reshape(b, height * width, channels).astype(np.float64)
    memory = memory.astype(np.float64)
    m = self.act(self.conv_bn(memory, 'memory_conv1_bn_act'))
    p = self.act(self.conv_bn(self.act(pixels), 'pixel_conv1_bn_act'))
    mq, mk, mv = self.split(self.conv_bn(m, 'memory_qkv_conv_bn'))
    pq, pk, pv = self.split(self.conv_bn(p, 'pixel_qkv_conv_bn'))
    # Memory queries over [pixel keys, memory keys] under one softmax.
    attended = self.attention('memory_attention', mq, np.concatenate([pk, mk], axis=2),
                              np.concatenate([pv, mv], axis=1),
                              softmax_groups=height * width if variant == 'two_softmaxes'
                              else None)
    memory_1 = self.act(memory + self.conv_bn(attended, 'memory_conv3_bn'))
    ffn = self.conv_bn(self.act(self.conv_bn(memory_1, 'memory_ffn_conv1_bn_act')),
                       'memory_ffn_conv2_bn')
    memory_2 = self.act(memory_1 + ffn)
    # Pixel queries over the keys / values of the *input* memory.
    if variant == 'updated_memory_keys':
      updated = self.act(self.conv_bn(memory_2, 'memory_conv1_bn_act'))
      _, mk, mv = self.split(self.conv_bn(updated, 'memory_qkv_conv_bn'))
    retrieved = self.attention('pixel_attention', pq, mk, mv)
    pixels_1 = pixels + self.conv_bn(retrieved, 'pixel_conv3_bn')
    return pixels_1.reshape(b, height, width, channels), memory_2


def _relu(x):
  return np.maximum(x, 0.0)


def _gelu(x):
  """The exact (erf) GELU, DeepLab2's 'gelu'."""
  return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


_ACTIVATIONS = {'relu': _relu, 'gelu': _gelu}


def _softmax(x):
  x = np.exp(x - x.max(-1, keepdims=True))
  return x / x.sum(-1, keepdims=True)


# relu is DeepLab2's MaX-DeepLab; gelu takes the fused BN + GELU inference path.
@pytest.mark.parametrize('activation', ['relu', 'gelu'])
def test_dual_path_transformer_layer_equals_numpy_reference(activation):
  # filters 16: bottleneck 32, keys 16, values 32 over 4 heads; pixels [2, 3, 5, 12],
  # memory [2, 6, 10] (Cp != Cm != filters so that a transposed width would fail).
  layer = dual_path_transformer.DualPathTransformerLayer(16, num_heads=4, ffn_channels=24,
                                                         activation=activation,
                                                         name='dual_path')
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 3, 5, 12)).astype(np.float32)
  memory = rng.normal(size=(2, 6, 10)).astype(np.float32)
  layer((pixels, memory), training=False)
  _randomise_batch_norms(layer, seed=1)
  got_pixels, got_memory = layer((pixels, memory), training=False)
  assert got_pixels.shape == (2, 3, 5, 12) and got_memory.shape == (2, 6, 10)
  reference = _Reference(layer, num_heads=4, key_depth=16, value_depth=32,
                         activation=activation)
  want_pixels, want_memory = reference(pixels, memory)
  np.testing.assert_allclose(got_pixels, want_pixels, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_memory, want_memory, rtol=1e-4, atol=1e-4)
  # The comparison can tell: separate softmaxes over pixels and memory, or pixel attention
  # reading the updated memory, give other outputs.
  _, wrong_memory = reference(pixels, memory, variant='two_softmaxes')
  assert np.abs(wrong_memory - want_memory).max() > 1e-2
  wrong_pixels, _ = reference(pixels, memory, variant='updated_memory_keys')
  assert np.abs(wrong_pixels - want_pixels).max() > 1e-2


def test_dual_path_transformer_layer_starts_as_identity_and_drop_path_masks_branches():
  layer = dual_path_transformer.DualPathTransformerLayer(16, num_heads=2, ffn_channels=24)
  pixels = tf.random.normal([2, 4, 4, 12], seed=2)
  memory = tf.random.normal([2, 5, 10], seed=3)
  new_pixels, new_memory = layer((pixels, memory), training=False)
  # Zero-initialised BN gammas: P1 = P and M2 = relu(relu(M)) = relu(M).
  np.testing.assert_allclose(new_pixels, pixels, atol=1e-6)
  np.testing.assert_allclose(new_memory, tf.nn.relu(memory), atol=1e-6)
  _randomise_batch_norms(layer, seed=4)
  # Masks zero for sample 0 (branches dropped), 1 / 0.8 for sample 1 (kept, rescaled).
  mask = tf.constant([[[0.0]], [[1.25]]])
  dropped_pixels, dropped_memory = layer((pixels, memory), training=True,
                                         drop_path_masks=[mask, mask, mask])
  np.testing.assert_allclose(dropped_pixels[0], pixels[0], atol=1e-6)
  np.testing.assert_allclose(dropped_memory[0], tf.nn.relu(memory[0]), atol=1e-6)
  assert np.abs(dropped_pixels[1] - pixels[1]).max() > 1e-2


def test_dual_path_transformer_layer_rejects_heads_not_dividing_channels():
  with pytest.raises(ValueError, match='multiples of num_heads'):
    dual_path_transformer.DualPathTransformerLayer(12, num_heads=8)


# ---------------------------------------------------------------------------------------------
# The tiny MaX-DeepLab model.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_max_options():
  return parse(TINY_MAX_TEXTPROTO)


@pytest.fixture(scope='module')
def tiny_max(tiny_max_options):
  return builder.build_model(tiny_max_options)


def test_tiny_max_outputs_have_kmax_keys_and_no_auxiliary_outputs(tiny_max):
  assert isinstance(tiny_max, max_deeplab.MaXDeepLab)
  assert tiny_max.name == 'max_deeplab'
  assert tiny_max.pixel_decoder is None and tiny_max.transformer_decoder is None
  outputs = tiny_max(_images(), training=True)
  assert set(outputs) == set(MAX_KEYS) | {common.PRED_SEMANTIC_LOGITS,
                                          common.PRED_AUXILIARY_OUTPUTS}
  assert outputs[common.PRED_AUXILIARY_OUTPUTS] == ()
  # Stride 4 on 65: 17x17; 8 slots; 7 classes (void is the synthetic set's class 0, so the
  # class head adds none); semantic logits through the semantic decoder (feature_semantic is
  # at stride 16) up to stride 4.
  assert outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape == (2, 17, 17, 8)
  assert outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE].shape == (2, 17, 17, 8)
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (2, 8, 7)
  assert outputs[common.PRED_SEMANTIC_LOGITS].shape == (2, 17, 17, 7)
  inference = tiny_max(_images(), training=False)
  assert set(inference) == set(MAX_KEYS) | {common.PRED_SEMANTIC_LOGITS}
  again = tiny_max(_images(), training=False)
  np.testing.assert_array_equal(inference[common.PRED_PIXEL_SPACE_MASK_LOGITS],
                                again[common.PRED_PIXEL_SPACE_MASK_LOGITS])


def test_tiny_max_encoder_widths(tiny_max):
  encoder = tiny_max.encoder
  assert isinstance(encoder, dual_path_resnet.DualPathResNet)
  endpoints = encoder(np.zeros([1, 65, 65, 3], np.float32), training=False)
  # Width 1/16: stage5 4 * 512 / 16 = 128 channels; decoder stride 4: 4 * 64 / 16 = 16.
  assert endpoints['res5'].shape == (1, 5, 5, 128)
  assert endpoints[common.ENDPOINT_FEATURE_PANOPTIC].shape == (1, 17, 17, 16)
  assert endpoints[common.ENDPOINT_TRANSFORMER_MASK_FEATURE].shape == (1, 8, 16)
  assert encoder.memory_feature.shape == (1, 8, 16)
  # Transformers of 128 * 0.125 = 16 channels: qkv of 2 * 16 + 32 = 64 from a 32 bottleneck.
  qkv = [v for v in encoder.weights if v.path.endswith('memory_qkv_conv_bn/conv/kernel')]
  assert {tuple(v.shape) for v in qkv} == {(1, 32, 64)}
  # [3, 4, 6, 3] * 0.34 = [1, 1, 2, 1] blocks; stage5 and stage5_extra have one transformer.
  assert len(qkv) == 2


def test_tiny_max_loss_is_finite_and_reaches_the_memory(tiny_max_options):
  model = builder.build_model(tiny_max_options)
  descriptor = builder.dataset_descriptor(tiny_max_options)
  loss = loss_builder.build_loss(tiny_max_options, descriptor)
  assert loss_builder.default_num_aux_outputs(tiny_max_options.model_options) == 0
  assert not [term for term in loss.loss_terms if term.startswith('aux_')]
  ground_truth = _ground_truth(descriptor, 65, 2)
  with tf.GradientTape() as tape:
    outputs = model(_images(), training=True)
    losses = loss(ground_truth, outputs, seed=tf.constant([1, 2]))
    total = tf.reduce_sum(losses[common.TOTAL_LOSS])
  for name, value in losses.items():
    assert np.all(np.isfinite(value.numpy())), name
  assert float(total) > 0.0
  for term in (common.PQ_STYLE_LOSS_CLASS_TERM, common.PQ_STYLE_LOSS_MASK_DICE_TERM,
               common.MASK_ID_CROSS_ENTROPY_LOSS, common.INSTANCE_DISCRIMINATION_LOSS,
               common.SEMANTIC_LOSS):
    assert float(tf.reduce_sum(losses[term])) > 0.0, term
  gradient = tape.gradient(total, model.encoder.memory_feature)
  assert gradient is not None and np.any(gradient.numpy())


def test_backbone_variables_exclude_transformer_extra_and_memory(tiny_max):
  backbone = {id(v) for v in tiny_max.backbone_trainable_variables()}
  prefix = f'{tiny_max.name}/encoder/'
  scratch, kept = [], []
  for variable in tiny_max.encoder.trainable_variables:
    assert variable.path.startswith(prefix), variable.path
    below = variable.path[len(prefix):]
    is_scratch = any(part in below for part in ('transformer', 'extra', 'memory_feature'))
    (scratch if is_scratch else kept).append(below)
    assert (id(variable) in backbone) != is_scratch, variable.path
  assert len(backbone) == len(kept)
  # Both groups hold what DeepLab2 puts there.
  assert any(p.startswith('stem/') for p in kept)
  assert {p.split('/')[0] for p in kept} == {'stem', 'stage2', 'stage3', 'stage4', 'stage5'}
  assert 'memory_feature' in scratch
  for part in ('stage5/block1_transformer/', 'stage5_extra/', 'decoder_stage1_extra',
               'class_feature_extra/', 'mask_feature_extra/'):
    assert any(part in p for p in scratch), part
  # The predictor and semantic branch are not encoder variables at all.
  assert not backbone & {id(v) for v in tiny_max.predictor.trainable_variables}


def _layer_round_trip(layer, inputs):
  """Config JSON-clean; the clone, given the same weights, computes the same outputs."""
  config = keras.saving.serialize_keras_object(layer)
  json.dumps(config)
  clone = keras.saving.deserialize_keras_object(config)
  assert type(clone) is type(layer)
  assert clone.get_config() == layer.get_config()
  clone(inputs, training=False)
  assert [w.path.split('/', 1)[1] for w in clone.weights] == [
      w.path.split('/', 1)[1] for w in layer.weights]
  clone.set_weights(layer.get_weights())
  return layer(inputs, training=False), clone(inputs, training=False)


def _assert_nested_close(got, want):
  for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dual_path_transformer_layer_config_round_trip():
  layer = dual_path_transformer.DualPathTransformerLayer(
      16, num_heads=4, bottleneck_expansion=1.5, key_expansion=0.5, value_expansion=1.0,
      ffn_channels=24)
  inputs = (tf.random.normal([1, 3, 4, 12], seed=5), tf.random.normal([1, 5, 10], seed=6))
  layer(inputs, training=False)
  _randomise_batch_norms(layer, seed=7)
  _assert_nested_close(*_layer_round_trip(layer, inputs))


def test_dual_path_block_group_config_round_trip():
  plan = dual_path_block_group.block_plan(8, 2, 2, 16, use_transformer_beyond_stride=32,
                                          drop_path_keep_prob=0.8)
  assert [step['transformer'] for step in plan] == [True, True]
  group = dual_path_block_group.DualPathBlockGroup(
      plan, transformer_filters=16, transformer_args=dict(num_heads=2, ffn_channels=24))
  inputs = (tf.random.normal([1, 5, 5, 16], seed=8), tf.random.normal([1, 4, 12], seed=9))
  group(inputs, training=False)
  _randomise_batch_norms(group, seed=10)
  _assert_nested_close(*_layer_round_trip(group, inputs))


def test_dual_path_resnet_config_round_trip():
  encoder = dual_path_resnet.DualPathResNet(**TINY_ENCODER_ARGS)
  images = tf.random.uniform([1, 65, 65, 3], -1.0, 1.0, seed=11)
  encoder(images, training=False)
  _randomise_batch_norms(encoder, seed=12)
  got, want = _layer_round_trip(encoder, images)
  assert set(got) == set(want)
  for key in got:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=key)


def test_max_model_config_round_trip(tiny_max):
  assert_keras_config_round_trip(tiny_max)


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'mixed_float16'])
def test_tiny_max_mixed_precision(tiny_max_options, policy):
  model = builder.build_model(tiny_max_options, dtype=policy)
  # Variables (the memory too) stay float32; the network computes in the low precision.
  assert all(w.dtype == 'float32' for w in model.weights)
  endpoints = model.encoder(tf.zeros([1, 65, 65, 3]))
  compute = policy.split('_')[1]
  for key in ('stage5', common.ENDPOINT_FEATURE_PANOPTIC,
              common.ENDPOINT_TRANSFORMER_MASK_FEATURE):
    assert endpoints[key].dtype == compute, key
  outputs = model(_images(batch=2), training=True)
  for key in MAX_KEYS + (common.PRED_SEMANTIC_LOGITS,):
    assert outputs[key].dtype == tf.float32, key
    assert np.isfinite(outputs[key].numpy()).all(), key
