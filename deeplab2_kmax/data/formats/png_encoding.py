"""PNG files: the one encoder (encode_png, numpy + zlib) and the file reader and writer.

encode_png turns a uint8 `[height, width]` or `[height, width, 1..4]` array (grey, grey+alpha,
RGB, RGBA) into PNG bytes without TensorFlow, so that it also serves where TensorFlow is not
wanted: the worker processes of the synthetic-data builder (forking or spawning TensorFlow per
worker costs seconds and memory) and demo.py. Rows are stored with PNG's "Up" filter (the
byte difference, mod 256, to the row above; one vectorised subtraction, well under a
millisecond at 641x641x3), which makes photos 5-15% smaller than unfiltered rows and 1-8%
larger than libpng's per-row choice among five filters (tf.io.encode_png). Piecewise-constant
maps (panoptic ids) compress to 0.3-3% of their raw size either way, so for them the unfiltered
rows are tried too and the smaller kept; at the default level they come out smaller than
tf.io.encode_png's.

write_png writes encode_png's bytes through tf.io.gfile (so gs:// paths work) and read_png
decodes with tf.io.decode_png; TensorFlow is imported on their first call, so that processes
that never touch a PNG file do not pay for the import.
"""

import os
import struct
import zlib

import numpy as np

_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# PNG colour type of each channel count: grey, grey + alpha, RGB, RGBA.
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
# Filter type byte at the start of a scanline (PNG spec 9.2): "None" stores the bytes, "Up"
# their difference to the byte above.
_FILTER_NONE, _FILTER_UP = 0, 2
# Compressed / raw size under which encode_png also tries unfiltered rows: only piecewise-
# constant maps (0.3-3% of raw; photos 50-90%), whose compression takes a few milliseconds.
_TRY_UNFILTERED_BELOW = 1 / 16
# zlib level of encode_png: zlib's and libpng's default. On 641x641 RGB photos level 6 takes
# 33-38 ms against 22-26 ms at level 1 for ~1% smaller files, but it makes panoptic id maps
# 30-50% smaller (COCO 427x640: 15.0 -> 9.7 kB, tf.io.encode_png 10.2 kB) in 6-8 ms, about
# tf.io.encode_png's time, and id maps are most of what write_png writes. The synthetic
# builder passes 1 for its photo-like images.
DEFAULT_COMPRESSION = 6


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))


def encode_png(array: np.ndarray, compression: int = DEFAULT_COMPRESSION) -> bytes:
  """Encodes an 8-bit image as PNG bytes (lossless; no TensorFlow).

  Args:
    array: uint8 `[height, width]` or `[height, width, channels]`, channels 1 (grey), 2 (grey +
      alpha), 3 (RGB) or 4 (RGBA); height and width at least 1.
    compression: zlib level, 0 (stored) to 9 (smallest, slowest).

  Returns:
    The PNG file's bytes: 8 bits per sample, no interlacing, every row "Up"-filtered, or every
    row unfiltered when that compresses a piecewise-constant image better.

  Raises:
    ValueError: naming the dtype or shape given and the ones a PNG can hold.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'encode_png needs uint8 pixels, got {array.dtype} (shape {array.shape}); '
                     'convert values in [0, 255] with .astype(np.uint8)')
  if array.ndim == 2:
    channels = 1
  elif array.ndim == 3:
    channels = array.shape[2]
  else:
    channels = 0
  if channels not in _COLOR_TYPES or 0 in array.shape:
    raise ValueError(f'encode_png needs [height, width] or [height, width, channels] with 1 '
                     '(grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels and height, width '
                     f'>= 1, got shape {array.shape}')
  height, width = array.shape[:2]
  rows = array.reshape(height, width * channels)
  # Each scanline: its filter type byte, then its bytes minus the row above's (uint8 arithmetic
  # wraps mod 256, as the filter asks; the first row's "above" is zeros).
  scanlines = np.empty((height, 1 + width * channels), np.uint8)
  scanlines[:, 0] = _FILTER_UP
  scanlines[0, 1:] = rows[0]
  np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
  data = zlib.compress(scanlines.tobytes(), compression)
  if len(data) < _TRY_UNFILTERED_BELOW * scanlines.size:
    # On maps of segments both are mostly back-references to the row above, and which is
    # smaller varies: at level 6 unfiltered rows were up to 19% smaller on COCO and Voronoi-like
    # maps, Up 15-28% smaller on the synthetic scenes' maps.
    scanlines[:, 0] = _FILTER_NONE
    scanlines[:, 1:] = rows
    unfiltered = zlib.compress(scanlines.tobytes(), compression)
    if len(unfiltered) < len(data):
      data = unfiltered
  header = struct.pack('>IIBBBBB', width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
  return (_SIGNATURE + _chunk(b'IHDR', header) + _chunk(b'IDAT', data) +
          _chunk(b'IEND', b''))


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
  """Writes encode_png(image) to `path` (local or gs://), its folder created if missing.

  Args:
    path: The file to write.
    image: uint8 `[height, width]` or `[height, width, 1..4]` (as encode_png takes).

  Raises:
    ValueError: naming the path and what is wrong with `image`.
  """
  try:
    data = encode_png(image)
  except ValueError as error:
    raise ValueError(f'cannot write PNG "{path}": {error}') from None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see module docstring)
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(data)
