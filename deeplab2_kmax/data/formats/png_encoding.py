"""Minimal PNG encoder (8-bit grey or RGB) in numpy + zlib.

Used where TensorFlow is not wanted, e.g. in the worker processes of the synthetic-data builder
(forking or spawning TensorFlow per worker costs seconds and memory). Decoding is left to
tf.io.decode_png.
"""

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
