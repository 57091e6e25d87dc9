"""Built-in dataset descriptors against the issue's numbers and the COCO categories file."""

import json

import pytest

from deeplab2_kmax.data import datasets
from deeplab2_kmax.protos import dataset_pb2
from tests.conftest import shared_dir


@pytest.mark.parametrize('name, num_classes, ignore, divisor, num_things', [
    ('coco_panoptic', 134, 0, 256, 80),
    ('cityscapes_panoptic', 19, 255, 1000, 8),
    ('ade20k_panoptic', 151, 0, 1000, 100),
    ('synthetic_panoptic', 7, 0, 256, 3),
])
def test_built_in_descriptors(name, num_classes, ignore, divisor, num_things):
  d = datasets.get_built_in(name)
  assert (d.num_classes, d.ignore_label, d.panoptic_label_divisor) == (num_classes, ignore,
                                                                         divisor)
  assert len(d.thing_class_ids) == num_things
  assert len(d.colors) == len(d.category_ids) == len(d.class_has_instances) == num_classes
  assert d.ignore_label not in d.stuff_class_ids


def test_cityscapes_things_are_train_ids_11_to_18():
  assert datasets.get_built_in('cityscapes_panoptic').thing_class_ids == tuple(range(11, 19))


def test_coco_matches_panopticapi_categories():
  path = shared_dir() / 'fixtures/coco-panoptic-sample/panoptic_coco_categories.json'
  if not path.exists():
    pytest.skip(f'{path} is absent (the ../shared fixtures come with the project checkout)')
  categories = sorted(json.loads(path.read_text()), key=lambda c: c['id'])
  d = datasets.get_built_in('coco_panoptic')
  assert d.category_ids[1:] == tuple(c['id'] for c in categories)
  assert d.class_names[1:] == tuple(c['name'] for c in categories)
  assert d.class_has_instances[1:] == tuple(bool(c['isthing']) for c in categories)
  assert d.thing_class_ids == tuple(range(1, 81))


def test_unknown_name_lists_the_built_ins():
  with pytest.raises(ValueError, match='coco_panoptic, synthetic_panoptic'):
    datasets.get_built_in('cocoa')


def test_inline_round_trip():
  d = datasets.get_built_in('cityscapes_panoptic')
  again = datasets.from_inline_options(datasets.to_inline_options(d))
  assert again == d
  options = dataset_pb2.DatasetOptions(dataset_descriptor=datasets.to_inline_options(d))
  assert datasets.from_dataset_options(options) == d


def test_crop_size_of_reads_one_or_two_values():
  assert datasets.crop_size_of([641, 513]) == (641, 513)
  assert datasets.crop_size_of([513]) == (513, 513)
  options = dataset_pb2.DatasetOptions(crop_size=[129])
  assert datasets.crop_size_of(options.crop_size) == (129, 129)
  for values in ([], [1, 2, 3]):
    with pytest.raises(ValueError, match='eval_dataset_options.crop_size'):
      datasets.crop_size_of(values, 'eval_dataset_options.crop_size')
