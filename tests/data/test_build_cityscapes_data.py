"""Cityscapes converter on gtFine panoptic ground truth made by cityscapesscripts'
createPanopticImgs (--use-train-id) from generated instanceIds PNGs in the real folder layout."""

import contextlib
import io
import os

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.build import cityscapes as build_cityscapes_data
from deeplab2_kmax.data.formats import coco_panoptic
from tests.data import panoptic_fixtures as fx

create_panoptic = pytest.importorskip(
    'cityscapesscripts.preparation.createPanopticImgs',
    reason='cityscapesscripts is not installed (pip install cityscapesscripts)')
labels = pytest.importorskip('cityscapesscripts.helpers.labels')

ROAD, SIDEWALK, GROUND, SKY = 7, 8, 6, 23   # label ids (ground: no train id, ignored)
PERSON, CAR = 24, 26


def instance_ids(rng, height, width):
  """A Cityscapes *_gtFine_instanceIds.png: label id, or label id * 1000 + k for instances,
  or the bare label id for crowd regions of thing classes."""
  ids = np.full((height, width), ROAD, np.uint16)
  ids[: height // 3] = SKY
  ids[height // 3: height // 2] = SIDEWALK
  ids[height // 2:, :4] = GROUND
  ids[-3:, -5:] = 0                           # unlabeled
  ids[-6:-3, 8:14] = CAR                      # crowd of cars
  for k in range(3):
    y, x = int(rng.integers(height // 3, height - 8)), int(rng.integers(4, width - 8))
    cls = CAR if k % 2 == 0 else PERSON
    ids[y:y + 5, x:x + 6] = cls * 1000 + k
  return ids


def expected_from_instance_ids(ids, crowd_as_ignore=True):
  """DeepLab2 panoptic ids straight from instanceIds (independent of any panoptic JSON)."""
  out = np.full(ids.shape, 255 * 1000, np.int64)
  for value in np.unique(ids):
    label = labels.id2label[int(value) // 1000 if value >= 1000 else int(value)]
    if label.trainId in (255, -1):
      continue
    mask = ids == value
    if not label.hasInstances:
      out[mask] = label.trainId * 1000
    elif value < 1000:
      out[mask] = (255 if crowd_as_ignore else label.trainId) * 1000
    else:
      same_class = sorted(v for v in np.unique(ids) if v >= 1000 and v // 1000 == value // 1000)
      out[mask] = label.trainId * 1000 + same_class.index(value) + 1
  return out.astype(np.int32)


@pytest.fixture(scope='module')
def cityscapes_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('cityscapes')
  rng = np.random.default_rng(0)
  truth = {}
  for split, cities in (('train', ('aachen', 'bochum')), ('val', ('frankfurt',)),
                        ('test', ('berlin',))):
    for city in cities:
      for frame in (19, 20):
        prefix = f'{city}_000000_{frame:06d}'
        height, width = 24, 48
        image = fx.random_image(rng, height, width)
        fx.write_png(f'{root}/leftImg8bit/{split}/{city}/{prefix}_leftImg8bit.png', image)
        if split != 'test':
          ids = instance_ids(rng, height, width)
          fx.write_png(f'{root}/gtFine/{split}/{city}/{prefix}_gtFine_instanceIds.png', ids)
          truth[prefix] = ids
  with contextlib.redirect_stdout(io.StringIO()):
    create_panoptic.convert2panoptic(f'{root}/gtFine', None, True, ['train', 'val'])
  return root, truth


def test_cityscapesscripts_layout(cityscapes_root):
  root, _ = cityscapes_root
  assert os.path.exists(root / 'gtFine/cityscapes_panoptic_val_trainId.json')
  assert os.path.exists(root / 'gtFine/cityscapes_panoptic_val_trainId/'
                        'frankfurt_000000_000019_gtFine_panoptic.png')


def test_records_read_back_as_the_instance_ids(cityscapes_root, tmp_path):
  root, truth = cityscapes_root
  results = build_cityscapes_data.build(str(root), str(tmp_path), num_workers=1,
                                        show_progress=False)
  assert [(r.split, r.num_examples, r.num_shards) for r in results] == [
      ('train', 4, 4), ('val', 2, 2), ('test', 2, 2)]
  options = (tmp_path / 'dataset_options.textproto').read_text()
  assert 'dataset: "cityscapes_panoptic"' in options
  maps = {}
  for split in ('train', 'val'):
    maps.update(fx.read_back(f'{tmp_path}/{split}-*.tfrecord', options, crop=65))
  assert sorted(maps) == sorted(truth)
  for prefix, ids in truth.items():
    np.testing.assert_array_equal(maps[prefix], expected_from_instance_ids(ids))
    assert (maps[prefix] // 1000 == 255).any() and (maps[prefix] % 1000 > 0).any()
  test_records = list(tf.data.TFRecordDataset(tf.io.gfile.glob(f'{tmp_path}/test-*')))
  assert len(test_records) == 2


def test_crowd_as_class(cityscapes_root, tmp_path):
  root, truth = cityscapes_root
  build_cityscapes_data.build(str(root), str(tmp_path), splits=['val'],
                              treat_crowd_as_ignore=False, show_progress=False)
  maps = fx.read_back(f'{tmp_path}/val-*.tfrecord', 'dataset: "cityscapes_panoptic"', crop=33)
  for prefix, value in maps.items():
    np.testing.assert_array_equal(value, expected_from_instance_ids(truth[prefix], False))


def test_missing_panoptic_json_says_how_to_create_it(tmp_path):
  fx.write_png(f'{tmp_path}/leftImg8bit/val/ulm/ulm_000000_000019_leftImg8bit.png',
               np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(coco_panoptic.ConversionError, match='createPanopticImgs'):
    build_cityscapes_data.build(str(tmp_path), str(tmp_path / 'out'), show_progress=False)


def test_validator_recognises_the_source_layout_and_finds_no_defect(cityscapes_root):
  from deeplab2_kmax.data.build import validate
  root, truth = cityscapes_root
  report = validate.validate(str(root))
  assert report.title.startswith('Cityscapes source dataset')
  assert report.ok and not report.defects, report.format()
  assert (report.num_images, report.num_labelled) == (len(truth) + 2, len(truth))
