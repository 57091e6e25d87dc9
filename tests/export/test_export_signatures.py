"""The exported signatures against the in-framework model + post-processor (issue #7, 1, 2, 5).

Parity: ids exactly, scores to 1e-5, on several image sizes and batch sizes, for uint8 tensors,
encoded bytes of mixed sizes and tf.Examples. Bad inputs end in an error naming the problem.
"""

import io

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import export
from deeplab2_kmax.checkpoint import model_restore
from deeplab2_kmax.data.formats import tfrecord
from tests import test_architecture
from tests.conftest import REPO_ROOT
from tests.export.conftest import in_framework
from tests.export.conftest import numpy_segments
from tests.export.conftest import sample_images

ID_KEYS = (common.PRED_PANOPTIC, common.PRED_SEMANTIC, common.PRED_INSTANCE)
SCORE_KEYS = (common.PRED_INSTANCE_SCORES, common.PRED_SEMANTIC_SCORES)


def _run(exported, signature, **inputs):
  outputs = exported.loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
  return {k: v.numpy() for k, v in outputs.items()}


def _assert_matches(got, want, image_index, height, width):
  for key in ID_KEYS:
    np.testing.assert_array_equal(got[key][image_index, :height, :width],
                                  want[key][0 if want[key].shape[0] == 1 else image_index,
                                            :height, :width], err_msg=key)
  for key in SCORE_KEYS:
    np.testing.assert_allclose(got[key][image_index, :height, :width],
                               want[key][0 if want[key].shape[0] == 1 else image_index,
                                         :height, :width], atol=1e-5, rtol=0, err_msg=key)


def _assert_segments(got, descriptor):
  for i, (height, width) in enumerate(got[export.IMAGE_SIZE]):
    ids, classes, scores, areas = numpy_segments(
        got[common.PRED_PANOPTIC][i, :height, :width],
        got[common.PRED_INSTANCE_SCORES][i, :height, :width],
        descriptor.panoptic_label_divisor, descriptor.ignore_label)
    count = got[export.NUM_SEGMENTS][i]
    assert count == len(ids)
    np.testing.assert_array_equal(got[export.SEGMENT_IDS][i, :count], ids)
    np.testing.assert_array_equal(got[export.SEGMENT_CLASSES][i, :count], classes)
    np.testing.assert_array_equal(got[export.SEGMENT_AREAS][i, :count], areas)
    np.testing.assert_allclose(got[export.SEGMENT_SCORES][i, :count], scores, atol=1e-5)
    assert (got[export.SEGMENT_IDS][i, count:] == -1).all()
    assert (got[export.SEGMENT_AREAS][i, count:] == 0).all()


def test_command_line_wrote_the_versioned_layout(exported):
  assert (exported.directory / 'saved_model.pb').exists()
  assert (exported.directory / 'variables').is_dir()
  assert set(exported.loaded.signatures) == {'serving_default', 'image_bytes', 'tf_example'}
  assert 'ckpt-123' in exported.stdout and str(exported.directory) in exported.stdout
  # The restored weights are the trained ones, not a fresh initialisation.
  saved = exported.loaded.model_variables
  assert len(saved) == len(exported.module.model.variables)
  for restored, variable in zip(saved, exported.module.model.variables):
    if 'seed_generator' in variable.path:
      continue  # dropout's random state, advanced by every training call
    np.testing.assert_array_equal(restored.numpy(), variable.numpy(), err_msg=variable.path)


@pytest.mark.parametrize('shape', [(1, 65, 65), (3, 41, 90), (2, 120, 37)])
def test_serving_default_equals_in_framework(exported, shape):
  images = sample_images(sum(shape), shape)
  got = _run(exported, 'serving_default', images=images)
  want = in_framework(exported.module, list(images))
  assert got[common.PRED_PANOPTIC].shape == shape and got[common.PRED_PANOPTIC].dtype == np.int32
  np.testing.assert_array_equal(got[export.IMAGE_SIZE], [shape[1:]] * shape[0])
  for i in range(shape[0]):
    _assert_matches(got, want, i, *shape[1:])
  _assert_segments(got, exported.module.post_processor._descriptor)
  # The tiny model is sharpened so that parity covers several segments and classes.
  assert got[export.NUM_SEGMENTS].max() >= 2
  assert len(np.unique(got[common.PRED_SEMANTIC])) >= 2


def _encoded(images):
  encoded = []
  for index, image in enumerate(images):
    if index == 1:
      encoded.append(tf.io.encode_jpeg(image, quality=95).numpy())
    else:
      encoded.append(tf.io.encode_png(image).numpy())
  return encoded


def test_image_bytes_of_mixed_sizes_equal_one_image_at_a_time(exported):
  images = [sample_images(1, (50, 70)), sample_images(2, (33, 33)), sample_images(3, (80, 20))]
  encoded = _encoded(images)
  got = _run(exported, 'image_bytes', image_bytes=np.array(encoded, dtype=object))
  assert got[common.PRED_PANOPTIC].shape == (3, 80, 70)
  np.testing.assert_array_equal(got[export.IMAGE_SIZE], [[50, 70], [33, 33], [80, 20]])
  for i, data in enumerate(encoded):
    decoded = tf.io.decode_image(data, channels=3).numpy()  # the JPEG is lossy
    height, width = decoded.shape[:2]
    _assert_matches(got, in_framework(exported.module, [decoded]), i, height, width)
    # Outside each image: void, no instance, zero scores.
    outside = np.ones(got[common.PRED_PANOPTIC].shape[1:], bool)
    outside[:height, :width] = False
    assert (got[common.PRED_PANOPTIC][i][outside] == 0).all()
    assert (got[common.PRED_INSTANCE][i][outside] == 0).all()
    assert (got[common.PRED_INSTANCE_SCORES][i][outside] == 0).all()
  _assert_segments(got, exported.module.post_processor._descriptor)


def test_tf_example_equals_image_bytes(exported):
  images = [sample_images(4, (40, 60)), sample_images(5, (70, 50))]
  encoded = _encoded(images)
  examples = [tfrecord.encode_example(data, 'jpeg' if i == 1 else 'png', f'image{i}',
                                      *image.shape[:2])
              for i, (data, image) in enumerate(zip(encoded, images))]
  from_examples = _run(exported, 'tf_example', examples=np.array(examples, dtype=object))
  from_bytes = _run(exported, 'image_bytes', image_bytes=np.array(encoded, dtype=object))
  assert from_examples.keys() == from_bytes.keys()
  for key, value in from_bytes.items():
    np.testing.assert_array_equal(from_examples[key], value, err_msg=key)


def _fixed_batch_module(exported, batch_size):
  return export.ServingModule(exported.module.model, exported.module.post_processor,
                              exported.module.preprocess_options,
                              exported.module.post_processor._descriptor, batch_size=batch_size)


def test_fixed_batch_size_input_specs(exported):
  specs = _fixed_batch_module(exported, 2).input_specs()
  assert specs['serving_default'].shape.as_list() == [2, None, None, 3]
  assert specs['serving_default'].dtype == tf.uint8
  assert specs['image_bytes'].shape.as_list() == [2] and specs['tf_example'].dtype == tf.string
  dynamic = exported.loaded.signatures['serving_default'].structured_input_signature[1]
  assert dynamic['images'].shape.as_list() == [None, None, None, 3]


@pytest.mark.slow  # traces the model once more (~15 s on a loaded machine)
def test_fixed_batch_size_signature_equals_dynamic(exported):
  function = _fixed_batch_module(exported, 2).signatures(['image_tensor'])['serving_default']
  assert function.structured_input_signature[0][0].shape.as_list() == [2, None, None, 3]
  images = sample_images(9, (2, 30, 45))
  got = {k: v.numpy() for k, v in function(images=tf.constant(images)).items()}
  want = _run(exported, 'serving_default', images=images)
  for key in ID_KEYS + SCORE_KEYS:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)


def _png_bytes(image):
  return tf.io.encode_png(image).numpy()


@pytest.mark.parametrize('signature, name, value, message', [
    ('serving_default', 'images', np.zeros((1, 0, 10, 3), np.uint8), 'height and width > 0'),
    ('serving_default', 'images', np.zeros((2, 7, 0, 3), np.uint8), 'height and width > 0'),
    ('serving_default', 'images', np.zeros((0, 7, 7, 3), np.uint8), 'holds no image'),
    ('image_bytes', 'image_bytes', np.array([b''], object), 'is empty'),
    ('image_bytes', 'image_bytes', np.array([b'GIF', b'not an image'], object),
     'not a JPEG, PNG'),
    ('image_bytes', 'image_bytes', 'truncated_png', 'PNG'),
    ('tf_example', 'examples', np.array([b'\x0a\x05 garbage'], object), 'parse|Example'),
])
def test_bad_input_is_an_invalid_argument_error(exported, signature, name, value, message):
  if isinstance(value, str):
    value = np.array([_png_bytes(sample_images(0, (20, 20)))[:60]], object)
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    _run(exported, signature, **{name: value})
  # The model still answers after a failed request.
  _run(exported, 'serving_default', images=sample_images(0, (1, 20, 20)))


@pytest.mark.parametrize('value', [np.zeros((1, 20, 20, 3), np.float32),
                                   np.zeros((20, 20, 3), np.uint8),
                                   np.zeros((1, 20, 20, 4), np.uint8)])
def test_wrong_dtype_or_rank_is_refused_by_the_signature(exported, value):
  with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
    _run(exported, 'serving_default', images=value)


def test_restore_from_a_folder_without_checkpoint_names_the_fix(exported, tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.checkpoint import layout as checkpoint_layout
  with pytest.raises(checkpoint_layout.CheckpointMismatchError, match='no checkpoint in'):
    model_restore.restore_model(exported.module.model, str(tmp_path))


def test_latest_version_dir(exported, tmp_path):
  assert export.latest_version_dir(str(exported.base)) == str(exported.directory)
  assert export.latest_version_dir(str(exported.directory)) == str(exported.directory)
  (tmp_path / '3').mkdir()
  (tmp_path / '12').mkdir()
  (tmp_path / 'notes').mkdir()
  assert export.latest_version_dir(str(tmp_path)) == str(tmp_path / '12')
  with pytest.raises(FileNotFoundError, match='numeric version folders'):
    export.latest_version_dir(str(tmp_path / 'notes'))


@pytest.mark.parametrize('text, default, expected', [
    (None, 0, None), (None, 4, 4), ('dynamic', 4, None), ('8', 0, 8), ('0', 4, None)])
def test_parse_batch_size(text, default, expected):
  assert export.parse_batch_size(text, default) == expected


@pytest.mark.parametrize('text', ['-1', 'many'])
def test_parse_batch_size_rejects(text):
  with pytest.raises(ValueError, match='--batch_size must be a positive integer or "dynamic"'):
    export.parse_batch_size(text, 0)


def test_the_library_package_does_not_import_its_command_line():
  # `from deeplab2_kmax import export` is the library; cli.py (absl flags, config files,
  # checkpoints) is built on it, not the other way round.
  sources = test_architecture.module_sources(REPO_ROOT)
  imported = {target for target, _ in test_architecture.imported_modules(
      'deeplab2_kmax.export', sources['deeplab2_kmax.export'], sorted(sources))}
  assert imported and 'deeplab2_kmax.export.cli' not in imported, sorted(imported)


def test_unknown_input_type_is_named(exported):
  with pytest.raises(ValueError, match='input_type "jpeg" is unknown'):
    exported.module.signatures(['jpeg'])


@pytest.mark.slow  # traces the model once more
def test_include_raw_outputs_adds_the_model_outputs_at_the_crop(exported):
  module = export.ServingModule(exported.module.model, exported.module.post_processor,
                                exported.module.preprocess_options, exported.module.descriptor,
                                include_raw_outputs=True)
  function = module.signatures(['image_tensor'])['serving_default']
  images = sample_images(12, (2, 40, 50))
  got = {k: v.numpy() for k, v in function(images=tf.constant(images)).items()}
  assert set(export.RAW_OUTPUT_KEYS) <= set(got)
  num_slots = exported.config.model_options.kmax.num_cluster_centers
  assert got[common.PRED_TRANSFORMER_CLASS_LOGITS].shape[:2] == (2, num_slots)
  assert got[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape[-1] == num_slots
  want = _run(exported, 'serving_default', images=images)
  np.testing.assert_array_equal(got[common.PRED_PANOPTIC], want[common.PRED_PANOPTIC])


def test_saved_model_has_no_xla_functions(exported):
  # TF Serving's XLA:CPU JIT is off by default: export traces the model without the inference
  # fusion's XLA functions (its dynamic image size would otherwise select them).
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  saved = saved_model_pb2.SavedModel()
  saved.ParseFromString((exported.directory / 'saved_model.pb').read_bytes())
  functions = [f for meta in saved.meta_graphs for f in meta.graph_def.library.function]
  assert functions
  compiled = [f.signature.name for f in functions
              if '_XlaMustCompile' in f.attr and f.attr['_XlaMustCompile'].b]
  assert not compiled
