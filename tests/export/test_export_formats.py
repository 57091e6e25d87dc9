"""ONNX and LiteRT exports against the SavedModel (issue #17): the same serving graph in three
runtimes.

The tiny sharpened kMaX of conftest.py (several segments of several classes) is written in all
three formats from one ServingModule with the raw model outputs included (conftest's session
fixture `runtimes`, shared with test_workspace_snippets.py), and each format runs
the same uint8 images of several sizes through its own runtime (ONNX Runtime, the LiteRT
interpreter). Tolerances, measured on AVX2 and AVX512/AMX hosts and set with a margin:
- panoptic, semantic and instance ids: equal on >= 99.9% of pixels (the acceptance bound);
- segments: the same panoptic ids with the same classes;
- raw logits: |difference| <= 2e-4 * (1 + max |logit|), i.e. float32 reassociation noise: the
  runtimes fuse and order convolutions differently.
"""

import io

import numpy as np
import pytest

from deeplab2_kmax import common
from tests.export.conftest import sample_images

pytest.importorskip('onnxruntime', reason='the [onnx] extra is not installed '
                    '(pip install -e ".[test]")')
pytest.importorskip('tf2onnx', reason='the [onnx] extra is not installed '
                    '(pip install -e ".[test]")')

FILE_FORMATS = ('onnx', 'litert')
ID_KEYS = (common.PRED_PANOPTIC, common.PRED_SEMANTIC, common.PRED_INSTANCE)
RAW_KEYS = (common.PRED_PIXEL_SPACE_MASK_LOGITS, common.PRED_TRANSFORMER_CLASS_LOGITS)
MIN_EQUAL_PIXELS = 0.999
LOGIT_TOLERANCE = 2e-4
# (height, width): the crop itself, wider, taller, smaller than the crop.
IMAGE_SHAPES = ((65, 65), (50, 90), (97, 40), (30, 41))


def _assert_same_predictions(got: dict, want: dict, what: str):
  assert set(got) == set(want), what
  for key in ID_KEYS:
    assert got[key].shape == want[key].shape, (what, key)
    equal = np.mean(got[key] == want[key])
    assert equal >= MIN_EQUAL_PIXELS, f'{what}: {key} equal on {equal:.5f} of the pixels'
  for key in RAW_KEYS:
    scale = 1.0 + np.abs(want[key]).max()
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=LOGIT_TOLERANCE * scale,
                               err_msg=f'{what}: {key}')
  np.testing.assert_array_equal(got[common.PRED_IMAGE_SIZE], want[common.PRED_IMAGE_SIZE])
  for image in range(len(want[common.PRED_NUM_SEGMENTS])):
    ids = lambda outputs: outputs[common.PRED_SEGMENT_IDS][image]
    classes = lambda outputs: outputs[common.PRED_SEGMENT_CLASSES][image]
    np.testing.assert_array_equal(ids(got), ids(want), err_msg=what)
    np.testing.assert_array_equal(classes(got), classes(want), err_msg=what)


@pytest.mark.parametrize('file_format', FILE_FORMATS)
def test_format_matches_saved_model_on_images_of_several_sizes(runtimes, file_format):
  segments_seen = []
  for seed, shape in enumerate(IMAGE_SHAPES):
    images = sample_images(seed, (1,) + shape)
    want = runtimes['saved_model'](images)
    got = runtimes[file_format](images)
    _assert_same_predictions(got, want, f'{file_format} at {shape}')
    segments_seen.append(int(want[common.PRED_NUM_SEGMENTS][0]))
  # Parity on single-segment predictions would prove little.
  assert max(segments_seen) >= 3, segments_seen


@pytest.mark.parametrize('file_format', FILE_FORMATS)
def test_format_runs_a_dynamic_batch(runtimes, file_format):
  images = sample_images(7, (2, 40, 56))
  want = runtimes['saved_model'](images)
  got = runtimes[file_format](images)
  assert got[common.PRED_PANOPTIC].shape == (2, 40, 56)
  _assert_same_predictions(got, want, f'{file_format}, batch 2')


def test_onnx_file_carries_its_label_space(runtimes):
  onnx_runtime = runtimes['onnx']
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import onnx_format  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(onnx_runtime.path, providers=['CPUExecutionProvider'])
  assert onnx_format.METADATA_DESCRIPTOR in session.get_modelmeta().custom_metadata_map
  want = runtimes['saved_model'].descriptor
  assert onnx_runtime.descriptor.class_names == want.class_names
  assert onnx_runtime.descriptor.panoptic_label_divisor == want.panoptic_label_divisor
  # The graph has one input, uint8 images with dynamic batch, height and width.
  (graph_input,) = session.get_inputs()
  assert (graph_input.name, graph_input.type) == ('images', 'tensor(uint8)')
  assert [isinstance(d, int) for d in graph_input.shape] == [False, False, False, True]


@pytest.mark.parametrize('file_format', FILE_FORMATS)
def test_predict_runs_each_format(runtimes, file_format, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import predict  # pylint: disable=g-import-not-at-top
  image = sample_images(3, (48, 70))
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  data = buffer.getvalue()
  got = predict.Predictor.from_model(runtimes[file_format].path)(data)
  want = predict.Predictor.from_model(runtimes['saved_model'].path)(data)
  assert np.mean(got[common.PRED_PANOPTIC] == want[common.PRED_PANOPTIC]) >= MIN_EQUAL_PIXELS
  np.testing.assert_array_equal(got[common.PRED_SEGMENT_CLASSES],
                                want[common.PRED_SEGMENT_CLASSES])
  with pytest.raises(Exception, match='not a JPEG, PNG'):
    predict.Predictor.from_model(runtimes[file_format].path)(b'plain text, not an image')


def test_model_path_of_an_unknown_kind_is_refused_with_what_it_got(tmp_path):
  from deeplab2_kmax.export import runtimes as runtimes_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'missing\.pb does not exist; give a SavedModel'):
    runtimes_lib.format_of(str(tmp_path / 'missing.pb'))
  notes = tmp_path / 'notes.txt'
  notes.write_text('hello')
  with pytest.raises(ValueError, match='is a file of an unknown kind'):
    runtimes_lib.format_of(str(notes))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    runtimes_lib.format_of(str(tmp_path / 'model.onnx'))
  with pytest.raises(FileNotFoundError, match='neither a SavedModel'):
    runtimes_lib.format_of(str(tmp_path))


def test_format_flag_is_checked_and_ordered_saved_model_first():
  from deeplab2_kmax.export import cli  # pylint: disable=g-import-not-at-top
  # The SavedModel writer clears its version folder, so it goes first whatever the order given.
  assert cli.parse_formats(['litert', 'onnx', 'saved_model']) == ['saved_model', 'onnx',
                                                                    'litert']
  with pytest.raises(ValueError, match='tflite is not a format; use one or more of '
                     'saved_model,onnx,litert'):
    cli.parse_formats(['onnx', 'tflite'])
  with pytest.raises(ValueError, match='nothing is not a format'):
    cli.parse_formats([])


def test_litert_float16_weights_halve_the_file_and_keep_the_predictions(exported, runtimes,
                                                                         tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import litert_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import runtimes as runtimes_lib  # pylint: disable=g-import-not-at-top
  path = litert_format.write(exported.module, str(tmp_path), weights='float16')
  size16, size32 = os.path.getsize(path), os.path.getsize(runtimes['litert'].path)
  assert size16 < 0.6 * size32, (size16, size32)
  half = runtimes_lib.LiteRTRuntime(path)
  for seed, shape in enumerate(IMAGE_SHAPES[:2]):
    images = sample_images(seed, (1,) + shape)
    want = runtimes['saved_model'](images)[common.PRED_PANOPTIC]
    got = half(images)[common.PRED_PANOPTIC]
    # float16 weights move logits by ~1e-3 relative: a few boundary pixels may flip.
    assert np.mean(got == want) >= 0.99, (shape, np.mean(got == want))
  with pytest.raises(ValueError, match='--litert_weights "int8" is unknown'):
    litert_format.write(exported.module, str(tmp_path), weights='int8')
