"""Format writers and readers: id <-> RGB, label maps -> COCO / Cityscapes / two-channel."""

import json
import os

import numpy as np
import pytest

import evaluation_testing
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.evaluation import formats
from deeplab2_kmax.evaluation import panoptic_quality as pq_lib

COCO = datasets.get_built_in(datasets.COCO_PANOPTIC)
CITYSCAPES = datasets.get_built_in(datasets.CITYSCAPES_PANOPTIC)


def test_id_rgb_round_trip_and_layout(tmp_path):
  ids = np.array([[0, 1, 255, 256], [65535, 65536, 256 ** 3 - 1, 4260062]])
  rgb = panoptic_rgb.id_to_rgb(ids)
  # id = R + 256 G + 256^2 B: 4260062 = 222 + 256 * 0 + 65536 * 65.
  assert rgb[1, 3].tolist() == [222, 0, 65]
  assert rgb[0, 3].tolist() == [0, 1, 0]
  np.testing.assert_array_equal(panoptic_rgb.rgb_to_id(rgb), ids)
  png_encoding.write_png(str(tmp_path / 'ids.png'), rgb)
  np.testing.assert_array_equal(coco_format.read_panoptic_png(str(tmp_path / 'ids.png')), ids)
  with pytest.raises(ValueError, match='must lie in'):
    panoptic_rgb.id_to_rgb(np.array([[256 ** 3]]))


def test_real_coco_png_decodes_to_json_ids(coco_sample_dir):
  with open(os.path.join(coco_sample_dir, 'panoptic_examples.json')) as f:
    annotation = json.load(f)['annotations'][0]
  ids = coco_format.read_panoptic_png(
      os.path.join(coco_sample_dir, 'panoptic_examples', annotation['file_name']))
  assert ids.shape == (427, 640)
  listed = {s['id']: s['area'] for s in annotation['segments_info']}
  values, counts = np.unique(ids, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {0: 2712, **listed}


def test_segments_from_label_map_void_crowd_and_category_ids():
  # COCO train ids: 0 void (ignore), 1 person (category 1), 81 banner (category 92, stuff).
  panoptic = np.array([[1 * 256 + 1, 1 * 256 + 1, 81 * 256, 0],
                       [1 * 256 + 7, 1 * 256 + 7, 81 * 256, 0],
                       [1 * 256 + 3, 1 * 256 + 4, 81 * 256, 81 * 256]])
  crowd = np.zeros(panoptic.shape, bool)
  crowd[2, :2] = True  # Two person instances in a crowd region: one crowd segment.
  ids, segments = formats.segments_from_panoptic_label(
      panoptic, formats.LabelSpace.from_descriptor(COCO), is_crowd=crowd)
  assert ids.tolist() == [[1, 1, 3, 0], [2, 2, 3, 0], [4, 4, 3, 3]]
  assert segments == [
      {'id': 1, 'category_id': 1, 'iscrowd': 0, 'area': 2, 'bbox': [0, 0, 2, 1]},
      {'id': 2, 'category_id': 1, 'iscrowd': 0, 'area': 2, 'bbox': [0, 1, 2, 1]},
      {'id': 3, 'category_id': 92, 'iscrowd': 0, 'area': 4, 'bbox': [2, 0, 2, 3]},
      {'id': 4, 'category_id': 1, 'iscrowd': 1, 'area': 2, 'bbox': [0, 2, 2, 1]}]
  with pytest.raises(formats.PanopticFormatError, match='train id 200, outside'):
    formats.segments_from_panoptic_label(np.array([[200 * 256]]),
                                         formats.LabelSpace.from_descriptor(COCO),
                                         image_name='x')


def test_coco_writer_maps_train_ids_back_to_category_ids(tmp_path):
  # person (train 1 -> 1), toothbrush (80 -> 90), rug-merged (the last, 133 -> 200).
  panoptic = np.zeros((4, 6), np.int64)
  panoptic[:2, :3] = 1 * 256 + 5
  panoptic[:2, 3:] = 80 * 256 + 2
  panoptic[2:, :] = 133 * 256
  annotation = formats.write_coco_panoptic(panoptic, COCO, 7, 'a.png', str(tmp_path))
  assert [(s['category_id'], s['area']) for s in annotation['segments_info']] == [
      (1, 6), (90, 6), (200, 12)]
  categories = {c['id']: c for c in coco_format.coco_categories(COCO)}
  assert len(categories) == 133 and 0 not in categories
  assert categories[90]['isthing'] == 1 and categories[200]['isthing'] == 0
  back = coco_format.read_panoptic_annotation(
      annotation, str(tmp_path),
      coco_format.spec_from_descriptor(COCO, treat_crowd_as_ignore=False))
  # Same classes and grouping; instances renumbered from 1 per class.
  assert np.unique(back // 256).tolist() == [1, 80, 133]
  assert (back[:2, :3] == 1 * 256 + 1).all() and (back[:2, 3:] == 80 * 256 + 1).all()


def test_two_channel_writer_layout(tmp_path):
  panoptic = np.array([[1 * 256 + 3, 0], [133 * 256, 80 * 256 + 255]])
  image = formats.two_channel_from_panoptic_label(panoptic, COCO)
  assert image[..., 0].tolist() == [[1, 0], [200, 90]]
  assert image[..., 1].tolist() == [[3, 0], [0, 255]]
  assert not image[..., 2].any()
  train_ids = formats.two_channel_from_panoptic_label(panoptic, COCO, use_train_ids=True)
  assert train_ids[..., 0].tolist() == [[1, 0], [133, 80]]
  with pytest.raises(formats.PanopticFormatError, match='do not fit the 8-bit'):
    formats.two_channel_from_panoptic_label(np.array([[1 * 1000 + 300]]), CITYSCAPES)
  formats.write_two_channel_png(panoptic, COCO, str(tmp_path / 'p.png'))
  np.testing.assert_array_equal(png_encoding.read_png(str(tmp_path / 'p.png')), image)


def test_raw_panoptic_formats_of_the_evaluator_options(tmp_path):
  # Cityscapes: train id 11 person (label id 24) instance 300; 0 road (7); 255 ignore.
  panoptic = np.array([[11 * 1000 + 300, 0], [255 * 1000 + 7, 11 * 1000 + 2]])
  path = formats.write_raw_panoptic(panoptic, CITYSCAPES, str(tmp_path / 'a'),
                                    formats.RAW_THREE_CHANNEL_PNG)
  image = png_encoding.read_png(path)
  assert image[..., 0].tolist() == [[24, 7], [0, 24]]
  assert (image[..., 1].astype(int) * 256 + image[..., 2]).tolist() == [[300, 0], [0, 2]]
  path = formats.write_raw_panoptic(panoptic, CITYSCAPES, str(tmp_path / 'b'),
                                    formats.RAW_TWO_CHANNEL_NUMPY, convert_to_eval_ids=False)
  array = np.load(path)
  assert array.dtype == np.int32 and array[..., 0].tolist() == [[11, 0], [255, 11]]
  assert array[..., 1].tolist() == [[300, 0], [0, 2]]
  with pytest.raises(formats.PanopticFormatError, match='do not fit the 8-bit'):
    formats.write_raw_panoptic(panoptic, CITYSCAPES, str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='is not one of'):
    formats.write_raw_panoptic(panoptic, CITYSCAPES, str(tmp_path / 'd'), 'jpeg')


def test_two_channel_sample_converts_to_the_coco_ground_truth(coco_sample_dir):
  """The sample's two-channel PNGs, converted, segment the images exactly as the COCO GT."""
  with open(os.path.join(coco_sample_dir, 'panoptic_examples.json')) as f:
    gt_json = json.load(f)
  categories = {c['id']: c for c in gt_json['categories']}
  accumulator = pq_lib.PanopticQualityAccumulator(categories)
  for annotation in gt_json['annotations']:
    gt_ids = coco_format.read_panoptic_png(
        os.path.join(coco_sample_dir, 'panoptic_examples', annotation['file_name']))
    two_channel = png_encoding.read_png(
        os.path.join(coco_sample_dir, 'panoptic_examples_2ch_format', annotation['file_name']))
    ids, segments = formats.segments_from_two_channel(two_channel, categories)
    assert len(segments) == len(annotation['segments_info'])
    # Same partition: every (gt id, converted id) pair occurs for exactly one of each.
    pairs = np.unique(gt_ids * 1000 + ids)
    assert len(pairs) == len(np.unique(gt_ids)) == len(np.unique(ids))
    accumulator.update(gt_ids, annotation['segments_info'], ids, segments)
  assert accumulator.results()['All'] == {'pq': 1.0, 'sq': 1.0, 'rq': 1.0, 'n': 8}
  with pytest.raises(formats.PanopticFormatError, match='category 250 is not one of'):
    formats.segments_from_two_channel(np.full((2, 2, 3), 250, np.uint8), categories)


def test_cityscapes_writer_layout(tmp_path):
  # Train ids: 0 road (label id 7), 11 person (24), 13 car (26); 255 ignore.
  panoptic = np.array([[0 * 1000, 0 * 1000, 11 * 1000 + 4, 11 * 1000 + 4],
                       [13 * 1000 + 9, 11 * 1000 + 2, 11 * 1000 + 5, 255 * 1000],
                       [13 * 1000 + 1, 11 * 1000 + 2, 11 * 1000 + 5, 255 * 1000]])
  crowd = np.zeros(panoptic.shape, bool)
  crowd[1:, 2] = True
  ids = formats.cityscapes_ids_from_panoptic_label(panoptic, CITYSCAPES, crowd)
  # Persons 2 and 4 -> 24000, 24001 (label order); crowd person -> 24; cars 1, 9 -> 26000, 26001.
  assert ids.tolist() == [[7, 7, 24001, 24001], [26001, 24000, 24, 0], [26000, 24000, 24, 0]]
  annotation = formats.write_cityscapes_panoptic(panoptic, CITYSCAPES, 'aachen_000000_000019',
                                                 str(tmp_path), is_crowd=crowd)
  assert annotation['file_name'] == 'aachen_000000_000019_panoptic.png'
  assert [(s['id'], s['category_id'], s['iscrowd'], s['area'])
          for s in annotation['segments_info']] == [
              (7, 7, 0, 2), (24, 24, 1, 2), (24000, 24, 0, 2), (24001, 24, 0, 2),
              (26000, 26, 0, 1), (26001, 26, 0, 1)]
  np.testing.assert_array_equal(
      coco_format.read_panoptic_png(str(tmp_path / annotation['file_name'])), ids)


def test_descriptor_categories_for_a_custom_dataset():
  descriptor = evaluation_testing.make_descriptor(3, things=(1,), ignore_label=0,
                                                  category_ids=(0, 10, 20))
  assert [(c['id'], c['isthing']) for c in coco_format.coco_categories(descriptor)] == [
      (10, 1), (20, 0)]
  assert [c['id'] for c in coco_format.coco_categories(descriptor, use_train_ids=True)] == [1, 2]
