"""The validator flags each kind of defect in fixtures built to contain it, in source
(COCO panoptic format) and converted (TFRecord) datasets, and passes clean data."""

import json
import subprocess
import sys

import numpy as np
import tensorflow as tf

from deeplab2_kmax.data.build import coco_format as build_coco_format_data
from deeplab2_kmax.data.formats import coco_panoptic as cf
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.formats import tfrecord
from deeplab2_kmax.data.build import validate
from tests.conftest import REPO_ROOT
from tests.data import panoptic_fixtures as fx

CATEGORIES = [{'id': 1, 'name': 'person', 'isthing': 1}, {'id': 2, 'name': 'car', 'isthing': 1},
              {'id': 5, 'name': 'road', 'isthing': 0}, {'id': 6, 'name': 'sky', 'isthing': 0}]
DIVISOR = 4   # so that 5 instances of one class overflow


def _image(rng, root, name, height, width, num_things=2, crowd=None):
  ids, segments = fx.draw_scene(rng, height, width, [5, 6], [1, 2], num_things=num_things,
                                crowd_id=crowd)
  fx.write_png(f'{root}/images/{name}.png', fx.random_image(rng, height, width))
  return ids, fx.with_areas(ids, segments)


def make_defective_dataset(root):
  """One clean image and one image per kind of defect; returns {kind: image name}."""
  rng = np.random.default_rng(0)
  annotations, expected = [], {}

  def add(name, ids, segments, png_ids=None):
    fx.write_png(f'{root}/panoptic/{name}.png', fx.rgb(ids if png_ids is None else png_ids))
    annotations.append({'image_id': name, 'file_name': f'{name}.png',
                        'segments_info': segments})

  ids, segs = _image(rng, root, 'clean', 20, 24, crowd=1)
  add('clean', ids, segs)
  ids, segs = _image(rng, root, 'listed_not_painted', 20, 24)
  add('listed_not_painted', ids, segs + [{'id': 777, 'category_id': 6, 'iscrowd': 0,
                                          'area': 5}])
  expected[cf.ID_NOT_IN_PNG] = 'listed_not_painted'
  ids, segs = _image(rng, root, 'painted_not_listed', 20, 24)
  add('painted_not_listed', ids, segs[1:])
  expected[cf.ID_NOT_IN_JSON] = 'painted_not_listed'
  ids, segs = _image(rng, root, 'wrong_area', 20, 24)
  segs[0]['area'] += 3
  add('wrong_area', ids, segs)
  expected[cf.AREA_MISMATCH] = 'wrong_area'
  ids, segs = _image(rng, root, 'two_crowds', 20, 24, crowd=2)
  second = ids.copy()
  second[:3, :3] = 4242
  segs.append({'id': 4242, 'category_id': 2, 'iscrowd': 1})
  add('two_crowds', second, fx.with_areas(second, [s for s in segs if (second == s['id']).any()]))
  expected[cf.CROWD_NOT_UNIQUE] = 'two_crowds'
  ids, segs = _image(rng, root, 'crowded', 40, 48, num_things=10)
  assert sum(s['category_id'] == 1 and not s['iscrowd'] for s in segs) >= DIVISOR
  add('crowded', ids, segs)
  expected[cf.INSTANCE_OVERFLOW] = 'crowded'
  ids, segs = _image(rng, root, 'small_label', 20, 24)
  small = ids[:16, :20]
  add('small_label', small, fx.with_areas(small, [s for s in segs
                                                  if (small == s['id']).any()]))
  expected[cf.SIZE_MISMATCH] = 'small_label'
  ids, segs = _image(rng, root, 'unknown_class', 20, 24)
  segs[0]['category_id'] = 99
  add('unknown_class', ids, segs)
  expected[cf.UNKNOWN_CLASS] = 'unknown_class'
  ids, segs = _image(rng, root, 'no_png', 20, 24)
  annotations.append({'image_id': 'no_png', 'file_name': 'no_png.png', 'segments_info': segs})
  expected[cf.MISSING_FILE] = 'no_png'
  images = [{'id': a['image_id'], 'file_name': f'{a["image_id"]}.png'} for a in annotations]
  fx.write_json(f'{root}/panoptic.json', {'images': images, 'annotations': annotations,
                                          'categories': CATEGORIES})
  return expected


def test_each_source_defect_is_flagged_in_its_image(tmp_path):
  expected = make_defective_dataset(tmp_path)
  report = validate.validate(str(tmp_path / 'panoptic.json'), images=str(tmp_path / 'images'),
                             panoptic_png_dir=str(tmp_path / 'panoptic'),
                             label_divisor=DIVISOR)
  assert set(report.kinds()) == set(expected)
  for defect in report.defects:     # each defect is found in the image made to contain it
    assert f'/{expected[defect.kind]}.png' in defect.file, defect
  by_kind = {d.kind: d for d in report.defects}
  assert 'clean' not in ' '.join(report.images_with_defects)
  assert report.num_images == 9 and not report.ok
  assert 'JSON area' in by_kind[cf.AREA_MISMATCH].message
  assert 'category 99' in by_kind[cf.UNKNOWN_CLASS].message
  assert report.kinds()[cf.INSTANCE_OVERFLOW] == sum(
      max(0, n - (DIVISOR - 1)) for n in _thing_counts(tmp_path / 'panoptic.json', 'crowded'))
  text = report.format(max_listed=2)
  assert f'in 8 of 9 images' in text
  for kind in expected:
    assert f'  {kind}: {report.kinds()[kind]}  (fix: ' in text
  assert text.endswith('result: FAILED (8 kind(s) of defect)')


def _thing_counts(json_path, image):
  annotation = [a for a in json.loads(json_path.read_text())['annotations']
                if a['image_id'] == image][0]
  return [sum(s['category_id'] == c and not s['iscrowd'] for s in annotation['segments_info'])
          for c in (1, 2)]


def test_clean_dataset_passes_and_converts(tmp_path):
  rng = np.random.default_rng(1)
  annotations = []
  for i in range(3):
    ids, segs = _image(rng, tmp_path, f'img{i}', 20, 24, crowd=1)
    fx.write_png(f'{tmp_path}/panoptic/img{i}.png', fx.rgb(ids))
    annotations.append({'image_id': i, 'file_name': f'img{i}.png', 'segments_info': segs})
  images = [{'id': i, 'file_name': f'img{i}.png', 'height': 20, 'width': 24} for i in range(3)]
  fx.write_json(f'{tmp_path}/panoptic.json', {'images': images, 'annotations': annotations,
                                              'categories': CATEGORIES})
  report = validate.validate(str(tmp_path / 'panoptic.json'), images=str(tmp_path / 'images'))
  assert report.ok and not report.defects and report.num_images == 3
  assert report.crowd == 3 and report.segments == report.things + report.stuff + report.crowd
  build_coco_format_data.build(str(tmp_path / 'images'), str(tmp_path / 'panoptic.json'),
                               str(tmp_path / 'out'), show_progress=False)
  converted = validate.validate(str(tmp_path / 'out'))
  assert converted.ok and converted.num_images == converted.num_labelled == 3
  assert converted.things == report.things


def _record(name, label, height=8, width=8, image_size=None):
  image = np.zeros(image_size or (height, width, 3), np.uint8)
  return tfrecord.encode_example(png_encoding.encode_png(image), 'png', name, height, width,
                                 panoptic_label=label)


def test_each_converted_defect_is_flagged(tmp_path):
  good = np.full((8, 8), 4 * 256, np.int32)     # synthetic_panoptic: stuff class 4
  good[:3, :3] = 1 * 256 + 1                    # thing class 1, instance 1
  overflow = good.copy()
  overflow[5:, 5:] = 7 * 256 + 2                # class 7 does not exist (7 classes)
  on_stuff = good.copy()
  on_stuff[5:, 5:] = 5 * 256 + 3                # stuff class 5 with instance 3
  records = [_record('good', good), _record('overflow', overflow),
             _record('on_stuff', on_stuff), _record('resized', good, image_size=(6, 8, 3))]
  with tf.io.TFRecordWriter(str(tmp_path / 'val-00000-of-00002.tfrecord')) as writer:
    for record in records:
      writer.write(record)
  with tf.io.TFRecordWriter(str(tmp_path / 'val-00001-of-00002.tfrecord')) as writer:
    writer.write(_record('fine', good))
  data = (tmp_path / 'val-00001-of-00002.tfrecord').read_bytes()
  (tmp_path / 'val-00001-of-00002.tfrecord').write_bytes(data[:-20])   # truncated
  report = validate.validate(str(tmp_path / 'val-*.tfrecord'),
                             dataset_config='synthetic_panoptic')
  # The resized image contradicts both its stored size and its label's size.
  assert report.kinds() == {cf.UNKNOWN_CLASS: 1, cf.INSTANCE_ON_STUFF: 1, cf.SIZE_MISMATCH: 2,
                            cf.UNREADABLE_FILE: 1}
  by_kind = {d.kind: d for d in report.defects}
  assert '"overflow"' in by_kind[cf.UNKNOWN_CLASS].file
  assert 'label divisor 256' in by_kind[cf.UNKNOWN_CLASS].message
  assert '"on_stuff"' in by_kind[cf.INSTANCE_ON_STUFF].file
  assert '"resized"' in by_kind[cf.SIZE_MISMATCH].file
  assert 'val-00001-of-00002' in by_kind[cf.UNREADABLE_FILE].file
  assert report.max_things_per_image == 1


def test_cli_prints_the_report_and_fails(tmp_path):
  make_defective_dataset(tmp_path)
  proc = subprocess.run(
      [sys.executable, '-m', 'deeplab2_kmax.data.build.validate',
       f'--dataset={tmp_path / "panoptic.json"}', f'--images={tmp_path / "images"}',
       f'--panoptic_png_dir={tmp_path / "panoptic"}', f'--label_divisor={DIVISOR}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert 'images: 9 (9 with labels)' in proc.stdout
  assert 'area_mismatch: 1' in proc.stdout and 'wrong_area.png' in proc.stdout
  assert 'result: FAILED' in proc.stdout and 'Traceback' not in proc.stderr


def _record_ends(data: bytes) -> list:
  """Byte offsets where each record of a TFRecord file ends (8-byte length, 4-byte length CRC,
  payload, 4-byte payload CRC)."""
  ends, offset = [], 0
  while offset < len(data):
    offset += 8 + 4 + int.from_bytes(data[offset:offset + 8], 'little') + 4
    ends.append(offset)
  return ends


def test_hostile_truncated_shard_names_the_count_of_good_records(synthetic_data_dir, tmp_path):
  # A shard written by the project's own writer, cut inside its 6th record: 5 records read fine.
  data = (synthetic_data_dir / 'train-00000-of-00002.tfrecord').read_bytes()
  ends = _record_ends(data)
  assert len(ends) == 12 and ends[-1] == len(data)
  shard = tmp_path / 'train-00000-of-00001.tfrecord'
  shard.write_bytes(data[:ends[4] + 30])
  report = validate.validate(str(shard), dataset_config='synthetic_panoptic')
  text = report.format()
  assert f'{shard}: corrupted or truncated after record 5 (5 records read fine)' in text, text
  assert report.num_images == 5 and not report.ok
  assert 'function_node' not in text and 'IteratorGetNext' not in text
  # The training pipeline's diagnosis says the same; a cut inside the first record reads none.
  assert tfrecord.diagnose_files([str(shard)]) == (
      f'{shard}: corrupted or truncated after record 5 (5 records read fine); '
      're-create this shard')
  shard.write_bytes(data[:ends[0] - 1])
  text = validate.validate(str(shard), dataset_config='synthetic_panoptic').format()
  assert f'{shard}: corrupted or truncated at its first record (0 records read fine)' in text
