"""PNG files: a minimal encoder (8-bit grey or RGB) in numpy + zlib, and TensorFlow's reader
and writer.

encode_png serves where TensorFlow is not wanted, e.g. in the worker processes of the
synthetic-data builder (forking or spawning TensorFlow per worker costs seconds and memory).
read_png and write_png go through tf.io (libpng's filters give smaller files than encode_png's
unfiltered rows); TensorFlow is imported on their first call, so that processes that never touch
a PNG file do not pay for the import.
"""

import os
import struct
import zlib

import numpy as np

_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))


def encode_png(array: np.ndarray, compression: int = 1) -> bytes:
  """Encodes uint8 [height, width] or [height, width, 3] as PNG bytes."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'encode_png needs uint8 pixels, got {array.dtype}')
  if array.ndim == 2:
    color_type, channels = 0, 1
  elif array.ndim == 3 and array.shape[2] == 3:
    color_type, channels = 2, 3
  else:
    raise ValueError(f'encode_png needs [height, width] or [height, width, 3], got '
                     f'{array.shape}')
  height, width = array.shape[:2]
  rows = array.reshape(height, width * channels)
  # Filter type 0 (None) at the start of every scanline.
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
  header = struct.pack('>IIBBBBB', width, height, 8, color_type, 0, 0, 0)
  return (_SIGNATURE + _chunk(b'IHDR', header) +
          _chunk(b'IDAT', zlib.compress(raw, compression)) + _chunk(b'IEND', b''))


def read_png(path: str) -> np.ndarray:
  """Decodes an 8-bit PNG file to `[height, width, channels]` uint8 (channels as stored).

  Raises:
    FileNotFoundError: naming the path, when it cannot be read.
    ValueError: naming the path, when it is no decodable 8-bit PNG.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see module docstring)
  try:
    data = tf.io.read_file(path)
  except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
    raise FileNotFoundError(f'cannot read PNG "{path}": {error.message}') from None
  try:
    return tf.io.decode_png(data, channels=0, dtype=tf.uint8).numpy()
  except tf.errors.InvalidArgumentError as error:
    raise ValueError(f'"{path}" is not a decodable 8-bit PNG: {error.message}') from None


def write_png(path: str, image: np.ndarray) -> None:
  """Writes `[height, width]` or `[height, width, channels]` uint8 as a lossless PNG file
  (its folder created if missing)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'PNG writer expects uint8, got {image.dtype} for "{path}"')
  if image.ndim == 2:
    image = image[..., None]
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tf.io.write_file(path, tf.io.encode_png(image))
