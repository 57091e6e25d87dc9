"""png_encoding: encode_png's files decode with TensorFlow's (libpng's) decoder, an independent
one, for every channel count and awkward sizes; the "Up" filter shrinks photos and panoptic maps,
and maps that compress better unfiltered are stored so; bad arrays are refused by name;
write_png/read_png round-trip."""

import pathlib
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.synthetic import scenes as synthetic_scenes

SIZES = [(1, 1), (7, 5), (65, 33)]
# None: a [height, width] array; otherwise [height, width, channels].
CHANNELS = [None, 1, 2, 3, 4]


def image(kind, height, width, channels, seed=0):
  """uint8 [height, width] or [height, width, channels]: noise, or constant rectangles."""
  rng = np.random.default_rng(seed)
  shape = (height, width) if channels is None else (height, width, channels)
  if kind == 'random':
    return rng.integers(0, 256, shape, dtype=np.uint8)
  # Piecewise constant: a 3x4 grid of blocks with random values (wrapping past 255 in filters).
  blocks = rng.integers(0, 256, (3, 4) + shape[2:], dtype=np.uint8)
  rows = np.arange(height) * 3 // height
  cols = np.arange(width) * 4 // width
  return blocks[rows[:, None], cols[None, :]]


def id_map(height=257, width=321, seed=0):
  """uint8 [height, width, 3]: a COCO panoptic PNG's colours of Voronoi-like segments."""
  rng = np.random.default_rng(seed)
  centers = rng.uniform(0, [height, width], (40, 2))
  rows, cols = np.mgrid[:height, :width]
  nearest = np.argmin((rows[..., None] - centers[:, 0]) ** 2 +
                      (cols[..., None] - centers[:, 1]) ** 2, axis=-1)
  segment_ids = rng.integers(1, 200, 40) * 256 + rng.integers(0, 20, 40)
  return panoptic_rgb.id_to_rgb(segment_ids[nearest])


@pytest.mark.parametrize('kind', ['random', 'piecewise'])
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('channels', CHANNELS)
def test_tensorflow_decodes_what_encode_png_writes(kind, size, channels):
  array = image(kind, *size, channels)
  decoded = tf.io.decode_png(png_encoding.encode_png(array), channels=0).numpy()
  expected = array[..., None] if channels is None else array
  np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize('compression', [0, 1, 9])
def test_every_compression_level_decodes(compression):
  array = image('random', 65, 33, 3, seed=compression)
  np.testing.assert_array_equal(
      tf.io.decode_png(png_encoding.encode_png(array, compression)).numpy(), array)


def test_strided_views_are_encoded_as_their_values():
  array = image('random', 65, 33, 4)[::2, ::-1, 1::2]
  np.testing.assert_array_equal(
      tf.io.decode_png(png_encoding.encode_png(array), channels=0).numpy(), array)


def scanlines(data):
  """uint8 [height, 1 + row bytes]: the decompressed rows of encode_png's one IDAT chunk (after
  the 8-byte signature and the 25-byte IHDR chunk), each led by its filter type."""
  assert data[37:41] == b'IDAT'
  length = int.from_bytes(data[33:37], 'big')
  return np.frombuffer(zlib.decompress(data[41:41 + length]), np.uint8).reshape(
      int.from_bytes(data[20:24], 'big'), -1)


def unfiltered_size(array, compression=png_encoding.DEFAULT_COMPRESSION):
  """Bytes of a PNG of `array` with filter type 0 (None) on every row (the previous encoder)."""
  rows = np.pad(array.reshape(array.shape[0], -1), ((0, 0), (1, 0))).tobytes()
  # Signature 8, IHDR chunk 25, IDAT's length, type and CRC 12, IEND chunk 12.
  return 57 + len(zlib.compress(rows, compression))


def test_up_filter_shrinks_a_synthetic_scene_and_its_panoptic_map():
  scene = synthetic_scenes.generate_scene([0, 1, 0], 641, 641)
  for array in (scene.image, panoptic_rgb.id_to_rgb(scene.panoptic(256).astype(np.int32))):
    data = png_encoding.encode_png(array)
    np.testing.assert_array_equal(tf.io.decode_png(data).numpy(), array)
    assert set(scanlines(data)[:, 0]) == {2}
    assert len(data) < 0.9 * unfiltered_size(array)


def test_a_map_that_compresses_better_unfiltered_is_stored_unfiltered():
  rgb = id_map()
  data = png_encoding.encode_png(rgb)
  np.testing.assert_array_equal(tf.io.decode_png(data).numpy(), rgb)
  assert set(scanlines(data)[:, 0]) == {0}
  assert len(data) == unfiltered_size(rgb)
  # At zlib level 1 (no lazy matching) the filter wins on the same map.
  fast = png_encoding.encode_png(rgb, 1)
  np.testing.assert_array_equal(tf.io.decode_png(fast).numpy(), rgb)
  assert set(scanlines(fast)[:, 0]) == {2}
  assert len(fast) < 0.95 * unfiltered_size(rgb, 1)


def test_panoptic_maps_are_as_small_as_tensorflows():
  # tf.io.encode_png: libpng's per-row choice among five filters, at zlib level 6 too. The margin
  # allows for other libpng and zlib versions.
  scene = synthetic_scenes.generate_scene([0, 1, 1], 129, 129)
  for rgb in (id_map(), panoptic_rgb.id_to_rgb(scene.panoptic(256).astype(np.int32))):
    assert len(png_encoding.encode_png(rgb)) < 1.1 * len(tf.io.encode_png(rgb).numpy())


@pytest.mark.parametrize('dtype', [np.float32, np.int32, np.uint16, np.bool_])
def test_encode_png_names_a_wrong_dtype(dtype):
  with pytest.raises(ValueError, match=rf'needs uint8 pixels, got {np.dtype(dtype).name} '
                                       r'\(shape \(3, 4, 3\)\)'):
    png_encoding.encode_png(np.zeros((3, 4, 3), dtype))


@pytest.mark.parametrize('shape', [(5,), (3, 4, 5), (3, 4, 0), (2, 3, 4, 1), (0, 3), (3, 0, 3)])
def test_encode_png_names_a_wrong_shape(shape):
  with pytest.raises(ValueError) as info:
    png_encoding.encode_png(np.zeros(shape, np.uint8))
  message = str(info.value)
  assert f'got shape {shape}' in message
  assert '[height, width] or [height, width, channels]' in message
  assert '4 (RGBA)' in message


@pytest.mark.parametrize('channels', CHANNELS)
def test_write_png_makes_the_folder_and_round_trips(tmp_path, channels):
  array = image('piecewise', 7, 5, channels)
  path = str(tmp_path / 'a' / 'b' / 'x.png')
  png_encoding.write_png(path, array)
  expected = array[..., None] if channels is None else array
  np.testing.assert_array_equal(png_encoding.read_png(path), expected)


def test_write_png_names_the_path_and_writes_nothing_for_a_bad_image(tmp_path):
  path = str(tmp_path / 'folder' / 'x.png')
  with pytest.raises(ValueError, match=re.escape(f'cannot write PNG "{path}": encode_png needs '
                                                 'uint8 pixels, got int64')):
    png_encoding.write_png(path, np.zeros((3, 4), np.int64))
  assert not (tmp_path / 'folder').exists()


def test_encode_png_does_not_import_tensorflow():
  # The synthetic builder's workers rely on it (see the module docstring).
  code = ('import sys, numpy as np\n'
          'from deeplab2_kmax.data.formats import png_encoding\n'
          'png_encoding.encode_png(np.zeros((2, 2, 4), np.uint8))\n'
          'assert "tensorflow" not in sys.modules, "encode_png imported tensorflow"\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
  assert result.returncode == 0, result.stderr
