"""DeepLab2-compatible TFRecord examples: encode, decode, check, and diagnose bad records.

Feature keys and value layouts equal DeepLab2's (reference §6.2), so TFRecords written by
DeepLab2's converters are read unchanged:

| key                                   | value                                           |
|---------------------------------------|-------------------------------------------------|
| image/encoded                         | JPEG or PNG bytes                               |
| image/filename                        | file stem                                       |
| image/format                          | "jpeg" or "png"                                 |
| image/height, image/width             | int64                                           |
| image/channels                        | 3                                               |
| image/segmentation/class/encoded      | raw little-endian int32 [height, width] panoptic |
|                                       | ids (semantic * divisor + instance), or a PNG   |
| image/segmentation/class/format       | "raw" (panoptic) or "png" (semantic only)       |
"""

from typing import Iterable, Optional

import numpy as np
import tensorflow as tf

from deeplab2_kmax import common

LABEL_FORMAT_RAW = 'raw'
LABEL_FORMAT_PNG = 'png'

# Leading bytes of the image formats tf.io.decode_image accepts.
_IMAGE_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG', b'GIF8', b'BM', b'RIFF')


def _bytes_feature(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def encode_example(image_bytes: bytes, image_format: str, filename: str, height: int,
                   width: int, panoptic_label: Optional[np.ndarray] = None,
                   label_png: Optional[bytes] = None) -> bytes:
  """Serializes one example.

  Args:
    image_bytes: Encoded JPEG/PNG image.
    image_format: "jpeg" or "png".
    filename: Image file stem (used in error messages and prediction file names).
    height: Image height.
    width: Image width.
    panoptic_label: Optional int32 [height, width] panoptic ids, stored raw.
    label_png: Optional PNG semantic label (alternative to panoptic_label).

  Returns:
    A serialized tf.train.Example.
  """
  features = {
      common.KEY_ENCODED_IMAGE: _bytes_feature(image_bytes),
      common.KEY_IMAGE_FILENAME: _bytes_feature(filename.encode('utf-8')),
      common.KEY_IMAGE_FORMAT: _bytes_feature(image_format.encode('utf-8')),
      common.KEY_IMAGE_HEIGHT: _int64_feature(height),
      common.KEY_IMAGE_WIDTH: _int64_feature(width),
      common.KEY_IMAGE_CHANNELS: _int64_feature(3),
  }
  if panoptic_label is not None:
    label = np.ascontiguousarray(panoptic_label, dtype='<i4')
    if label.shape != (height, width):
      raise ValueError(f'{filename}: label shape {label.shape} differs from the image size '
                       f'{(height, width)}')
    features[common.KEY_ENCODED_LABEL] = _bytes_feature(label.tobytes())
    features[common.KEY_LABEL_FORMAT] = _bytes_feature(LABEL_FORMAT_RAW.encode())
  elif label_png is not None:
    features[common.KEY_ENCODED_LABEL] = _bytes_feature(label_png)
    features[common.KEY_LABEL_FORMAT] = _bytes_feature(LABEL_FORMAT_PNG.encode())
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


_FEATURES = {
    common.KEY_ENCODED_IMAGE: tf.io.FixedLenFeature((), tf.string),
    common.KEY_IMAGE_FILENAME: tf.io.FixedLenFeature((), tf.string, default_value=''),
    common.KEY_IMAGE_FORMAT: tf.io.FixedLenFeature((), tf.string, default_value='jpeg'),
    common.KEY_IMAGE_HEIGHT: tf.io.FixedLenFeature((), tf.int64, default_value=0),
    common.KEY_IMAGE_WIDTH: tf.io.FixedLenFeature((), tf.int64, default_value=0),
    common.KEY_ENCODED_LABEL: tf.io.FixedLenFeature((), tf.string, default_value=''),
    common.KEY_LABEL_FORMAT: tf.io.FixedLenFeature((), tf.string, default_value='raw'),
}


def parse_features(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  return tf.io.parse_single_example(serialized, _FEATURES)


def has_image_signature(encoded: tf.Tensor) -> tf.Tensor:
  """Scalar bool: the bytes start like an image format decode_image knows."""
  checks = [tf.strings.substr(encoded, 0, len(sig)) == sig for sig in _IMAGE_SIGNATURES]
  return tf.reduce_any(tf.stack(checks))


def decode_label(encoded: tf.Tensor, label_format: tf.Tensor, height: tf.Tensor,
                 width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Decodes a label to int32 [height, width, 1].

  Returns:
    (label, ok): ok is False when a raw label's byte count does not match height × width (the
    label is then a zero map of the image size, so the caller can report or skip it).
  """
  def raw():
    values = tf.io.decode_raw(encoded, tf.int32, little_endian=True)
    ok = tf.size(values, out_type=tf.int64) == height * width
    values = tf.cond(ok, lambda: values,
                     lambda: tf.zeros(tf.cast(height * width, tf.int32), tf.int32))
    return tf.reshape(values, tf.stack([height, width, 1])), ok

  def png():
    # Semantic PNG labels are 8-bit (decoding 8-bit data as uint16 would rescale it by 257).
    label = tf.cast(tf.io.decode_png(encoded, channels=1), tf.int32)
    shape = tf.shape(label, out_type=tf.int64)
    ok = tf.logical_and(shape[0] == height, shape[1] == width)
    return label, ok

  return tf.cond(tf.equal(label_format, LABEL_FORMAT_PNG), png, raw)


def decode_example(serialized: tf.Tensor, decode_groundtruth_label: bool = True
                   ) -> dict[str, tf.Tensor]:
  """Decodes a serialized example (no checks; see pipeline for checked decoding).

  Returns:
    {image: uint8 [height, width, 3], label: int32 [height, width, 1] (if decoded),
     image_name: string, height: int64, width: int64}
  """
  parsed = parse_features(serialized)
  image = tf.io.decode_image(parsed[common.KEY_ENCODED_IMAGE], channels=3,
                             expand_animations=False)
  shape = tf.shape(image, out_type=tf.int64)
  result = {
      common.IMAGE: image,
      common.IMAGE_NAME: parsed[common.KEY_IMAGE_FILENAME],
      common.HEIGHT: shape[0],
      common.WIDTH: shape[1],
  }
  if decode_groundtruth_label:
    label, _ = decode_label(parsed[common.KEY_ENCODED_LABEL], parsed[common.KEY_LABEL_FORMAT],
                            shape[0], shape[1])
    result[common.LABEL] = label
  return result


def unreadable_shard_text(records_read: int) -> str:
  """What a reader error after `records_read` good records of a shard means, in place of
  TensorFlow's message (a truncated or altered shard fails the length or CRC check of the
  next record)."""
  if records_read == 0:
    return 'corrupted or truncated at its first record (0 records read fine)'
  plural = 's' if records_read != 1 else ''
  return (f'corrupted or truncated after record {records_read} ({records_read} '
          f'record{plural} read fine)')


def diagnose_files(files: Iterable[str], decode_images: bool = True) -> Optional[str]:
  """Scans TFRecord files on the host for the first unreadable record or image.

  Called after the input pipeline failed with a TensorFlow error that does not say which file
  was at fault. Returns a message naming the file, record number (1-based) and problem, or
  None.
  """
  for path in files:
    records_read = 0
    try:
      for index, record in enumerate(tf.data.TFRecordDataset(path)):
        records_read = index
        if not decode_images:
          records_read = index + 1
          continue
        parsed = parse_features(record)
        name = parsed[common.KEY_IMAGE_FILENAME].numpy().decode('utf-8', 'replace')
        try:
          tf.io.decode_image(parsed[common.KEY_ENCODED_IMAGE], channels=3,
                             expand_animations=False)
        except tf.errors.InvalidArgumentError as error:
          return (f'{path}: record {index + 1} (image "{name}"): the image cannot be decoded '
                  f'({_op_error_text(error)})')
        records_read = index + 1
    except tf.errors.DataLossError:
      return f'{path}: {unreadable_shard_text(records_read)}; re-create this shard'
    except tf.errors.InvalidArgumentError as error:
      return (f'{path}: record {records_read + 1} is not a valid tf.train.Example '
              f'({_op_error_text(error)})')
  return None


def _op_error_text(error: tf.errors.OpError) -> str:
  """The readable part of a TensorFlow op error (without the function-node prefix)."""
  text = error.message
  text = text.split('} ', 1)[-1] if text.startswith('{{') else text
  return text.split(' [Op:', 1)[0].strip()
