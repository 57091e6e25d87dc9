"""Validation of max_deeplab { }: the backbone must be a dual-path network, and the set
DualPathOptions fields must be values the network can be built with.

Each case overrides one field of the MaX-DeepLab-S COCO recipe and expects exactly one problem,
on that field, whose message quotes the bad value and says what would be right.
"""

import pytest

from deeplab2_kmax.config import loader
from deeplab2_kmax.config import validation
from tests.conftest import REPO_ROOT

MAX_S_CONFIG = REPO_ROOT / 'configs/coco/max_deeplab/max_deeplab_s_os16_res641_400k.textproto'
KMAX_CONFIG = REPO_ROOT / 'configs/coco/kmax_deeplab/kmax_meta_r50_os32.textproto'
ENV = {'COCO_TFRECORD_DIR': '/data/coco', 'INIT_CHECKPOINT': '/ckpt/init'}
FIELD = 'model_options.max_deeplab'


def problems(config_file, *overrides):
  config = loader.load_config(str(config_file), environ=ENV, overrides=list(overrides),
                              validate=False)
  return validation.find_problems(config)


def dual_path(snippet):
  return f'model_options {{ max_deeplab {{ dual_path {{ {snippet} }} }} }}'


def test_recipe_is_valid():
  assert problems(MAX_S_CONFIG) == []


def test_backbone_names_match_the_presets():
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.model import builder
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.model.pixel_encoder import dual_path_resnet
  assert sorted(builder.DUAL_PATH_ENCODERS) == sorted(dual_path_resnet.PRESETS)
  assert set(builder.DUAL_PATH_ENCODERS) <= set(builder.ENCODERS)
  # Validation reads the builder's table: every encoder it builds passes, others do not.
  for name in builder.ENCODERS:
    assert not [p for p in validation.find_problems(_with_backbone(name))
                if p.field == 'model_options.backbone.name' and 'not supported' in p.message]
  assert any('not supported' in p.message for p in validation.find_problems(
      _with_backbone('resnet101')) if p.field == 'model_options.backbone.name')


def _with_backbone(name):
  config = loader.load_config(str(MAX_S_CONFIG), environ=ENV, validate=False)
  config.model_options.backbone.name = name
  return config


# (override, field below model_options.max_deeplab, words the message must contain)
CASES = [
    (dual_path('num_blocks: [3, 4, 6]'), 'dual_path.num_blocks',
     ['[3, 4, 6]', 'four positive block counts']),
    (dual_path('num_blocks: [3, 0, 6, 3]'), 'dual_path.num_blocks',
     ['[3, 0, 6, 3]', 'four positive block counts']),
    (dual_path('memory_channels: 0'), 'dual_path.memory_channels', ['is 0', 'positive']),
    (dual_path('global_feed_forward_network_channels: -256'),
     'dual_path.global_feed_forward_network_channels', ['is -256', 'positive']),
    (dual_path('transformer_ffn_channels: 0'), 'dual_path.transformer_ffn_channels',
     ['is 0', 'positive']),
    (dual_path('transformer_num_heads: 0'), 'dual_path.transformer_num_heads',
     ['is 0', 'positive']),
    (dual_path('backbone_decoder_blocks_per_stage: 0'),
     'dual_path.backbone_decoder_blocks_per_stage', ['is 0', 'positive']),
    (dual_path('extra_decoder_blocks_per_stage: 0'), 'dual_path.extra_decoder_blocks_per_stage',
     ['is 0', 'positive']),
    (dual_path('attention_bottleneck_expansion: 0'), 'dual_path.attention_bottleneck_expansion',
     ['is 0', 'positive']),
    (dual_path('base_transformer_expansion: 0'), 'dual_path.base_transformer_expansion',
     ['is 0', 'positive']),
    (dual_path('axial_key_expansion: -1'), 'dual_path.axial_key_expansion',
     ['is -1', 'positive']),
    (dual_path('axial_value_expansion: 0'), 'dual_path.axial_value_expansion',
     ['is 0', 'positive']),
    (dual_path('transformer_bottleneck_expansion: 0'),
     'dual_path.transformer_bottleneck_expansion', ['is 0', 'positive']),
    (dual_path('transformer_key_expansion: 0'), 'dual_path.transformer_key_expansion',
     ['is 0', 'positive']),
    (dual_path('transformer_value_expansion: -2'), 'dual_path.transformer_value_expansion',
     ['is -2', 'positive']),
    (dual_path('backbone_decoder_num_stacks: -1'), 'dual_path.backbone_decoder_num_stacks',
     ['is -1', '>= 0']),
    (dual_path('extra_decoder_num_stacks: -1'), 'dual_path.extra_decoder_num_stacks',
     ['is -1', '>= 0']),
    (dual_path('backbone_use_transformer_beyond_stride: 24'),
     'dual_path.backbone_use_transformer_beyond_stride', ['is 24', 'power of two', '0 (off)']),
    (dual_path('extra_decoder_use_transformer_beyond_stride: -16'),
     'dual_path.extra_decoder_use_transformer_beyond_stride', ['is -16', 'power of two']),
    (dual_path('use_axial_beyond_stride: 12'), 'dual_path.use_axial_beyond_stride',
     ['is 12', 'power of two']),
    (dual_path('drop_path_beyond_stride: 3'), 'dual_path.drop_path_beyond_stride',
     ['is 3', 'power of two', '0 (every block)']),
    (dual_path('backbone_use_transformer_beyond_stride: 0 '
               'extra_decoder_use_transformer_beyond_stride: 0'),
     'dual_path.backbone_use_transformer_beyond_stride',
     ['extra_decoder_use_transformer_beyond_stride', 'needs dual-path transformers']),
    (dual_path('high_resolution_output_stride: 6'), 'dual_path.high_resolution_output_stride',
     ['is 6', 'use 2, 4 or 8']),
    (dual_path('high_resolution_output_stride: 16'), 'dual_path.high_resolution_output_stride',
     ['is 16', 'below the output stride 16']),
    (dual_path('activation: "swish"'), 'dual_path.activation', ['"swish"', 'relu or gelu']),
    ('model_options { max_deeplab { num_mask_slots: 200 } }', 'num_mask_slots',
     ['200 exceeds max_num_mask_slots (128)']),
    ('model_options { max_deeplab { max_num_mask_slots: 0 num_mask_slots: 0 } }',
     'max_num_mask_slots', ['is 0', 'positive']),
]


@pytest.mark.parametrize('override, field, words', CASES, ids=[c[1] for c in CASES])
def test_bad_dual_path_value_names_the_field(override, field, words):
  found = [p for p in problems(MAX_S_CONFIG, override) if p.field != f'{FIELD}.num_mask_slots'
           or field == 'num_mask_slots']
  assert [p.field for p in found] == [f'{FIELD}.{field}'], found
  for word in words:
    assert word in found[0].message, found[0].message


def test_zero_num_mask_slots_is_reported():
  found = problems(MAX_S_CONFIG, 'model_options { max_deeplab { num_mask_slots: 0 } }')
  assert [(p.field, p.message) for p in found] == [
      (f'{FIELD}.num_mask_slots', 'is 0; it must be positive')]


def test_one_transformer_stride_off_is_fine():
  assert problems(MAX_S_CONFIG, dual_path('backbone_use_transformer_beyond_stride: 0')) == []


def test_max_num_mask_slots_may_exceed_num_mask_slots():
  assert problems(MAX_S_CONFIG, 'model_options { max_deeplab { num_mask_slots: 64 '
                                'max_num_mask_slots: 128 } }') == []


@pytest.mark.parametrize('name', ['resnet50', 'axial_resnet50', 'convnext_tiny'])
def test_max_deeplab_needs_a_dual_path_backbone(name):
  found = problems(MAX_S_CONFIG, f'model_options {{ backbone {{ name: "{name}" }} }}')
  assert [p.field for p in found] == ['model_options.backbone.name']
  assert f'"{name}" is not a dual-path network' in found[0].message
  assert 'max_deeplab_s, max_deeplab_l' in found[0].message


@pytest.mark.parametrize('meta', ['kmax', 'cmt'])
@pytest.mark.parametrize('name', ['max_deeplab_s', 'kmax_max_deeplab_l'])
def test_kmax_and_cmt_cannot_use_the_dual_path_backbones(meta, name):
  overrides = [f'model_options {{ backbone {{ name: "{name}" }} }}']
  if meta == 'cmt':
    overrides.insert(0, 'model_options { cmt { auxiliary_semantic_head { output_channels: 134 '
                        'head_channels: 256 } pixel_space_head { output_channels: 128 '
                        'head_channels: 256 } } }')
  found = problems(KMAX_CONFIG, *overrides)
  assert [p.field for p in found] == ['model_options.backbone.name'], found
  assert f'"{name}" is MaX-DeepLab\'s dual-path network' in found[0].message
  assert f'{meta} {{ }} needs one of resnet50' in found[0].message


def test_unknown_backbone_is_reported_once():
  found = problems(MAX_S_CONFIG, 'model_options { backbone { name: "vgg16" } }')
  assert [p.field for p in found] == ['model_options.backbone.name']
  assert '"vgg16" is not supported' in found[0].message


def test_problem_points_at_the_line(tmp_path):
  text = MAX_S_CONFIG.read_text().replace('activation: "relu"', 'activation: "tanh"')
  path = tmp_path / 'bad.textproto'
  path.write_text(text)
  line = text.splitlines().index('      activation: "tanh"') + 1
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(str(path), environ=ENV)
  assert str(info.value) == (f'{path}:{line}: {FIELD}.dual_path.activation: "tanh" is unknown; '
                             'use relu or gelu')
