"""Custom COCO-panoptic-format converter: a labelling-tool style export (sparse category ids,
PNG images in a nested folder, no areas or bboxes, string ids), read back through the input
pipeline with the dataset config it writes; the config validates in an experiment config."""

import json

import numpy as np
import pytest
from google.protobuf import text_format

from deeplab2_kmax.config import validation
from deeplab2_kmax.data.build import coco_format as build_coco_format_data
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data import datasets
from deeplab2_kmax.protos import config_pb2
from deeplab2_kmax.protos import dataset_pb2
from tests.conftest import REPO_ROOT
from tests.data import panoptic_fixtures as fx

CATEGORIES = [{'id': 42, 'name': 'crate', 'isthing': 1, 'color': [200, 10, 10]},
              {'id': 7, 'name': 'floor', 'isthing': 0},
              {'id': 99, 'name': 'forklift', 'isthing': 1},
              {'id': 13, 'name': 'wall', 'isthing': 0, 'color': [90, 90, 90]}]
# Sorted by category id: void, floor (7), wall (13), crate (42), forklift (99).
TRAIN_ID = {7: 1, 13: 2, 42: 3, 99: 4}


def make_custom(root, split, count, seed, label_divisor_things=4):
  rng = np.random.default_rng(seed)
  images, annotations, truth = [], [], {}
  for index in range(count):
    height, width = 28, 30 + 3 * index
    stem = f'cam{index % 2}/{split}_frame_{index:03d}'
    fx.write_png(f'{root}/images/{stem}.png', fx.random_image(rng, height, width))
    ids, segments = fx.draw_scene(rng, height, width, [7, 13], [42, 99],
                                  num_things=label_divisor_things, crowd_id=42)
    png = f'{split}_frame_{index:03d}_label.png'
    fx.write_png(f'{root}/{split}_panoptic/{png}', fx.rgb(ids))
    images.append({'id': index + 1, 'file_name': f'{stem}.png', 'height': height,
                   'width': width})
    info = [{'id': str(s['id']), 'category_id': s['category_id'], 'iscrowd': s['iscrowd']}
            for s in segments]
    annotations.append({'image_id': str(index + 1), 'file_name': png, 'segments_info': info})
    truth[f'{split}_frame_{index:03d}'] = (ids, segments)
  fx.write_json(f'{root}/{split}_panoptic.json',
                {'images': images, 'annotations': annotations, 'categories': CATEGORIES})
  return truth


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('custom')
  truth = {split: make_custom(root, split, 3, seed) for seed, split in enumerate(('train',
                                                                                  'val'))}
  out = root / 'out'
  for split in ('train', 'val'):
    build_coco_format_data.build(str(root / 'images'), str(root / f'{split}_panoptic.json'),
                                 str(out), split=split, name='warehouse', show_progress=False)
  return root, out, truth


def test_records_read_back_with_the_written_dataset_config(converted):
  _, out, truth = converted
  config = (out / 'dataset_options.textproto').read_text()
  things = {TRAIN_ID[42], TRAIN_ID[99]}
  for split in ('train', 'val'):
    maps = fx.read_back(f'{out}/{split}-*.tfrecord', config, crop=33)
    assert sorted(maps) == sorted(truth[split])
    for name, (ids, segments) in truth[split].items():
      np.testing.assert_array_equal(
          maps[name], fx.expected_panoptic(ids, segments, TRAIN_ID, things, 0, 256))


def test_dataset_config_describes_the_classes(converted):
  _, out, _ = converted
  options = text_format.Parse((out / 'dataset_options.textproto').read_text(),
                              dataset_pb2.DatasetOptions())
  d = datasets.from_dataset_options(options)
  assert d.name == 'warehouse'
  assert d.class_names == ('void', 'floor', 'wall', 'crate', 'forklift')
  assert d.class_has_instances == (False, False, False, True, True)
  assert d.category_ids == (0, 7, 13, 42, 99)
  assert d.colors[3] == (200, 10, 10) and d.colors[2] == (90, 90, 90)
  assert (d.ignore_label, d.panoptic_label_divisor) == (0, 256)
  assert dict(d.splits_to_sizes) == {'train': 3, 'val': 3}


def test_dataset_config_validates_in_an_experiment_config(converted):
  _, out, _ = converted
  block = (out / 'dataset_options.textproto').read_text()
  text = (REPO_ROOT / 'configs/synthetic/kmax_r50_os32_synthetic.textproto').read_text()
  assert text.count('dataset: "synthetic_panoptic"') == 2
  text = text.replace('dataset: "synthetic_panoptic"', block).replace(
      'output_channels: 7', 'output_channels: 5')
  config = text_format.Parse(text, config_pb2.ExperimentOptions())
  assert validation.find_problems(config) == []


def test_other_categories_for_the_same_config_are_refused(converted, tmp_path):
  root, out, _ = converted
  data = json.loads((root / 'val_panoptic.json').read_text())
  data['categories'][0]['name'] = 'box'
  (tmp_path / 'other.json').write_text(json.dumps(data))
  with pytest.raises(coco_panoptic.ConversionError, match='describes other classes'):
    build_coco_format_data.build(str(root / 'images'), str(tmp_path / 'other.json'), str(out),
                                 panoptic_png_dir=str(root / 'val_panoptic'), split='test',
                                 show_progress=False)


def test_missing_isthing_and_too_many_instances_are_explained(tmp_path):
  make_custom(tmp_path, 'train', 1, seed=3, label_divisor_things=6)
  path = tmp_path / 'train_panoptic.json'
  data = json.loads(path.read_text())
  with pytest.raises(coco_panoptic.ConversionError, match='instance_overflow|label divisor'):
    build_coco_format_data.build(str(tmp_path / 'images'), str(path), str(tmp_path / 'a'),
                                 label_divisor=2, show_progress=False)
  del data['categories'][1]['isthing']
  path.write_text(json.dumps(data))
  with pytest.raises(coco_panoptic.ConversionError, match='has no "isthing" field'):
    build_coco_format_data.build(str(tmp_path / 'images'), str(path), str(tmp_path / 'b'),
                                 show_progress=False)


def test_instance_segmentation_json_is_recognised(tmp_path):
  # What labelme and similar tools export as "COCO" (deeplab2 issue #141): one annotation per
  # object with polygons, no PNGs.
  (tmp_path / 'images').mkdir()
  (tmp_path / 'panoptic').mkdir()
  fx.write_json(f'{tmp_path}/instances.json', {
      'images': [{'id': 1, 'file_name': 'a.jpg', 'height': 10, 'width': 10}],
      'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'iscrowd': 0, 'area': 12.5,
                       'bbox': [1, 1, 5, 5], 'segmentation': [[1, 1, 6, 1, 6, 6]]}],
      'categories': [{'id': 1, 'name': 'thing', 'supercategory': 'x'}]})
  with pytest.raises(coco_panoptic.ConversionError,
                     match='instance-segmentation .* not the panoptic format'):
    build_coco_format_data.build(str(tmp_path / 'images'), str(tmp_path / 'instances.json'),
                                 str(tmp_path / 'out'),
                                 panoptic_png_dir=str(tmp_path / 'panoptic'),
                                 show_progress=False)
