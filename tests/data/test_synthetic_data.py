"""The synthetic dataset: deterministic files, consistent TFRecords and COCO ground truth."""

import filecmp
import json

import numpy as np
import tensorflow as tf

from deeplab2_kmax.data.build import synthetic as build_synthetic_data
from deeplab2_kmax.data import class_tables
from deeplab2_kmax.data.synthetic import scenes as synthetic_scenes
from deeplab2_kmax.data.formats import tfrecord


def test_scene_is_a_function_of_its_seed():
  a = synthetic_scenes.generate_scene([5, 0, 1], 65, 65)
  b = synthetic_scenes.generate_scene([5, 0, 1], 65, 65)
  c = synthetic_scenes.generate_scene([5, 0, 2], 65, 65)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.panoptic(256), b.panoptic(256))
  assert not np.array_equal(a.image, c.image)


def test_scenes_have_stuff_things_and_valid_ids():
  seen_classes = set()
  for index in range(40):
    scene = synthetic_scenes.generate_scene([0, 0, index], 65, 65)
    seen_classes.update(np.unique(scene.semantic).tolist())
    is_thing = np.isin(scene.semantic, synthetic_scenes.THING_CLASSES)
    assert (scene.instance[~is_thing] == 0).all()        # stuff and void carry no instance
    assert (scene.instance[is_thing] > 0).all()          # every thing pixel has an instance
    for cls in synthetic_scenes.THING_CLASSES:           # ids contiguous from 1 per class
      ids = np.unique(scene.instance[scene.semantic == cls])
      np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
  assert seen_classes == set(range(7))   # every class, void included, appears somewhere


def test_build_is_deterministic(tmp_path):
  for name in ('a', 'b'):
    build_synthetic_data.build(str(tmp_path / name), 6, 3, 33, 33, seed=7, examples_per_shard=4,
                               num_workers=1, show_progress=False)
  comparison = filecmp.dircmp(tmp_path / 'a', tmp_path / 'b')
  assert sorted(comparison.same_files + list(comparison.subdirs)) == sorted(
      ['dataset_info.json', 'panoptic_val.json', 'train-00000-of-00002.tfrecord',
       'train-00001-of-00002.tfrecord', 'val-00000-of-00001.tfrecord', 'panoptic_val',
       'val_images'])
  assert not comparison.diff_files
  _, mismatch, errors = filecmp.cmpfiles(tmp_path / 'a/panoptic_val', tmp_path / 'b/panoptic_val',
                                         [f'synthetic_val_{i:06d}.png' for i in range(3)],
                                         shallow=False)
  assert not mismatch and not errors


def test_val_ground_truth_matches_records(synthetic_data_dir):
  gt = json.loads((synthetic_data_dir / 'panoptic_val.json').read_text())
  assert [c['id'] for c in gt['categories']] == [1, 2, 3, 4, 5, 6]
  assert [c['name'] for c in gt['categories']] == [
      row[1] for row in class_tables.SYNTHETIC_CATEGORIES[1:]]
  annotations = {a['image_id']: a for a in gt['annotations']}
  records = list(tf.data.TFRecordDataset(str(synthetic_data_dir / 'val-00000-of-00001.tfrecord')))
  assert len(records) == len(annotations) == 8
  for record in records:
    example = tfrecord.decode_example(record)
    name = example['image_name'].numpy().decode()
    panoptic = example['label'].numpy()[..., 0]
    rgb = tf.io.decode_png((synthetic_data_dir / 'panoptic_val' / f'{name}.png')
                           .read_bytes()).numpy().astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    segments = annotations[name]['segments_info']
    assert sorted(s['id'] for s in segments) == sorted(set(np.unique(ids)) - {0})
    for segment in segments:
      mask = ids == segment['id']
      assert segment['area'] == int(mask.sum())
      assert (panoptic[mask] // 256 == segment['category_id']).all()
      ys, xs = np.nonzero(mask)
      assert segment['bbox'] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                 ys.max() - ys.min() + 1]
    # Void pixels are id 0 in the PNG and class 0 in the record.
    np.testing.assert_array_equal(ids == 0, panoptic // 256 == 0)
    image = tf.io.decode_png((synthetic_data_dir / 'val_images' / f'{name}.png').read_bytes())
    np.testing.assert_array_equal(image.numpy(), example['image'].numpy())
