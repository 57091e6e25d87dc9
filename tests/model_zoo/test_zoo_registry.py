"""The registry data: complete, consistent with the configs it names, README current."""

import re
import subprocess
import sys

import pytest

from deeplab2_kmax.config import loader
from deeplab2_kmax.model import builder
from deeplab2_kmax.model_zoo import registry

URL_PREFIX = 'https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/'

# DeepLab2 g3doc/projects/max_deeplab.md (COCO only): S at 641 and 1025, L at 1025, each
# after 100k, 200k and 400k steps.
MAX_DEEPLAB_PUBLISHED = [f'max_deeplab_{model}_os16_res{resolution}_{steps}k_coco_train'
                         for model, resolution in (('s', 641), ('s', 1025), ('l', 1025))
                         for steps in (100, 200, 400)]
# DeepLab2 g3doc/projects/kmax_deeplab.md and imagenet_pretrained_checkpoints.md.
PUBLISHED = {
    'coco_panoptic': ['kmax_resnet50_coco_train', 'kmax_maxs_gelu_coco_train',
                      'kmax_convnext_tiny_coco_train', 'kmax_convnext_small_coco_train',
                      'kmax_convnext_base_coco_train', 'kmax_convnext_large_coco_train',
                      'kmax_convnext_large_coco_train_unlabeled'] + MAX_DEEPLAB_PUBLISHED,
    'cityscapes_panoptic': ['kmax_resnet50_cityscapes_train', 'kmax_maxs_gelu_cityscapes_train',
                            'kmax_convnext_tiny_cityscapes_train',
                            'kmax_convnext_small_cityscapes_train',
                            'kmax_convnext_base_cityscapes_train',
                            'kmax_convnext_large_cityscapes_train'],
    'ade20k_panoptic': ['kmax_resnet50_res641_ade20k_train', 'kmax_resnet50_res1281_ade20k_train',
                        'kmax_convnext_large_res641_ade20k_train',
                        'kmax_convnext_large_res1281_ade20k_train'],
    'imagenet': ['resnet50_imagenet1k', 'maxs_gelu_imagenet_22k_1k_224',
                 'max_deeplab_s_backbone_imagenet1k_strong_training_strategy',
                 'max_deeplab_l_backbone_imagenet1k_strong_training_strategy',
                 'convnext_tiny_imagenet_22k_1k_384', 'convnext_small_imagenet_22k_1k_384',
                 'convnext_base_imagenet_22k_1k_384', 'convnext_large_imagenet_22k_1k_384'],
}
# Our encoder name for the backbone part of a checkpoint name.
ENCODERS = {'resnet50': 'resnet50', 'maxs_gelu': 'axial_resnet50', 'convnext_tiny': 'convnext_tiny',
            'convnext_small': 'convnext_small', 'convnext_base': 'convnext_base',
            'convnext_large': 'convnext_large', 'max_deeplab_s': 'max_deeplab_s',
            'max_deeplab_l': 'max_deeplab_l', 'max_deeplab_s_backbone': 'max_deeplab_s',
            'max_deeplab_l_backbone': 'max_deeplab_l'}


@pytest.fixture(scope='module')
def entries():
  return registry.load_registry()


def test_every_published_checkpoint_is_listed(entries):
  by_dataset = {}
  for entry in entries.values():
    by_dataset.setdefault(entry.dataset, []).append(entry.name)
  assert by_dataset == PUBLISHED


def test_urls_digests_and_kinds(entries):
  for entry in entries.values():
    assert entry.url == f'{URL_PREFIX}{entry.name}.tar.gz', entry.name
    assert entry.sha256 == '' or re.fullmatch('[0-9a-f]{64}', entry.sha256), entry.name
    if entry.dataset == 'imagenet':
      expected_kind = 'backbone'
    elif entry.name.startswith('max_deeplab_'):
      expected_kind = 'max_deeplab'
    else:
      expected_kind = 'kmax'
    assert entry.kind == expected_kind, entry.name
    if entry.kind in ('kmax', 'max_deeplab'):
      assert entry.pretrained in entries and entries[entry.pretrained].kind == 'backbone'
    if entry.kind == 'max_deeplab':
      # MaX-DeepLab-S / -L start from DeepLab2's backbone of the same size.
      size = entry.name.split('_')[2]
      assert entry.pretrained == f'max_deeplab_{size}_backbone_imagenet1k_strong_training_strategy'


def test_every_config_exists_and_matches_the_checkpoint(entries):
  for entry in entries.values():
    assert entry.config_path.is_file(), f'{entry.name}: {entry.config} does not exist'
    config = loader.load_config(str(entry.config_path), environ=loader.PlaceholderEnvironment(),
                                validate=False)
    encoder = builder.backbone_name(config.model_options.backbone.name)
    expected = next(ours for part, ours in ENCODERS.items() if entry.name.startswith(
        (f'kmax_{part}_', f'{part}_')))
    assert encoder == expected, entry.name
    if entry.kind != 'backbone':
      assert config.train_dataset_options.dataset == entry.dataset, entry.name
    if entry.kind == 'max_deeplab':
      assert config.model_options.WhichOneof('meta_architecture') == 'max_deeplab', entry.name
      steps = int(re.search(r'_(\d+)k_coco_train$', entry.name).group(1)) * 1000
      assert config.trainer_options.solver_options.training_number_of_steps == steps
      recipe = entry.name[:-len('_coco_train')]
      assert entry.config == f'configs/coco/max_deeplab/{recipe}.textproto', entry.name
    resolution = re.search(r'_res(\d+)_', entry.name)
    if resolution:
      assert list(config.train_dataset_options.crop_size) == [int(resolution.group(1))] * 2


def test_reported_metrics(entries):
  # Spot checks against DeepLab2's model-zoo tables.
  assert entries['kmax_resnet50_coco_train'].metrics['val_pq'] == 53.0
  assert entries['kmax_convnext_large_coco_train'].metrics['test_dev_pq'] == 58.0
  assert entries['kmax_maxs_gelu_cityscapes_train'].metrics['val_miou'] == 82.1
  assert entries['kmax_convnext_large_res1281_ade20k_train'].metrics['val_pq'] == 50.9
  # g3doc/projects/max_deeplab.md: PQ of S-641, S-1025 and L-1025 after 100k/200k/400k steps.
  max_pq = [45.9, 46.5, 47.0, 47.9, 48.7, 49.0, 50.9, 51.1, 51.3]
  assert [entries[name].metrics['val_pq'] for name in MAX_DEEPLAB_PUBLISHED] == max_pq
  assert entries['max_deeplab_l_os16_res1025_400k_coco_train'].metrics == {
      'val_pq': 51.3, 'val_pq_thing': 57.5, 'val_pq_stuff': 42.0,
      'val_pq_deeplab2_pipeline': 51.87}
  for entry in entries.values():
    if entry.kind != 'backbone':
      pq = entry.metrics['val_pq']
      assert min(entry.metrics['val_pq_thing'], entry.metrics['val_pq_stuff']) <= pq
      assert pq <= max(entry.metrics['val_pq_thing'], entry.metrics['val_pq_stuff'])
      assert abs(entry.metrics['val_pq_deeplab2_pipeline'] - pq) < 0.7


def test_readme_is_current():
  current = registry.README_PATH.read_text()
  assert current == registry.render_readme(), (
      'model_zoo/README.md is stale: run python -m deeplab2_kmax.model_zoo readme')
  for entry in registry.load_registry().values():
    assert f'[`{entry.name}`]({entry.url})' in current


def test_cli_list_and_readme_check():
  result = subprocess.run([sys.executable, '-m', 'deeplab2_kmax.model_zoo', 'readme', '--check'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  result = subprocess.run([sys.executable, '-m', 'deeplab2_kmax.model_zoo', 'list'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert 'kmax_convnext_large_res1281_ade20k_train' in result.stdout


def test_bad_registry_files_are_named(tmp_path):
  path = tmp_path / 'registry.json'
  path.write_text('{"checkpoints": [{"name": "x", "kind": "kmax", "dataset": "d", '
                  '"backbone": "b", "config": "c", "url": "u", "sha": ""}]}')
  with pytest.raises(registry.RegistryError, match=r'checkpoints\[0\] has unknown fields'):
    registry.load_registry(str(path))
  path.write_text('{"checkpoints": [{"name": "x", "kind": "max", "dataset": "d", '
                  '"backbone": "b", "config": "c", "url": "u"}]}')
  with pytest.raises(registry.RegistryError, match=r'kind is "max"; use one of .*max_deeplab'):
    registry.load_registry(str(path))


def test_readme_has_a_max_deeplab_section():
  text = registry.render_readme()
  section = text.split('## MaX-DeepLab, COCO panoptic (val2017)\n', 1)[1].split('\n## ', 1)[0]
  rows = [line for line in section.splitlines() if line.startswith('| [`')]
  assert [re.match(r'\| \[`(\w+)`\]', row).group(1) for row in rows] == MAX_DEEPLAB_PUBLISHED
  assert 'test-dev' not in section
  # kMaX's COCO table keeps only the kMaX checkpoints.
  coco = text.split('## COCO panoptic (val2017 / test-dev)\n', 1)[1].split('\n## ', 1)[0]
  assert 'max_deeplab_s_os16' not in coco
