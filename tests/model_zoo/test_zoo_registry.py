"""The registry data: complete, consistent with the configs it names, README current."""

import re
import subprocess
import sys

import pytest

from deeplab2_kmax.config import loader
from deeplab2_kmax.config import validation
from deeplab2_kmax.model_zoo import registry

URL_PREFIX = 'https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/'

# DeepLab2 g3doc/projects/kmax_deeplab.md and imagenet_pretrained_checkpoints.md.
PUBLISHED = {
    'coco_panoptic': ['kmax_resnet50_coco_train', 'kmax_maxs_gelu_coco_train',
                      'kmax_convnext_tiny_coco_train', 'kmax_convnext_small_coco_train',
                      'kmax_convnext_base_coco_train', 'kmax_convnext_large_coco_train',
                      'kmax_convnext_large_coco_train_unlabeled'],
    'cityscapes_panoptic': ['kmax_resnet50_cityscapes_train', 'kmax_maxs_gelu_cityscapes_train',
                            'kmax_convnext_tiny_cityscapes_train',
                            'kmax_convnext_small_cityscapes_train',
                            'kmax_convnext_base_cityscapes_train',
                            'kmax_convnext_large_cityscapes_train'],
    'ade20k_panoptic': ['kmax_resnet50_res641_ade20k_train', 'kmax_resnet50_res1281_ade20k_train',
                        'kmax_convnext_large_res641_ade20k_train',
                        'kmax_convnext_large_res1281_ade20k_train'],
    'imagenet': ['resnet50_imagenet1k', 'maxs_gelu_imagenet_22k_1k_224',
                 'convnext_tiny_imagenet_22k_1k_384', 'convnext_small_imagenet_22k_1k_384',
                 'convnext_base_imagenet_22k_1k_384', 'convnext_large_imagenet_22k_1k_384'],
}
# Our encoder name for the backbone part of a checkpoint name.
ENCODERS = {'resnet50': 'resnet50', 'maxs_gelu': 'axial_resnet50', 'convnext_tiny': 'convnext_tiny',
            'convnext_small': 'convnext_small', 'convnext_base': 'convnext_base',
            'convnext_large': 'convnext_large'}


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
    assert entry.kind == ('backbone' if entry.dataset == 'imagenet' else 'kmax'), entry.name
    if entry.kind == 'kmax':
      assert entry.pretrained in entries and entries[entry.pretrained].kind == 'backbone'


def test_every_config_exists_and_matches_the_checkpoint(entries):
  for entry in entries.values():
    assert entry.config_path.is_file(), f'{entry.name}: {entry.config} does not exist'
    config = loader.load_config(str(entry.config_path), environ=loader.PlaceholderEnvironment(),
                                validate=False)
    encoder = validation.backbone_name(config.model_options.backbone.name)
    expected = next(ours for part, ours in ENCODERS.items() if entry.name.startswith(
        (f'kmax_{part}_', f'{part}_')))
    assert encoder == expected, entry.name
    if entry.kind == 'kmax':
      assert config.train_dataset_options.dataset == entry.dataset, entry.name
    resolution = re.search(r'_res(\d+)_', entry.name)
    if resolution:
      assert list(config.train_dataset_options.crop_size) == [int(resolution.group(1))] * 2


def test_reported_metrics(entries):
  # Spot checks against DeepLab2's model-zoo tables.
  assert entries['kmax_resnet50_coco_train'].metrics['val_pq'] == 53.0
  assert entries['kmax_convnext_large_coco_train'].metrics['test_dev_pq'] == 58.0
  assert entries['kmax_maxs_gelu_cityscapes_train'].metrics['val_miou'] == 82.1
  assert entries['kmax_convnext_large_res1281_ade20k_train'].metrics['val_pq'] == 50.9
  for entry in entries.values():
    if entry.kind == 'kmax':
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
