"""ADE20K converter on generated data in the layout of the ADE20K panoptic preparation
(ADEChallengeData2016/images/{training,validation}, ade20k_panoptic_{train,val}.json + PNGs)."""

import numpy as np
import pytest

from deeplab2_kmax.data.build import ade20k as build_ade20k_data
from deeplab2_kmax.data import class_tables
from deeplab2_kmax.data.formats import coco_panoptic
from tests.data import panoptic_fixtures as fx

WALL, SKY, PERSON, CAR = 0, 2, 12, 20   # ADE20K-150 category ids (0-based)


def categories():
  return [{'id': cid, 'name': name, 'isthing': int(thing), 'color': list(color)}
          for cid, name, thing, color in class_tables.ADE20K_CATEGORIES if cid != 255]


def make_ade20k(root, seed=0):
  rng = np.random.default_rng(seed)
  truth = {}
  for split, folder, count in (('train', 'training', 3), ('val', 'validation', 2)):
    images, annotations = [], []
    for index in range(count):
      stem = f'ADE_{split}_{index + 1:08d}'
      height, width = 30, 36 + 2 * index
      fx.write_jpeg(f'{root}/images/{folder}/{stem}.jpg', fx.random_image(rng, height, width))
      ids, segments = fx.draw_scene(rng, height, width, [WALL, SKY], [PERSON, CAR],
                                    num_things=5)
      fx.write_png(f'{root}/ade20k_panoptic_{split}/{stem}.png', fx.rgb(ids))
      images.append({'file_name': f'{stem}.jpg', 'height': height, 'width': width, 'id': stem})
      annotations.append({'file_name': f'{stem}.png', 'image_id': stem,
                          'segments_info': fx.with_areas(ids, segments)})
      truth[stem] = (ids, segments)
    fx.write_json(f'{root}/ade20k_panoptic_{split}.json',
                  {'images': images, 'annotations': annotations, 'categories': categories()})
  return truth


def test_records_read_back_as_the_original_panoptic_maps(tmp_path):
  root = tmp_path / 'ADEChallengeData2016'
  truth = make_ade20k(root)
  results = build_ade20k_data.build(str(root), str(tmp_path / 'out'), show_progress=False)
  assert [(r.split, r.num_examples, r.num_shards) for r in results] == [('train', 3, 3),
                                                                        ('val', 2, 2)]
  options = (tmp_path / 'out/dataset_options.textproto').read_text()
  assert 'dataset: "ade20k_panoptic"' in options
  train_id_of = {c['id']: c['id'] + 1 for c in categories()}
  things = {c['id'] + 1 for c in categories() if c['isthing']}
  maps = {}
  for split in ('train', 'val'):
    maps.update(fx.read_back(f'{tmp_path}/out/{split}-*.tfrecord', options, crop=33))
  assert sorted(maps) == sorted(truth)
  for stem, (ids, segments) in truth.items():
    expected = fx.expected_panoptic(ids, segments, train_id_of, things, 0, 1000)
    np.testing.assert_array_equal(maps[stem], expected)
    assert set(np.unique(expected // 1000)) >= {0, WALL + 1, SKY + 1}


def test_unknown_category_is_named(tmp_path):
  root = tmp_path / 'ADEChallengeData2016'
  make_ade20k(root)
  json_path = root / 'ade20k_panoptic_val.json'
  text = json_path.read_text().replace('"category_id": 2,', '"category_id": 150,', 1)
  json_path.write_text(text)
  with pytest.raises(coco_panoptic.ConversionError, match='category 150 is not a known class'):
    build_ade20k_data.build(str(root), str(tmp_path / 'out'), splits=['val'],
                            show_progress=False)


def test_validator_recognises_the_layout(tmp_path):
  from deeplab2_kmax.data.build import validate
  root = tmp_path / 'ADEChallengeData2016'
  truth = make_ade20k(root)
  report = validate.validate(str(root))
  assert report.title.startswith('ADE20K source dataset')
  assert report.ok and not report.defects and report.num_labelled == len(truth)
