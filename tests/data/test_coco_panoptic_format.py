"""data/formats/coco_panoptic.py's readers of one PNG or one annotation: the one reader the
converters, the validator, the evaluation and predict's tests share, with its checks."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding

COCO = datasets.get_built_in(datasets.COCO_PANOPTIC)
# person (category 1, train id 1, thing), banner (category 92, train id 81, stuff).
IDS = np.array([[0, 5, 5, 9],
                [7, 7, 9, 9]])
SEGMENTS = [{'id': 5, 'category_id': 1, 'iscrowd': 0, 'area': 2},
            {'id': 7, 'category_id': 1, 'iscrowd': 1, 'area': 2},
            {'id': 9, 'category_id': 92, 'iscrowd': 0, 'area': 3}]


def _annotation(tmp_path, segments=SEGMENTS, ids=IDS):
  png_encoding.write_png(str(tmp_path / 'a.png'), panoptic_rgb.id_to_rgb(ids))
  return {'image_id': 1, 'file_name': 'a.png', 'segments_info': segments}


def test_read_panoptic_png_round_trips_rgb_and_rgba(tmp_path):
  rgb = panoptic_rgb.id_to_rgb(IDS)
  png_encoding.write_png(str(tmp_path / 'rgb.png'), rgb)
  np.testing.assert_array_equal(coco_panoptic.read_panoptic_png(str(tmp_path / 'rgb.png')), IDS)
  # An alpha channel is dropped, as panopticapi's readers do.
  rgba = np.concatenate([rgb, np.full(IDS.shape + (1,), 255, np.uint8)], axis=-1)
  png_encoding.write_png(str(tmp_path / 'rgba.png'), rgba)
  np.testing.assert_array_equal(coco_panoptic.read_panoptic_png(str(tmp_path / 'rgba.png')),
                                IDS)


@pytest.mark.parametrize('name, data, message', [
    # 16-bit PNGs used to be narrowed to 8 bits silently; grey ones have no id layout.
    ('deep.png', lambda: tf.io.encode_png(np.zeros((2, 2, 3), np.uint16)).numpy(),
     '16-bit RGB PNG; fix: save panoptic labels as 8-bit RGB PNGs'),
    ('grey.png', lambda: png_encoding.encode_png(np.zeros((2, 2), np.uint8)),
     r'single-channel \(grey, 8-bit\) PNG'),
    ('photo.png', lambda: b'\xff\xd8\xff\xe0 not a png', 'not a PNG file'),
])
def test_read_panoptic_png_refuses_what_it_would_misread(tmp_path, name, data, message):
  path = tmp_path / name
  path.write_bytes(data())
  with pytest.raises(coco_panoptic.PanopticFormatError, match=message) as info:
    coco_panoptic.read_panoptic_png(str(path))
  assert str(info.value).startswith(f'{path}: ')


def test_read_panoptic_png_names_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.png'):
    coco_panoptic.read_panoptic_png(str(tmp_path / 'missing.png'))


@pytest.mark.parametrize('treat_crowd_as_ignore, crowd_value', [(False, 1 * 256), (True, 0)])
def test_read_panoptic_annotation_labels_as_the_converters(tmp_path, treat_crowd_as_ignore,
                                                          crowd_value):
  spec = coco_panoptic.spec_from_descriptor(COCO, treat_crowd_as_ignore=treat_crowd_as_ignore)
  panoptic = coco_panoptic.read_panoptic_annotation(_annotation(tmp_path), str(tmp_path), spec)
  # Void -> the ignore label 0; person instance 1; crowd person instance 0 (or ignored); banner.
  assert panoptic.tolist() == [[0, 257, 257, 81 * 256],
                               [crowd_value, crowd_value, 81 * 256, 81 * 256]]


@pytest.mark.parametrize('segments, message', [
    (SEGMENTS[:2], r'1 segment id\(s\) of the PNG are not in segments_info: 9 \(3 px\)'),
    (SEGMENTS[:2] + [dict(SEGMENTS[2], area=4)], 'JSON area 4, PNG has 3 pixels'),
    (SEGMENTS[:2] + [dict(SEGMENTS[2], category_id=250)], 'category 250 is not a known class'),
])
def test_read_panoptic_annotation_refuses_inconsistent_annotations(tmp_path, segments, message):
  spec = coco_panoptic.spec_from_descriptor(COCO, treat_crowd_as_ignore=False)
  with pytest.raises(coco_panoptic.PanopticFormatError, match=message) as info:
    coco_panoptic.read_panoptic_annotation(_annotation(tmp_path, segments), str(tmp_path), spec)
  assert str(info.value).startswith(f'{tmp_path / "a.png"}: ')


def test_conversion_errors_are_panoptic_format_errors():
  # One family of "bad panoptic data" errors: callers catching the general one see both.
  assert issubclass(coco_panoptic.ConversionError, coco_panoptic.PanopticFormatError)
  assert issubclass(coco_panoptic.PanopticFormatError, ValueError)


def test_read_image_keeps_jpeg_and_png_and_re_encodes_other_formats_as_png(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  png = png_encoding.encode_png(rgb)
  (tmp_path / 'a.png').write_bytes(png)
  assert coco_panoptic.read_image(str(tmp_path / 'a.png'), []) == (png, 'png', (7, 5))
  jpeg = tf.io.encode_jpeg(rgb).numpy()
  (tmp_path / 'a.jpg').write_bytes(jpeg)
  assert coco_panoptic.read_image(str(tmp_path / 'a.jpg'), []) == (jpeg, 'jpeg', (7, 5))
  Image.fromarray(rgb).save(tmp_path / 'a.bmp')
  defects = []
  data, image_format, size = coco_panoptic.read_image(str(tmp_path / 'a.bmp'), defects)
  assert (image_format, size, defects) == ('png', (7, 5), [])
  np.testing.assert_array_equal(tf.io.decode_png(data).numpy(), rgb)


def test_segment_bbox_is_cocos_x_y_width_height():
  mask = np.zeros((5, 6), bool)
  mask[1:3, 2:5] = True
  mask[4, 3] = True
  assert coco_panoptic.segment_bbox(mask) == [2, 1, 3, 4]


def test_load_json_names_the_flag_the_missing_list_and_refuses_detection_json(tmp_path):
  # One loader for the converters and the evaluator: errors name the file as the caller knows
  # it (a flag for the evaluator) and the list that is missing.
  path = tmp_path / 'gt.json'
  path.write_text(json.dumps({'annotations': []}))
  with pytest.raises(coco_panoptic.PanopticFormatError,
                     match=r'--gt_json ".*gt.json" has no "categories" list'):
    coco_panoptic.load_json(str(path), '--gt_json', required=('annotations', 'categories'))
  assert coco_panoptic.load_json(str(path)) == {'annotations': []}
  path.write_text(json.dumps({'annotations': [{'segmentation': [[0, 0, 1, 1]], 'bbox': [0] * 4}],
                              'categories': []}))
  with pytest.raises(coco_panoptic.PanopticFormatError, match='instance-segmentation'):
    coco_panoptic.load_json(str(path), '--gt_json')
  with pytest.raises(coco_panoptic.PanopticFormatError,
                     match=r'--pred_json ".*absent.json" does not exist'):
    coco_panoptic.load_json(str(tmp_path / 'absent.json'), '--pred_json')
