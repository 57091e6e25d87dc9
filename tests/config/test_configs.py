"""Every config under configs/ loads and validates; the kMaX, CMT and MaX-DeepLab recipes carry
DeepLab2's values.

Configs are found by glob, so a new file is covered without editing this test. Each `${VAR}` a
file references is set to a dummy value through the loader's `environ` argument.
"""

import pathlib
import re

import pytest

from deeplab2_kmax.config import loader

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / 'configs'
ALL_CONFIGS = sorted(CONFIG_DIR.rglob('*.textproto'))

_BACKBONES = ('r50', 'axial_r50', 'convnext_tiny', 'convnext_small', 'convnext_base',
              'convnext_large')
# DeepLab2's kMaX recipes (configs/*/kmax_deeplab/), by file name.
RECIPES = (
    [f'coco/kmax_deeplab/kmax_meta_{b}_os32.textproto' for b in _BACKBONES]
    + [f'cityscapes/kmax_deeplab/kmax_meta_{b}_os32.textproto' for b in _BACKBONES]
    + [f'ade20k/kmax_deeplab/kmax_meta_{b}_os32{r}.textproto'
       for b in ('r50', 'convnext_large') for r in ('', '_res1281')])

# CMT-DeepLab recipes (configs/*/cmt_deeplab/): kMaX's recipe with the CMT decoder.
CMT_RECIPES = [f'{dataset}/cmt_deeplab/cmt_meta_{b}_os32.textproto'
               for dataset in ('coco', 'cityscapes') for b in ('r50', 'axial_r50')]

# DeepLab2's MaX-DeepLab recipes (configs/coco/max_deeplab/): (model, crop size, steps in k).
MAX_VARIANTS = [(model, resolution, steps) for model, resolution in (('s', 641), ('s', 1025),
                                                                     ('l', 1025))
                for steps in (100, 200, 400)]


def max_recipe(model: str, resolution: int, steps: int) -> str:
  return f'coco/max_deeplab/max_deeplab_{model}_os16_res{resolution}_{steps}k.textproto'


MAX_RECIPES = [max_recipe(*variant) for variant in MAX_VARIANTS]

_VARIABLE = re.compile(r'\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}')


def dummy_environ(path: pathlib.Path) -> dict[str, str]:
  """A dummy value for every ${VAR} the file mentions (comments too: extras do no harm)."""
  names = _VARIABLE.findall(path.read_text(encoding='utf-8'))
  return {name: f'/dummy/{name.lower()}' for name in names}


def load(relative_path: str):
  path = CONFIG_DIR / relative_path
  return loader.load_config(str(path), environ=dummy_environ(path))


def field(message, dotted: str):
  """Value at a dotted path; repeated fields come back as lists."""
  for name in dotted.split('.'):
    message = getattr(message, name)
  return message if isinstance(message, (str, bytes, bool, int, float)) else list(message)


def _id(path: pathlib.Path) -> str:
  return str(path.relative_to(CONFIG_DIR))


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=_id)
def test_config_loads_and_validates(path):
  config = loader.load_config(str(path), environ=dummy_environ(path))
  assert config.experiment_name
  for options in (config.train_dataset_options, config.eval_dataset_options):
    for pattern in options.file_pattern:
      assert '${' not in pattern and pattern.startswith('/dummy/'), pattern


def test_config_set_is_the_kmax_cmt_and_max_recipes_plus_synthetic():
  found = {_id(path) for path in ALL_CONFIGS}
  synthetic = {name for name in found if name.startswith('synthetic/')}
  assert synthetic, 'no synthetic config under configs/synthetic/'
  assert found - synthetic == set(RECIPES) | set(CMT_RECIPES) | set(MAX_RECIPES)


def _as_kmax(config):
  """A CMT config with its shared fields moved to the kmax member and CMT's own cleared."""
  from deeplab2_kmax.protos import model_pb2  # pylint: disable=g-import-not-at-top
  cmt = config.model_options.cmt
  for name in ('use_coordinate_features', 'update_pixel_features', 'use_reference_masks',
               'stop_gradient_assignment'):
    cmt.ClearField(name)
  # The shared fields have the same numbers in both messages.
  kmax = model_pb2.KMaXDeepLabOptions.FromString(cmt.SerializeToString())
  config.model_options.kmax.CopyFrom(kmax)
  config.trainer_options.loss_options.ClearField('reference_mask_loss')
  config.ClearField('experiment_name')
  return config


@pytest.mark.parametrize('relative_path', CMT_RECIPES + [
    'synthetic/cmt_r50_os32_synthetic_demo.textproto'])
def test_cmt_configs_are_the_kmax_configs_with_the_cmt_decoder(relative_path):
  config = load(relative_path)
  assert config.model_options.WhichOneof('meta_architecture') == 'cmt'
  cmt = config.model_options.cmt
  assert (cmt.use_coordinate_features, cmt.update_pixel_features, cmt.use_reference_masks) == (
      True, True, True)
  assert config.trainer_options.loss_options.reference_mask_loss.weight == 1.0
  kmax = load(relative_path.replace('cmt', 'kmax'))
  kmax.ClearField('experiment_name')
  assert _as_kmax(config) == kmax


def test_cmt_cityscapes_recipe_has_the_papers_setting():
  # MaX-S backbone (our closest encoder: kMaX's MaX-S w/ GeLU), 1025x2049 crops, 60k
  # iterations, batch 32 (cmt-deeplab-paper.md section 6).
  config = load('cityscapes/cmt_deeplab/cmt_meta_axial_r50_os32.textproto')
  assert config.model_options.backbone.name == 'axial_resnet50'
  assert list(config.train_dataset_options.crop_size) == [1025, 2049]
  assert config.trainer_options.solver_options.training_number_of_steps == 60000
  assert config.train_dataset_options.batch_size == 32


def test_experiment_names_are_unique():
  names = [load(_id(path)).experiment_name for path in ALL_CONFIGS]
  assert len(names) == len(set(names))


# Key values of DeepLab2's recipes (reference: deeplab2-architecture.md sections 2.7 and 2.8).
_COCO = {
    'train_dataset_options.dataset': 'coco_panoptic',
    'model_options.kmax.num_cluster_centers': 128,
    'model_options.kmax.high_resolution_output_stride': 4,
    'model_options.kmax.use_auxiliary_semantic_decoder': True,
    'model_options.kmax.transformer_decoder_drop_path_keep_prob': 0.8,
    'model_options.kmax.auxiliary_semantic_head.output_channels': 134,
    'model_options.kmax.instance_discrimination_sample_k': 4096,
    'model_options.kmax.instance_discrimination_sample_temperature': 1.5,
    'train_dataset_options.crop_size': [1281, 1281],
    'train_dataset_options.min_resize_value': [1281],
    'train_dataset_options.max_resize_value': [1281],
    'train_dataset_options.batch_size': 64,
    'train_dataset_options.max_thing_id': 128,
    'train_dataset_options.increase_small_instance_weights': False,
    'train_dataset_options.augmentations.min_scale_factor': 0.3,
    'train_dataset_options.augmentations.max_scale_factor': 1.7,
    'train_dataset_options.augmentations.autoaugment_policy_name': 'simple_classification_policy',
    'train_dataset_options.augmentations.panoptic_copy_paste.panoptic_copy_paste_scale': 0.5,
    'trainer_options.solver_options.base_learning_rate': 5e-4,
    'trainer_options.solver_options.training_number_of_steps': 150000,
    'trainer_options.loss_options.semantic_loss.top_k_percent': 1.0,
    'evaluator_options.thing_area_limit': 400,
    'evaluator_options.stuff_area_limit': 6400,
    'evaluator_options.maskwise_postprocessing.transformer_class_confidence_threshold_thing': 0.7,
    'evaluator_options.maskwise_postprocessing.transformer_class_confidence_threshold_stuff': 0.5,
    'evaluator_options.maskwise_postprocessing.overlapping_threshold': 0.8,
    'evaluator_options.maskwise_postprocessing.reorder_mask_weight': 1.0,
}
_CITYSCAPES = {
    'train_dataset_options.dataset': 'cityscapes_panoptic',
    'model_options.kmax.num_cluster_centers': 256,
    'model_options.kmax.high_resolution_output_stride': 2,
    'model_options.kmax.pixel_decoder.dims': [512, 256, 128, 64, 32],
    'model_options.kmax.pixel_decoder.num_blocks': [1, 5, 1, 1, 1],
    'model_options.kmax.use_auxiliary_semantic_decoder': False,
    'model_options.kmax.transformer_decoder_drop_path_keep_prob': 0.8,
    'model_options.kmax.auxiliary_semantic_head.output_channels': 19,
    'model_options.kmax.instance_discrimination_sample_k': 4096,
    'model_options.kmax.instance_discrimination_sample_temperature': 0.6,
    'train_dataset_options.crop_size': [1025, 2049],
    'eval_dataset_options.crop_size': [1025, 2049],
    'train_dataset_options.batch_size': 32,
    'train_dataset_options.max_thing_id': 256,
    'train_dataset_options.increase_small_instance_weights': True,
    'train_dataset_options.small_instance_weight': 3.0,
    'train_dataset_options.augmentations.min_scale_factor': 0.5,
    'train_dataset_options.augmentations.max_scale_factor': 2.0,
    'train_dataset_options.augmentations.autoaugment_policy_name':
        'simple_classification_policy_magnitude_scale_0.2',
    'trainer_options.solver_options.base_learning_rate': 3e-4,
    'trainer_options.solver_options.training_number_of_steps': 60000,
    'trainer_options.loss_options.semantic_loss.top_k_percent': 0.2,
    'evaluator_options.thing_area_limit': 256,
    'evaluator_options.stuff_area_limit': 2048,
    'evaluator_options.maskwise_postprocessing.transformer_class_confidence_threshold_thing': 0.5,
    'evaluator_options.maskwise_postprocessing.transformer_class_confidence_threshold_stuff': 0.3,
    'evaluator_options.maskwise_postprocessing.overlapping_threshold': 0.9,
    'evaluator_options.maskwise_postprocessing.reorder_mask_weight': 0.0,
}
_ADE20K = {
    'train_dataset_options.dataset': 'ade20k_panoptic',
    'model_options.kmax.num_cluster_centers': 128,
    'model_options.kmax.high_resolution_output_stride': 4,
    'model_options.kmax.use_auxiliary_semantic_decoder': True,
    'model_options.kmax.transformer_decoder_drop_path_keep_prob': 1.0,
    'model_options.kmax.auxiliary_semantic_head.output_channels': 151,
    'model_options.kmax.instance_discrimination_sample_temperature': 1.5,
    'train_dataset_options.batch_size': 64,
    'train_dataset_options.max_thing_id': 256,
    'train_dataset_options.augmentations.min_scale_factor': 0.5,
    'train_dataset_options.augmentations.max_scale_factor': 2.0,
    'trainer_options.solver_options.base_learning_rate': 5e-4,
    'trainer_options.solver_options.training_number_of_steps': 100000,
    'evaluator_options.thing_area_limit': 0,
    'evaluator_options.stuff_area_limit': 0,
    'evaluator_options.maskwise_postprocessing.transformer_class_confidence_threshold_thing': 0.4,
    'evaluator_options.maskwise_postprocessing.transformer_class_confidence_threshold_stuff': 0.4,
}
_ADE20K_641 = dict(_ADE20K, **{
    'train_dataset_options.crop_size': [641, 641],
    'eval_dataset_options.crop_size': [641, 641],
    'model_options.kmax.instance_discrimination_sample_k': 1024,
})
_ADE20K_1281 = dict(_ADE20K, **{
    'train_dataset_options.crop_size': [1281, 1281],
    'eval_dataset_options.crop_size': [1281, 1281],
    'model_options.kmax.instance_discrimination_sample_k': 4096,
})
EXPECTED = {
    'coco/kmax_deeplab/kmax_meta_r50_os32.textproto': _COCO,
    'coco/kmax_deeplab/kmax_meta_convnext_large_os32.textproto': _COCO,
    'cityscapes/kmax_deeplab/kmax_meta_r50_os32.textproto': _CITYSCAPES,
    'cityscapes/kmax_deeplab/kmax_meta_convnext_tiny_os32.textproto': _CITYSCAPES,
    'ade20k/kmax_deeplab/kmax_meta_r50_os32.textproto': _ADE20K_641,
    'ade20k/kmax_deeplab/kmax_meta_convnext_large_os32_res1281.textproto': _ADE20K_1281,
}


@pytest.mark.parametrize('relative_path', sorted(EXPECTED))
def test_recipe_values(relative_path):
  config = load(relative_path)
  for dotted, expected in EXPECTED[relative_path].items():
    actual = field(config, dotted)
    if isinstance(expected, float):
      assert actual == pytest.approx(expected), dotted
    else:
      assert actual == expected, dotted


# Encoder drop-path keep probability of each recipe.
_DROP_PATH = {
    'coco': {'r50': 1.0, 'axial_r50': 0.8, 'convnext_tiny': 0.7, 'convnext_small': 0.6,
             'convnext_base': 0.5, 'convnext_large': 0.4},
    'cityscapes': {'r50': 1.0, 'axial_r50': 0.8, 'convnext_tiny': 0.8, 'convnext_small': 0.7,
                   'convnext_base': 0.6, 'convnext_large': 0.4},
    'ade20k': {'r50': 1.0, 'convnext_large': 0.3},
}
_ENCODER_NAMES = {'r50': 'resnet50', 'axial_r50': 'axial_resnet50'}


@pytest.mark.parametrize('relative_path', RECIPES)
def test_recipe_encoder(relative_path):
  dataset = relative_path.split('/')[0]
  backbone = re.fullmatch(r'kmax_meta_(\w+?)_os32(_res1281)?\.textproto',
                          pathlib.Path(relative_path).name).group(1)
  config = load(relative_path)
  options = config.model_options
  assert options.backbone.name == _ENCODER_NAMES.get(backbone, backbone)
  assert options.backbone.drop_path_keep_prob == pytest.approx(_DROP_PATH[dataset][backbone])
  if backbone.startswith('convnext'):
    # ConvNeXt loads converted ImageNet weights into the encoder only.
    assert options.backbone.pretrained_weights == '/dummy/pretrained_weights'
    assert not options.HasField('initial_checkpoint')
  else:
    assert options.initial_checkpoint == '/dummy/init_checkpoint'
    assert not options.backbone.HasField('pretrained_weights')


def _recipe_without_encoder(relative_path):
  """The recipe with its encoder-specific fields (and the run name) cleared."""
  config = load(relative_path)
  config.ClearField('experiment_name')
  config.model_options.ClearField('initial_checkpoint')
  for name in ('name', 'drop_path_keep_prob', 'pretrained_weights'):
    config.model_options.backbone.ClearField(name)
  return config


@pytest.mark.parametrize('dataset', ['coco', 'cityscapes', 'ade20k'])
def test_recipes_of_a_dataset_differ_only_in_the_encoder(dataset):
  by_resolution = {}
  for relative_path in RECIPES:
    if relative_path.startswith(dataset + '/'):
      key = relative_path.endswith('_res1281.textproto')
      by_resolution.setdefault(key, []).append(relative_path)
  for paths in by_resolution.values():
    first = _recipe_without_encoder(paths[0])
    for other in paths[1:]:
      assert _recipe_without_encoder(other) == first, f'{other} differs from {paths[0]}'


# MaX-DeepLab (reference: deeplab2-architecture.md section 2.9; DeepLab2's
# configs/coco/max_deeplab/*.textproto). Values every MaX recipe shares:
_MAX_COCO = {
    'train_dataset_options.dataset': 'coco_panoptic',
    'eval_dataset_options.dataset': 'coco_panoptic',
    'model_options.backbone.output_stride': 16,
    'model_options.backbone.drop_path_keep_prob': 0.8,
    'model_options.backbone.drop_path_schedule': 'linear',
    'model_options.decoder.feature_key': 'feature_semantic',
    'model_options.decoder.atrous_rates': [6, 12, 18],
    'model_options.max_deeplab.pixel_space_head.output_channels': 128,
    'model_options.max_deeplab.pixel_space_head.head_channels': 256,
    'model_options.max_deeplab.auxiliary_semantic_head.output_channels': 134,
    'model_options.max_deeplab.auxiliary_semantic_head.head_channels': 256,
    'model_options.max_deeplab.instance_discrimination_sample_k': 0,
    'model_options.max_deeplab.num_mask_slots': 128,
    'model_options.max_deeplab.use_auxiliary_semantic_head': True,
    'trainer_options.loss_options.semantic_loss.weight': 1.0,
    'trainer_options.loss_options.semantic_loss.top_k_percent': 1.0,
    'trainer_options.loss_options.pq_style_loss.weight': 3.0,
    'trainer_options.loss_options.mask_id_cross_entropy_loss.weight': 0.3,
    'trainer_options.loss_options.instance_discrimination_loss.weight': 1.0,
    'trainer_options.solver_options.optimizer': 'adam',
    'trainer_options.solver_options.adamw_weight_decay': 0.0,
    'trainer_options.solver_options.learning_policy': 'poly',
    'trainer_options.solver_options.warmup_steps': 5000,
    'trainer_options.solver_options.backbone_learning_rate_multiplier': 0.1,
    'train_dataset_options.batch_size': 64,
    'train_dataset_options.max_thing_id': 128,
    'train_dataset_options.thing_id_mask_annotations': True,
    'eval_dataset_options.thing_id_mask_annotations': True,
    'train_dataset_options.augmentations.min_scale_factor': 0.5,
    'train_dataset_options.augmentations.max_scale_factor': 1.5,
    'train_dataset_options.augmentations.scale_factor_step_size': 0.1,
    'train_dataset_options.augmentations.panoptic_copy_paste.panoptic_copy_paste_scale': 0.0,
    'eval_dataset_options.batch_size': 1,
    'evaluator_options.transformer_post_processing': 'pixelwise',
    'evaluator_options.transformer_class_confidence_threshold': 0.7,
    'evaluator_options.pixel_confidence_threshold': 0.4,
}


def _max_expected(model: str, resolution: int, steps: int) -> dict:
  """DeepLab2's values for one MaX recipe: the shared ones plus what its variant changes."""
  large = model == 'l'
  area_limits = (100, 1600) if resolution == 641 else (256, 4096)
  expected = dict(_MAX_COCO, **{
      'model_options.backbone.name': f'max_deeplab_{model}',
      'trainer_options.solver_options.base_learning_rate': 3e-4 if large else 1e-3,
      'trainer_options.solver_options.training_number_of_steps': steps * 1000,
      'train_dataset_options.augmentations.autoaugment_policy_name':
          'simple_classification_policy' if large else '',
      'evaluator_options.thing_area_limit': area_limits[0],
      'evaluator_options.stuff_area_limit': area_limits[1],
  })
  for split in ('train_dataset_options', 'eval_dataset_options'):
    expected.update({
        f'{split}.crop_size': [resolution, resolution],
        f'{split}.min_resize_value': [resolution],
        f'{split}.max_resize_value': [resolution],
        f'{split}.increase_small_instance_weights': large,
        f'{split}.small_instance_weight': 3.0 if large else 1.0,
        f'{split}.small_instance_threshold': 4096,
    })
  return expected


@pytest.mark.parametrize('variant', MAX_VARIANTS, ids=[max_recipe(*v) for v in MAX_VARIANTS])
def test_max_recipe_values(variant):
  config = load(max_recipe(*variant))
  assert config.model_options.WhichOneof('meta_architecture') == 'max_deeplab'
  assert config.model_options.initial_checkpoint == '/dummy/init_checkpoint'
  for dotted, expected in _max_expected(*variant).items():
    actual = field(config, dotted)
    if isinstance(expected, float):
      assert actual == pytest.approx(expected), dotted
    else:
      assert actual == expected, dotted


def _dual_path_snippet(backbone: str) -> str:
  """A dual_path { } override spelling out the backbone's preset."""
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.model.pixel_encoder import dual_path_resnet
  preset = dual_path_resnet.PRESETS[backbone]
  items = []
  for name, value in preset.items():
    if name == 'backbone_type':
      continue
    if isinstance(value, (list, tuple)):
      items.append(f'{name}: [{", ".join(str(v) for v in value)}]')
    elif isinstance(value, str):
      items.append(f'{name}: "{value}"')
    else:
      items.append(f'{name}: {value}')
  return 'model_options { max_deeplab { dual_path { ' + ' '.join(items) + ' } } }'


@pytest.mark.parametrize('variant', MAX_VARIANTS, ids=[max_recipe(*v) for v in MAX_VARIANTS])
def test_max_recipe_is_the_s_641_400k_recipe_with_upstreams_differences(variant):
  # DeepLab2's nine files differ only in: steps; 1025 crops/resizes and area limits 256/4096;
  # for L the backbone (with its preset), learning rate 3e-4, AutoAugment and small-instance
  # weights 3.0 in train and eval.
  model, resolution, steps = variant
  overrides = [f'trainer_options {{ solver_options {{ training_number_of_steps: '
               f'{steps * 1000} }} }}']
  if resolution != 641:
    for split in ('train_dataset_options', 'eval_dataset_options'):
      overrides.append(f'{split} {{ crop_size: [{resolution}, {resolution}] min_resize_value: '
                       f'{resolution} max_resize_value: {resolution} }}')
    overrides.append('evaluator_options { thing_area_limit: 256 stuff_area_limit: 4096 }')
  if model == 'l':
    overrides += [
        'model_options { backbone { name: "max_deeplab_l" } }',
        _dual_path_snippet('max_deeplab_l'),
        'trainer_options { solver_options { base_learning_rate: 0.0003 } }',
        'train_dataset_options { augmentations { autoaugment_policy_name: '
        '"simple_classification_policy" } }']
    for split in ('train_dataset_options', 'eval_dataset_options'):
      overrides.append(f'{split} {{ increase_small_instance_weights: true '
                       'small_instance_weight: 3.0 }')
  base_path = CONFIG_DIR / max_recipe('s', 641, 400)
  expected = loader.load_config(str(base_path), environ=dummy_environ(base_path),
                                overrides=overrides)
  actual = load(max_recipe(*variant))
  for config in (expected, actual):
    config.ClearField('experiment_name')
  assert actual == expected


@pytest.mark.parametrize('relative_path', MAX_RECIPES)
def test_max_recipe_spells_out_its_backbones_dual_path_preset(relative_path):
  # Builds nothing: compares the network arguments the builder derives from the config.
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.model.pixel_encoder import dual_path_resnet
  config = load(relative_path)
  options = config.model_options
  dual_path = options.max_deeplab.dual_path
  for descriptor in dual_path.DESCRIPTOR.fields:
    is_set = (bool(getattr(dual_path, descriptor.name)) if descriptor.is_repeated
              else dual_path.HasField(descriptor.name))
    assert is_set, f'dual_path.{descriptor.name} is not spelled out'
  preset = dual_path_resnet.PRESETS[options.backbone.name]
  arguments = builder.dual_path_arguments(options)
  for name, value in preset.items():
    actual = arguments[name]
    if isinstance(value, (list, tuple)):
      assert list(actual) == list(value), name
    elif isinstance(value, float):
      assert actual == pytest.approx(value), name
    else:
      assert actual == value, name
  # The same arguments as with the preset alone.
  def as_lists(kwargs):
    return {name: list(v) if isinstance(v, (list, tuple)) else v for name, v in kwargs.items()}
  options.max_deeplab.ClearField('dual_path')
  assert as_lists(builder.dual_path_arguments(options)) == as_lists(arguments)
  assert arguments['num_mask_slots'] == arguments['max_num_mask_slots'] == 128


_INIT_VARIABLES = ('INIT_CHECKPOINT', 'PRETRAINED_WEIGHTS')


@pytest.mark.parametrize('path', [path for path in ALL_CONFIGS
                                  if not _id(path).startswith('synthetic/')], ids=_id)
def test_hostile_recipe_loads_without_init_checkpoint_and_defaults_to_a_zoo_backbone(path):
  # Issue 18: the recipes parse without the user exporting INIT_CHECKPOINT /
  # PRETRAINED_WEIGHTS; the default is the zoo's ImageNet backbone of the recipe's encoder.
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model_zoo import registry  # pylint: disable=g-import-not-at-top
  environ = {name: value for name, value in dummy_environ(path).items()
             if name not in _INIT_VARIABLES}
  config = loader.load_config(str(path), environ=environ)
  checkpoints = [value for value in (config.model_options.initial_checkpoint,
                                     config.model_options.backbone.pretrained_weights) if value]
  assert len(checkpoints) == 1, checkpoints
  entries = registry.load_registry()
  entry = entries.get(checkpoints[0])
  assert entry is not None and entry.kind == registry.KIND_BACKBONE, checkpoints[0]
  # The backbone's own registry config names the same encoder.
  backbone_config = loader.load_config(str(entry.config_path),
                                       environ=loader.PlaceholderEnvironment(), validate=False)
  assert (builder.backbone_name(config.model_options.backbone.name)
          == builder.backbone_name(backbone_config.model_options.backbone.name)), entry.name
  # The zoo's trained checkpoints of this recipe start from the same backbone.
  for trained in entries.values():
    if trained.config == f'configs/{_id(path)}' and trained.kind != registry.KIND_BACKBONE:
      assert trained.pretrained == checkpoints[0], trained.name
