"""The input pipeline: documented batch keys and shapes, determinism, readable bad-input errors."""

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from deeplab2_kmax.data.input import pipeline
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.formats import tfrecord
from deeplab2_kmax.protos import dataset_pb2


def options(pattern, **overrides):
  text = (f'dataset: "synthetic_panoptic" file_pattern: "{pattern}" batch_size: 4 '
          'crop_size: [65, 65] max_thing_id: 12 deterministic: true seed: 5 '
          'augmentations { min_scale_factor: 0.75 max_scale_factor: 1.25 '
          'scale_factor_step_size: 0.25 }')
  message = text_format.Parse(text, dataset_pb2.DatasetOptions())
  for key, value in overrides.items():
    setattr(message, key, value)
  return message


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_training_batches_have_documented_keys_and_shapes(synthetic_data_dir):
  p = pipeline.InputPipeline(options(f'{synthetic_data_dir}/train-*'), is_training=True)
  batch = next(p.iterate())
  expected = {
      'image': (tf.float32, (4, 65, 65, 3)), 'image_name': (tf.string, (4,)),
      'semantic_gt': (tf.int32, (4, 65, 65)), 'panoptic_gt': (tf.int32, (4, 65, 65)),
      'is_crowd_gt': (tf.bool, (4, 65, 65)), 'thing_id_mask_gt': (tf.int32, (4, 65, 65)),
      'thing_id_class_gt': (tf.int32, (4, 12)),
      'semantic_loss_weight': (tf.float32, (4, 65, 65)),
  }
  assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == expected
  image = batch['image'].numpy()
  assert 0 <= image.min() and image.max() <= 255


def test_thing_targets_agree_with_panoptic_map(synthetic_data_dir):
  p = pipeline.InputPipeline(options(f'{synthetic_data_dir}/train-*'), is_training=True)
  for batch in take(p.iterate(), 2):
    for i in range(4):
      panoptic = batch['panoptic_gt'][i].numpy()
      mask = batch['thing_id_mask_gt'][i].numpy()
      classes = batch['thing_id_class_gt'][i].numpy()
      thing_ids = [v for v in np.unique(panoptic) if v // 256 in (1, 2, 3) and v % 256]
      assert (mask >= 0).sum() == np.isin(panoptic, thing_ids).sum()
      for k in range(len(thing_ids)):
        ids = np.unique(panoptic[mask == k])
        assert len(ids) == 1 and ids[0] // 256 == classes[k]
      assert (classes[len(thing_ids):] == -1).all()


def test_deterministic_mode_repeats_exactly(synthetic_data_dir):
  def first_batches(seed):
    p = pipeline.InputPipeline(options(f'{synthetic_data_dir}/train-*', seed=seed), True)
    return take(p.iterate(), 2)
  a, b, c = first_batches(5), first_batches(5), first_batches(6)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key].numpy(), y[key].numpy())
  assert not np.array_equal(a[0]['image'].numpy(), c[0]['image'].numpy())


def test_eval_covers_each_image_once_with_raw_labels(synthetic_data_dir):
  p = pipeline.InputPipeline(options(f'{synthetic_data_dir}/val-*', batch_size=3),
                             is_training=False)
  batches = list(p.iterate())
  assert [b['image'].shape[0] for b in batches] == [3, 3, 2]
  names = np.concatenate([b['image_name'].numpy() for b in batches])
  assert sorted(names) == [f'synthetic_val_{i:06d}'.encode() for i in range(8)]
  records = {tfrecord.decode_example(r)['image_name'].numpy(): tfrecord.decode_example(r)
             for r in tf.data.TFRecordDataset(p.files)}
  for batch in batches:
    for i, name in enumerate(batch['image_name'].numpy()):
      raw = records[name]['label'].numpy()[..., 0]
      np.testing.assert_array_equal(batch['panoptic_raw'][i].numpy(), raw)
      np.testing.assert_array_equal(batch['size_raw'][i].numpy(), raw.shape)
      np.testing.assert_array_equal(batch['resized_size'][i].numpy(), [65, 65])
      # No augmentation at eval: the crop is the image itself.
      np.testing.assert_array_equal(batch['image'][i].numpy(),
                                    records[name]['image'].numpy().astype(np.float32))


def _names(batches):
  return [n for b in batches for n in b['image_name'].numpy().tolist()]


@pytest.mark.parametrize('pattern, num_files', [('val-*', 1), ('train-*', 2)])
def test_input_pipelines_read_disjoint_shares_that_cover_the_eval_set(synthetic_data_dir,
                                                                      pattern, num_files):
  """Two pipelines (two workers): every other record of one file, or one file each of two."""
  p = pipeline.InputPipeline(options(f'{synthetic_data_dir}/{pattern}', batch_size=4),
                             is_training=False)
  assert len(p.files) == num_files
  everything = _names(p.iterate())
  shares = [_names(p.iterate(tf.distribute.InputContext(2, i, 2))) for i in range(2)]
  assert sorted(shares[0] + shares[1]) == sorted(everything)
  assert not set(shares[0]) & set(shares[1])
  if num_files == 1:
    assert shares[0] == everything[0::2] and shares[1] == everything[1::2]
  else:
    assert len(shares[0]) == len(shares[1]) == len(everything) // 2


def test_training_pipelines_of_a_one_file_dataset_read_disjoint_shares(synthetic_data_dir):
  """Fewer files than pipelines: before, each worker read every file (with a fixed seed, in
  the same order), so the workers trained on the same examples."""
  p = pipeline.InputPipeline(options(f'{synthetic_data_dir}/val-*', batch_size=2), True)
  assert len(p.files) == 1
  # 8 images, 4 per share, shuffled across repetitions: 10 batches of 2 see each share whole.
  shares = [set(_names(take(p.iterate(tf.distribute.InputContext(2, i, 2)), 10)))
            for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 4
  assert not shares[0] & shares[1]


# ---- Bad input ----

def write_records(path, examples):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      writer.write(example)
  return str(path)


def good_example(name, size=20, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  label = np.full((size, size), 4 * 256, np.int32)   # grass
  label[2:8, 2:8] = 1 * 256 + 1                      # one disc
  return tfrecord.encode_example(png_encoding.encode_png(image), 'png', name, size, size,
                                 panoptic_label=label)


def raw_example(name, image_bytes, label, height, width):
  """A record with arbitrary (possibly inconsistent) contents."""
  feature = {
      'image/encoded': image_bytes, 'image/filename': name.encode(), 'image/format': b'png',
      'image/segmentation/class/encoded': label.astype(np.int32).tobytes(),
      'image/segmentation/class/format': b'raw'}
  features = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
              for k, v in feature.items()}
  for key, value in (('image/height', height), ('image/width', width)):
    features[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def bad_examples():
  image = png_encoding.encode_png(np.zeros((20, 20, 3), np.uint8))
  return {
      'not_an_image': (raw_example('not_an_image', b'this is not an image',
                                   np.zeros((20, 20)), 20, 20),
                       'image "not_an_image": image/encoded is not a JPEG, PNG'),
      'wrong_label_size': (raw_example('wrong_label_size', image, np.zeros((10, 20)), 20, 20),
                           'image "wrong_label_size": the label size does not match the image '
                           'size 20x20'),
      # Instance 300 >= divisor 256 spills into the class: 6 * 256 + 300 reads as class 7.
      'id_beyond_divisor': (raw_example('id_beyond_divisor', image,
                                        np.full((20, 20), 6 * 256 + 300), 20, 20),
                            'image "id_beyond_divisor": panoptic id 1836 decodes to class 7 '
                            'with panoptic_label_divisor 256, outside the 7 classes'),
      'instance_on_stuff': (raw_example('instance_on_stuff', image,
                                        np.full((20, 20), 4 * 256 + 3), 20, 20),
                            'gives instance 3 to stuff class 4'),
  }



def _eval(pattern, **overrides):
  message = options(pattern, **overrides)
  del message.crop_size[:]
  message.crop_size.extend([33, 33])
  return message


@pytest.mark.parametrize('name', sorted(bad_examples()))
def test_bad_example_error_names_image_and_problem(tmp_path, name):
  record, expected = bad_examples()[name]
  path = write_records(tmp_path / 'data.tfrecord', [good_example('ok'), record])
  p = pipeline.InputPipeline(_eval(path, batch_size=1), is_training=False)
  with pytest.raises(pipeline.DataError) as info:
    list(p.iterate())
  assert expected in str(info.value)
  assert path in str(info.value)


def test_corrupt_record_names_the_file(tmp_path):
  good = write_records(tmp_path / 'a.tfrecord', [good_example('a')])
  bad = write_records(tmp_path / 'b.tfrecord', [good_example('b', seed=i) for i in range(3)])
  data = bytearray(open(bad, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(bad, 'wb').write(bytes(data))
  p = pipeline.InputPipeline(_eval(f'{tmp_path}/*.tfrecord', batch_size=1), is_training=False)
  with pytest.raises(pipeline.DataError, match=r'b\.tfrecord: corrupted or truncated after record'):
    list(p.iterate())
  assert good in p.files


def test_too_many_things_for_max_thing_id(tmp_path):
  label = (np.arange(400).reshape(20, 20) % 30 + 1 + 256).astype(np.int32)  # 30 discs
  record = tfrecord.encode_example(png_encoding.encode_png(np.zeros((20, 20, 3), np.uint8)),
                                   'png', 'crowded', 20, 20, panoptic_label=label)
  path = write_records(tmp_path / 'data.tfrecord', [record])
  p = pipeline.InputPipeline(_eval(path, batch_size=1), is_training=False)
  with pytest.raises(pipeline.DataError, match='30 thing instances in the crop exceed '
                                               'max_thing_id 12'):
    list(p.iterate())


def test_skip_bad_examples_drops_and_counts(tmp_path):
  records = [good_example('good0')] + [r for r, _ in bad_examples().values()] + [
      good_example('good1', seed=1)]
  path = write_records(tmp_path / 'data.tfrecord', records)
  p = pipeline.InputPipeline(_eval(path, batch_size=1, skip_bad_examples=True),
                             is_training=False)
  names = [b['image_name'].numpy()[0] for b in p.iterate()]
  assert names == [b'good0', b'good1']
  assert int(p.num_skipped.numpy()) == 4


def test_missing_files_error_names_pattern(tmp_path):
  p = pipeline.InputPipeline(_eval(f'{tmp_path}/nothing-*.tfrecord'), is_training=False)
  with pytest.raises(pipeline.DataError, match='no TFRecord files match file_pattern'):
    list(p.iterate())


def test_autoaugment_and_copy_paste_in_training(synthetic_data_dir):
  opts = options(f'{synthetic_data_dir}/train-*')
  opts.augmentations.autoaugment_policy_name = 'simple_classification_policy'
  paste = opts.augmentations.panoptic_copy_paste
  paste.panoptic_copy_paste_scale = 0.5
  paste.panoptic_copy_paste_thing_option = 'all'
  batches = take(pipeline.InputPipeline(opts, is_training=True).iterate(), 3)
  again = take(pipeline.InputPipeline(opts, is_training=True).iterate(), 3)
  pasted_instances = 0
  for batch, repeat in zip(batches, again):
    np.testing.assert_array_equal(batch['image'].numpy(), repeat['image'].numpy())
    panoptic = batch['panoptic_gt'].numpy()
    # Pasted things are renumbered to divisor - 1 - id, i.e. into the upper half of the ids.
    pasted_instances += int(((panoptic % 256 >= 128) & np.isin(panoptic // 256, (1, 2, 3))).sum())
    assert set(np.unique(panoptic // 256)) <= set(range(7))
  assert pasted_instances > 0
