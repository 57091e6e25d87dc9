"""DeepLab2-format records: our writer and DeepLab2-style records written by hand both decode."""

import numpy as np
import tensorflow as tf

from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.formats import tfrecord


def deeplab2_style_record(image_bytes, label, image_format='png', name='frame_0001'):
  """A record built with DeepLab2's literal feature keys (independent of our constants)."""
  height, width = label.shape
  feature = {
      'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
      'image/filename': tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
      'image/format': tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[image_format.encode()])),
      'image/height': tf.train.Feature(int64_list=tf.train.Int64List(value=[height])),
      'image/width': tf.train.Feature(int64_list=tf.train.Int64List(value=[width])),
      'image/channels': tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
      'image/segmentation/class/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[label.astype(np.int32).tobytes()])),
      'image/segmentation/class/format': tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[b'raw'])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def random_image_and_label(seed, height=7, width=5):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  label = rng.integers(0, 134, (height, width)) * 256 + rng.integers(0, 3, (height, width))
  return image, label.astype(np.int32)


def test_deeplab2_record_decodes():
  image, label = random_image_and_label(0)
  record = deeplab2_style_record(png_encoding.encode_png(image), label)
  decoded = tfrecord.decode_example(tf.constant(record))
  np.testing.assert_array_equal(decoded['image'].numpy(), image)
  np.testing.assert_array_equal(decoded['label'].numpy()[..., 0], label)
  assert decoded['image_name'].numpy() == b'frame_0001'


def test_our_writer_round_trips_and_matches_deeplab2_layout():
  image, label = random_image_and_label(1)
  png = png_encoding.encode_png(image)
  ours = tfrecord.encode_example(png, 'png', 'frame_0001', 7, 5, panoptic_label=label)
  # Same features, byte for byte, as a record made with DeepLab2's keys.
  parsed_ours = tf.train.Example.FromString(ours)
  parsed_theirs = tf.train.Example.FromString(deeplab2_style_record(png, label))
  assert parsed_ours == parsed_theirs
  decoded = tfrecord.decode_example(tf.constant(ours))
  np.testing.assert_array_equal(decoded['label'].numpy()[..., 0], label)


def test_jpeg_image_and_png_semantic_label():
  image, _ = random_image_and_label(2, 16, 16)
  jpeg = tf.io.encode_jpeg(image, quality=100).numpy()
  semantic = (np.arange(256).reshape(16, 16) % 19).astype(np.uint8)
  record = tfrecord.encode_example(jpeg, 'jpeg', 'x', 16, 16,
                                   label_png=png_encoding.encode_png(semantic))
  decoded = tfrecord.decode_example(tf.constant(record))
  assert decoded['image'].shape == (16, 16, 3)
  np.testing.assert_array_equal(decoded['label'].numpy()[..., 0], semantic)


def test_diagnose_names_corrupt_file(tmp_path):
  image, label = random_image_and_label(4)
  good = str(tmp_path / 'good.tfrecord')
  bad = str(tmp_path / 'bad.tfrecord')
  for path in (good, bad):
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(3):
        writer.write(tfrecord.encode_example(png_encoding.encode_png(image), 'png', 'a', 7, 5,
                                             panoptic_label=label))
  data = bytearray(open(bad, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(bad, 'wb').write(bytes(data))
  assert tfrecord.diagnose_files([good]) is None
  message = tfrecord.diagnose_files([good, bad])
  assert message.startswith(f'{bad}: corrupted or truncated after record')
