"""Parity of our MaX-DeepLab-S and -L with DeepLab2's: parameter counts and checkpoint mapping.

tests/model/data/deeplab2_max_deeplab_{s,l}_variables.txt.gz list every variable (key and
shape) of the checkpoint DeepLab2 (64bc1c1, Keras 2) writes for its COCO MaX-DeepLab-S / -L
model (`tf.train.Checkpoint(**DeepLab.checkpoint_items)`), and the counts below are DeepLab2's
own: 61,726,624 / 450,523,232 trainable encoder parameters (its axial_resnet_instances_test),
61,900,200 trainable MaX-DeepLab-S parameters without the auxiliary semantic branch (its
deeplab_test), and the totals counted on the same models. Parameter counts do not depend on the
crop, so the models are built at crop 65 (MaX-DeepLab-L has 451.6 M parameters: ~20 s).
"""

import gzip
import json
import os

import numpy as np
import pytest

from deeplab2_kmax.config import loader
from deeplab2_kmax.model import builder
from deeplab2_kmax.checkpoint import deeplab2_key_map
from deeplab2_kmax.checkpoint import deeplab2_conversion

REPO = os.path.join(os.path.dirname(__file__), '..', '..')
S_CONFIG = os.path.join(REPO, 'configs', 'coco', 'max_deeplab',
                        'max_deeplab_s_os16_res641_400k.textproto')
DATA = os.path.join(os.path.dirname(__file__), 'data')

# DeepLab2's numbers for its COCO models (134 classes).
DEEPLAB2 = {
    'max_deeplab_s': dict(total=77_990_256, trainable=77_756_942, tensors=907,
                          encoder_trainable=61_726_624, without_semantic=61_900_200),
    'max_deeplab_l': dict(total=451_622_800, trainable=450_871_278, tensors=1672,
                          encoder_trainable=450_523_232, without_semantic=450_763_880),
}


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _build(backbone):
  config = loader.load_config(S_CONFIG, environ={'INIT_CHECKPOINT': '',
                                                 'COCO_TFRECORD_DIR': '/tmp'})
  if backbone != 'max_deeplab_s':
    # The S config spells out MaX-S's dual-path values; unset, they follow the backbone.
    config.model_options.backbone.name = backbone
    config.model_options.max_deeplab.ClearField('dual_path')
  return builder.build_model(config, crop_size=(65, 65))


def _upstream_shapes(name):
  shapes = {}
  with gzip.open(os.path.join(DATA, f'deeplab2_{name}_variables.txt.gz'), 'rt') as f:
    for line in f:
      if not line.startswith('#'):
        key, shape = line.rstrip('\n').split('\t')
        shapes[key] = tuple(json.loads(shape))
  return shapes


@pytest.fixture(scope='module', params=['max_deeplab_s', 'max_deeplab_l'])
def built(request):
  return request.param, _build(request.param)


def test_parameter_counts_equal_deeplab2(built):
  backbone, model = built
  expected = DEEPLAB2[backbone]
  assert _count(model.weights) == expected['total']
  assert _count(model.trainable_weights) == expected['trainable']
  assert len(model.weights) == expected['tensors']
  assert _count(model.encoder.trainable_weights) == expected['encoder_trainable']
  # DeepLab2's count without the auxiliary semantic decoder and head.
  semantic = [v for v in model.trainable_weights if '/semantic_' in v.path]
  assert _count(model.trainable_weights) - _count(semantic) == expected['without_semantic']


def test_every_deeplab2_variable_maps_to_one_variable_of_the_same_shape(built):
  backbone, model = built
  upstream = _upstream_shapes(backbone)
  assert len(upstream) == DEEPLAB2[backbone]['tensors']
  mapping, unmatched, unmapped = deeplab2_key_map.build_mapping(upstream, model)
  assert unmatched == [] and unmapped == []
  assert len(set(mapping.values())) == len(mapping) == len(upstream)
  ours = deeplab2_key_map.model_variable_paths(model)
  wrong = {key: (upstream[key], tuple(ours[path].shape)) for key, path in mapping.items()
           if upstream[key] != tuple(ours[path].shape)}
  assert not wrong
  # The inverse mapping gives DeepLab2's keys back.
  assert {deeplab2_key_map.ours_to_upstream(path): key
          for key, path in mapping.items()} == {key: key for key in mapping}


def test_backbone_learning_rate_group_excludes_deeplab2s_scratch_variables():
  # DeepLab2 scales the backbone rate for encoder variables whose name contains none of
  # 'transformer', 'extra', 'memory_feature' (runner_utils.check_if_variable_in_backbone).
  model = _build('max_deeplab_s')
  backbone = {id(v) for v in model.backbone_trainable_variables()}
  for variable in model.encoder.trainable_variables:
    below_encoder = variable.path.split('/encoder/', 1)[1]
    scratch = any(word in below_encoder for word in ('transformer', 'extra', 'memory_feature'))
    assert (id(variable) in backbone) != scratch, variable.path
  assert not backbone & {id(v) for v in model.predictor.trainable_variables}
  assert _count(model.backbone_trainable_variables()) > 0


class _ShapeOnlyReader:
  """A checkpoint reader of zeros with the listed shapes (mapping and shapes are under test)."""

  def __init__(self, shapes):
    self._shapes = shapes

  def get_variable_to_shape_map(self):
    return dict(self._shapes)

  def get_tensor(self, key):
    return np.zeros(self._shapes[key], np.float32)


def test_deeplab2_imagenet_backbone_fills_the_encoder_except_what_trains_from_scratch(built):
  # DeepLab2's MaX ImageNet backbones (max_deeplab_{s,l}_backbone_imagenet1k_...) are the
  # classification networks without transformers: as backbone.pretrained_weights they fill
  # every encoder variable except the transformer / extra / memory ones, and nothing else.
  backbone, model = built
  upstream = _upstream_shapes(f'{backbone}_backbone')
  report = deeplab2_conversion.from_deeplab2(_ShapeOnlyReader(upstream), model, encoder_only=True)
  assert report.unused == [] and report.mismatched == [] and report.problems == []
  assert len(report.values) == len(upstream)
  scratch = [key for key in report.allowed if key.startswith('encoder/')]
  assert scratch and all(any(word in key for word in ('transformer', 'extra', 'memory_feature'))
                         for key in scratch)
  filled = sum(int(np.prod(value.shape)) for value in report.values.values())
  pretrained = [v for v in model.encoder.weights if model.encoder.is_backbone_variable(v)]
  assert filled == _count(pretrained)
