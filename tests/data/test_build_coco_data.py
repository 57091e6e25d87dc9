"""COCO panoptic converter: real COCO val2017 sample plus generated train/test images in the
official layout, read back through the input pipeline; crowd handling; resume and atomicity."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.build import coco as build_coco_data
from deeplab2_kmax.data import class_tables
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.build import shard_writer
from deeplab2_kmax.data.formats import tfrecord
from tests.conftest import REPO_ROOT
from tests.conftest import shared_dir
from tests.data import panoptic_fixtures as fx

SAMPLE = shared_dir() / 'fixtures' / 'coco-panoptic-sample'
needs_sample = pytest.mark.skipif(
    not (SAMPLE / 'panoptic_examples.json').exists(),
    reason=f'COCO panoptic sample not found at {SAMPLE} (set DEEPLAB2_KMAX_SHARED_DIR)')

PERSON, CAR, TREE, SKY = 1, 3, 184, 187   # COCO category ids (sparse)


def coco_train_ids():
  """COCO category id -> contiguous train id, from the real categories file (sorted ids)."""
  categories = json.loads((SAMPLE / 'panoptic_coco_categories.json').read_text())
  ids = sorted(c['id'] for c in categories)
  things = {c['id'] for c in categories if c['isthing']}
  mapping = {cid: i + 1 for i, cid in enumerate(ids)}
  return mapping, {mapping[c] for c in things}


def make_generated_split(root, split, count, seed, with_labels=True, crowd=True):
  """Writes `count` generated images (and labels) in COCO's layout; returns the ground truth."""
  rng = np.random.default_rng(seed)
  images, annotations, truth = [], [], {}
  for index in range(count):
    height, width = 24 + 4 * index, 40
    name = f'{index + 1 + 1000 * seed:012d}'
    fx.write_jpeg(f'{root}/{split}2017/{name}.jpg', fx.random_image(rng, height, width))
    if not with_labels:
      continue
    ids, segments = fx.draw_scene(rng, height, width, [TREE, SKY], [PERSON, CAR, PERSON],
                                  num_things=4, crowd_id=PERSON if crowd else None)
    fx.write_png(f'{root}/annotations/panoptic_{split}2017/{name}.png', fx.rgb(ids))
    images.append({'id': int(name), 'file_name': f'{name}.jpg', 'height': height,
                   'width': width})
    annotations.append({'image_id': int(name), 'file_name': f'{name}.png',
                        'segments_info': fx.with_areas(ids, segments)})
    truth[name] = (ids, segments)
  if with_labels:
    fx.write_json(f'{root}/annotations/panoptic_{split}2017.json',
                  {'images': images, 'annotations': annotations,
                   'categories': [{'id': cid, 'name': name, 'isthing': int(thing),
                                   'color': list(color)}
                                  for cid, name, thing, color in class_tables.COCO_CATEGORIES]})
  return truth


def add_real_val(root):
  os.makedirs(f'{root}/val2017', exist_ok=True)
  os.makedirs(f'{root}/annotations/panoptic_val2017', exist_ok=True)
  truth = {}
  data = json.loads((SAMPLE / 'panoptic_examples.json').read_text())
  for annotation in data['annotations']:
    stem = annotation['file_name'][:-4]
    os.symlink(SAMPLE / 'input_images' / f'{stem}.jpg', f'{root}/val2017/{stem}.jpg')
    os.symlink(SAMPLE / 'panoptic_examples' / annotation['file_name'],
               f'{root}/annotations/panoptic_val2017/{annotation["file_name"]}')
    png = tf.io.decode_png(tf.io.read_file(str(SAMPLE / 'panoptic_examples' /
                                               annotation['file_name'])), 3).numpy()
    png = png.astype(np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    truth[stem] = (ids, annotation['segments_info'])
  shutil.copy(SAMPLE / 'panoptic_examples.json', f'{root}/annotations/panoptic_val2017.json')
  return truth


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
  if not (SAMPLE / 'panoptic_examples.json').exists():
    pytest.skip(f'COCO panoptic sample not found at {SAMPLE} (set DEEPLAB2_KMAX_SHARED_DIR)')
  root = tmp_path_factory.mktemp('coco')
  truth = {'train': make_generated_split(root, 'train', 3, seed=1),
           'val': add_real_val(root)}
  make_generated_split(root, 'test', 2, seed=2, with_labels=False)
  return root, truth


@pytest.fixture(scope='module')
def converted(coco_root, tmp_path_factory):
  root, _ = coco_root
  out = tmp_path_factory.mktemp('coco_out')
  results = build_coco_data.build(str(root), str(out), num_shards=2, num_workers=1,
                                  show_progress=False)
  return out, results


@needs_sample
def test_records_read_back_as_the_original_panoptic_maps(coco_root, converted):
  root, truth = coco_root
  out, results = converted
  assert [(r.split, r.num_examples, r.num_shards) for r in results] == [
      ('train', 3, 2), ('val', 2, 2), ('test', 2, 2)]
  assert sorted(os.listdir(out)) == sorted(
      [f'{s}-0000{i}-of-00002.tfrecord' for s in ('train', 'val', 'test') for i in (0, 1)] +
      ['.train.conversion.json', '.val.conversion.json', '.test.conversion.json',
       'dataset_options.textproto'])
  train_id_of, things = coco_train_ids()
  options_text = (out / 'dataset_options.textproto').read_text()
  assert 'dataset: "coco_panoptic"' in options_text
  for split in ('train', 'val'):
    maps = fx.read_back(f'{out}/{split}-*.tfrecord', options_text, crop=65)
    assert sorted(maps) == sorted(truth[split])
    for name, (ids, segments) in truth[split].items():
      expected = fx.expected_panoptic(ids, segments, train_id_of, things, 0, 256)
      np.testing.assert_array_equal(maps[name], expected)
  # The real images: 18 and 32 segments, people as instances 1, 2, ... of train id 1.
  real = fx.read_back(f'{out}/val-*.tfrecord', options_text, crop=65)['000000142238']
  assert real.shape == (427, 640)
  people = np.unique(real[real // 256 == 1] % 256)
  assert people[0] == 1 and list(people) == list(range(1, len(people) + 1))


@needs_sample
def test_category_ids_map_back_to_coco_ids(converted):
  out, _ = converted
  descriptor = datasets.get_built_in('coco_panoptic')
  record = next(iter(tf.data.TFRecordDataset(str(out / 'val-00000-of-00002.tfrecord'))))
  label = tfrecord.decode_example(record)['label'].numpy()[..., 0]
  coco = json.loads((SAMPLE / 'panoptic_examples.json').read_text())['annotations'][0]
  expected = {s['category_id'] for s in coco['segments_info'] if not s['iscrowd']}
  got = {descriptor.category_ids[c] for c in np.unique(label // 256) if c != 0}
  assert got == expected


@needs_sample
def test_validator_passes_the_real_sample_and_the_converted_records(coco_root, converted):
  from deeplab2_kmax.data.build import validate
  root, _ = coco_root
  source = validate.validate(str(root))
  assert source.title.startswith('COCO source dataset') and source.ok, source.format()
  assert not source.defects and (source.num_images, source.num_labelled) == (7, 5)
  out, _ = converted
  records = validate.validate(str(out))
  assert records.ok and not records.defects, records.format()
  assert (records.num_images, records.num_labelled) == (7, 5)
  assert (records.things, records.stuff) == (source.things, source.stuff)
  assert records.max_things_per_image > 0


@needs_sample
def test_test_split_has_images_without_labels(converted):
  out, _ = converted
  records = list(tf.data.TFRecordDataset(tf.io.gfile.glob(f'{out}/test-*.tfrecord')))
  assert len(records) == 2
  for record in records:
    example = tf.train.Example.FromString(record.numpy())
    assert 'image/segmentation/class/encoded' not in example.features.feature
    assert example.features.feature['image/format'].bytes_list.value == [b'jpeg']


@needs_sample
def test_crowd_kept_as_class_without_treat_crowd_as_ignore(coco_root, tmp_path):
  root, truth = coco_root
  build_coco_data.build(str(root), str(tmp_path), splits=['train'],
                        treat_crowd_as_ignore=False, num_shards=1, show_progress=False)
  train_id_of, things = coco_train_ids()
  maps = fx.read_back(f'{tmp_path}/train-*.tfrecord', 'dataset: "coco_panoptic"', crop=33)
  for name, (ids, segments) in truth['train'].items():
    crowd = [s for s in segments if s['iscrowd']]
    assert crowd, 'fixture must contain a crowd region'
    np.testing.assert_array_equal(
        maps[name], fx.expected_panoptic(ids, segments, train_id_of, things, 0, 256,
                                         crowd_as_ignore=False))
    mask = ids == crowd[0]['id']
    assert (maps[name][mask] == train_id_of[PERSON] * 256).all()   # class kept, instance 0


def test_resume_skips_complete_shards_and_failure_leaves_no_partial_shard(tmp_path):
  root = tmp_path / 'coco'
  make_generated_split(root, 'train', 4, seed=3, crowd=False)
  out = tmp_path / 'out'
  build_coco_data.build(str(root), str(out), num_shards=4, show_progress=False)
  shards = sorted(p for p in os.listdir(out) if p.endswith('.tfrecord'))
  first = {p: (out / p).read_bytes() for p in shards}
  # Resume: nothing to do; after removing one shard only that one is written again.
  results = build_coco_data.build(str(root), str(out), num_shards=4, show_progress=False)
  assert (results[0].shards_written, results[0].shards_skipped) == (0, 4)
  os.remove(out / shards[2])
  results = build_coco_data.build(str(root), str(out), num_shards=4, show_progress=False)
  assert (results[0].shards_written, results[0].shards_skipped) == (1, 4 - 1)
  assert {p: (out / p).read_bytes() for p in shards} == first
  # A broken third image stops a fresh conversion after two complete shards, with no
  # half-written shard left behind (nothing named like a shard, no .tmp).
  broken = sorted((root / 'annotations/panoptic_train2017').iterdir())[2]
  png_bytes = broken.read_bytes()
  broken.write_bytes(b'not a png')
  fresh = tmp_path / 'fresh'
  with pytest.raises(coco_panoptic.ConversionError, match=f'{broken.name}: not a PNG file'):
    build_coco_data.build(str(root), str(fresh), num_shards=4, show_progress=False)
  assert sorted(p for p in os.listdir(fresh) if 'tfrecord' in p) == shards[:2]
  # Once the PNG is fixed, the same command completes the conversion: shards 0-1 are kept.
  broken.write_bytes(png_bytes)
  results = build_coco_data.build(str(root), str(fresh), num_shards=4, show_progress=False)
  assert (results[0].shards_written, results[0].shards_skipped) == (2, 2)
  assert {p: (fresh / p).read_bytes() for p in shards} == first
  # An annotation edited after conversion: only the shard holding that image is written again.
  json_path = root / 'annotations/panoptic_train2017.json'
  data = json.loads(json_path.read_text())
  data['annotations'][1]['segments_info'].reverse()   # other instance numbering
  json_path.write_text(json.dumps(data))
  results = build_coco_data.build(str(root), str(out), num_shards=4, show_progress=False)
  assert (results[0].shards_written, results[0].shards_skipped) == (1, 3)
  assert (out / shards[1]).read_bytes() != first[shards[1]]
  assert all((out / p).read_bytes() == first[p] for p in shards if p != shards[1])
  # Settings changed: the old shards are not mixed with new ones.
  with pytest.raises(shard_writer.ShardStateError, match='treat_crowd_as_ignore'):
    build_coco_data.build(str(root), str(out), num_shards=4, treat_crowd_as_ignore=False,
                          show_progress=False)


def test_parallel_workers_write_the_same_bytes(tmp_path):
  root = tmp_path / 'coco'
  make_generated_split(root, 'train', 6, seed=4)
  build_coco_data.build(str(root), str(tmp_path / 'a'), num_shards=2, num_workers=1,
                        show_progress=False)
  build_coco_data.build(str(root), str(tmp_path / 'b'), num_shards=2, num_workers=2,
                        show_progress=False)
  for shard in ('train-00000-of-00002.tfrecord', 'train-00001-of-00002.tfrecord'):
    a = [tf.train.Example.FromString(r.numpy())
         for r in tf.data.TFRecordDataset(str(tmp_path / 'a' / shard))]
    b = [tf.train.Example.FromString(r.numpy())
         for r in tf.data.TFRecordDataset(str(tmp_path / 'b' / shard))]
    assert len(a) == 3 and a == b   # (map order inside a record may differ between processes)


def test_cli_reports_bad_input_in_one_line(tmp_path):
  # A labelling-tool export with a segment lacking its category: refused before any pixel is
  # read, naming the file, the entry and the fix.
  root = tmp_path / 'coco'
  make_generated_split(root, 'train', 1, seed=5)
  json_path = root / 'annotations/panoptic_train2017.json'
  data = json.loads(json_path.read_text())
  del data['annotations'][0]['segments_info'][1]['category_id']
  json_path.write_text(json.dumps(data))
  proc = subprocess.run(
      [sys.executable, '-m', 'deeplab2_kmax.data.build.coco', f'--coco_root={root}',
       f'--output_dir={tmp_path / "out"}', '--num_workers=1'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      f'error: {json_path}: annotations[0].segments_info[1] has no "category_id" field; fix: '
      'every entry needs "category_id" (see the COCO panoptic format)')
  assert not os.path.exists(tmp_path / 'out')
