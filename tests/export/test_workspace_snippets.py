"""The snippets of WORKSPACE.md's "Export, TF Serving and predict" section, run (issue #17).

Each snippet is a fenced block preceded by `<!-- snippet: NAME -->`:
- `rest`: the REST bodies, one JSON document a line. The "iVBORw0KGgo..." placeholder (the
  base64 of PNG's signature) becomes a real PNG; each body is decoded the way TF Serving's REST
  API decodes it and run through the tiny SavedModel's signature.
- `onnx`, `litert`: python, run with exec against the tiny model written in those formats
  (conftest's session fixture `runtimes`), with the documented paths ('exports/kmax/1/...',
  'photo.jpg') replaced by the test's files; their outputs equal the runtimes'.
- `batching`: the batching_parameters_file. tensorflow-serving-api (2.20) does not ship
  `tensorflow_serving/servables/tensorflow/session_bundle_config_pb2.py`, so when it is absent
  the test builds the `tensorflow.serving.BatchingParameters` message from its field
  declarations in TF Serving's session_bundle_config.proto (fields 1-7: the Int64Value /
  StringValue wrappers, allowed_batch_sizes, pad_variable_length_inputs) and parses the
  example with protobuf's text format: unknown or misspelled fields, or a bare number where
  TF Serving expects a `{ value: N }` wrapper, fail as they would in the server.
- `docker-batching`: the flags and the mount that makes /models/kmax/batching.config the
  documented exports/kmax/batching.config.
"""

import base64
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import export
from tests.conftest import REPO_ROOT
from tests.export.conftest import sample_images
from tests.export.test_serving_request import _decode_rest_inputs
from tests.export.test_serving_request import _signature_def

WORKSPACE = REPO_ROOT / 'WORKSPACE.md'
SECTION = '## Export, TF Serving and predict'
SNIPPETS = ('rest', 'docker-batching', 'batching', 'onnx', 'litert')
PNG_B64_PLACEHOLDER = 'iVBORw0KGgo...'
MIN_EQUAL_PIXELS = 0.999
IMAGE_SHAPE = (37, 52)


def _section() -> str:
  text = WORKSPACE.read_text(encoding='utf-8')
  start = text.index(SECTION)
  end = text.find('\n## ', start + 1)
  return text[start:] if end < 0 else text[start:end]


def _snippet(name: str) -> str:
  pattern = re.compile(r'<!-- snippet: ' + re.escape(name) + r' -->\n```[\w-]*\n(.*?)\n```',
                       re.S)
  found = pattern.findall(_section())
  assert len(found) == 1, f'{len(found)} snippets named {name} in {WORKSPACE.name}'
  return found[0]


def _substitute(code: str, replacements: dict) -> str:
  for old, new in replacements.items():
    assert old in code, f'{old} is not in the snippet any more; update this test'
    code = code.replace(old, new)
  return code


def _photo(tmp_path):
  """A PNG standing in for the snippets' photo.jpg, and its pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = sample_images(5, IMAGE_SHAPE)
  path = tmp_path / 'photo.png'
  Image.fromarray(image).save(path)
  return str(path), image


def _run_snippet(name: str, replacements: dict) -> dict:
  code = _substitute(_snippet(name), replacements)
  namespace = {'__name__': f'workspace_snippet_{name}'}
  exec(compile(code, f'{WORKSPACE.name}:{name}', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def _assert_same(got: dict, want: dict):
  assert set(got) == set(want)
  for key in (common.PRED_PANOPTIC, common.PRED_SEMANTIC):
    assert got[key].shape == want[key].shape, key
    assert np.mean(got[key] == want[key]) >= MIN_EQUAL_PIXELS, key
  np.testing.assert_array_equal(got[common.PRED_IMAGE_SIZE], want[common.PRED_IMAGE_SIZE])
  np.testing.assert_array_equal(got[common.PRED_SEGMENT_CLASSES],
                                want[common.PRED_SEGMENT_CLASSES])


def test_section_has_every_named_snippet():
  names = re.findall(r'<!-- snippet: ([\w-]+) -->', _section())
  assert sorted(names) == sorted(SNIPPETS)


def test_rest_bodies_run(exported):
  image = sample_images(9, IMAGE_SHAPE)
  png = tf.io.encode_png(image).numpy()
  encoded = base64.b64encode(png).decode('ascii')
  # The placeholder is the start of every PNG's base64 (its 8-byte signature).
  assert encoded.startswith(PNG_B64_PLACEHOLDER.rstrip('.'))
  lines = [line for line in _snippet('rest').splitlines() if line.strip()]
  assert len(lines) == 2
  signatures = set()
  for line in lines:
    body = line.replace(PNG_B64_PLACEHOLDER, encoded)
    signature = json.loads(body).get('signature_name', 'serving_default')
    signatures.add(signature)
    name, value = _decode_rest_inputs(body, _signature_def(exported, signature))
    outputs = exported.loaded.signatures[signature](**{name: tf.constant(value)})
    expected = IMAGE_SHAPE if signature == 'image_bytes' else (2, 2)
    assert outputs[common.PRED_PANOPTIC].shape == (1,) + expected, signature
  assert signatures == {'image_bytes', 'serving_default'}


def test_onnx_snippet_runs(runtimes, tmp_path):
  photo, image = _photo(tmp_path)
  onnx_runtime = runtimes['onnx']
  namespace = _run_snippet('onnx', {"'exports/kmax/1/model.onnx'": repr(onnx_runtime.path),
                                    "'photo.jpg'": repr(photo)})
  assert namespace['panoptic'].shape == IMAGE_SHAPE
  _assert_same(namespace['outputs'], onnx_runtime(image[None]))
  assert namespace['class_names'] == list(onnx_runtime.descriptor.class_names)


def test_litert_snippet_runs(runtimes, tmp_path):
  photo, image = _photo(tmp_path)
  litert_runtime = runtimes['litert']
  namespace = _run_snippet('litert', {"'exports/kmax/1/model.tflite'": repr(litert_runtime.path),
                                      "'photo.jpg'": repr(photo)})
  assert namespace['panoptic'].shape == IMAGE_SHAPE
  _assert_same(namespace['outputs'], litert_runtime(image[None]))


def _batching_parameters_class():
  """TF Serving's BatchingParameters message (module docstring)."""
  try:
    from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2  # pylint: disable=g-import-not-at-top
    return session_bundle_config_pb2.BatchingParameters
  except ImportError:
    pass
  from google.protobuf import descriptor_pb2  # pylint: disable=g-import-not-at-top
  from google.protobuf import descriptor_pool  # pylint: disable=g-import-not-at-top
  from google.protobuf import message_factory  # pylint: disable=g-import-not-at-top
  from google.protobuf import wrappers_pb2  # pylint: disable=g-import-not-at-top
  pool = descriptor_pool.DescriptorPool()
  wrappers = descriptor_pb2.FileDescriptorProto()
  wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
  pool.Add(wrappers)
  field = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(
      name='tensorflow_serving/servables/tensorflow/session_bundle_config.proto',
      package='tensorflow.serving', syntax='proto3',
      dependency=['google/protobuf/wrappers.proto'])
  message = proto.message_type.add(name='BatchingParameters')
  for name, number, wrapper in (('max_batch_size', 1, 'Int64Value'),
                                ('batch_timeout_micros', 2, 'Int64Value'),
                                ('max_enqueued_batches', 3, 'Int64Value'),
                                ('num_batch_threads', 4, 'Int64Value'),
                                ('thread_pool_name', 5, 'StringValue')):
    message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                      label=field.LABEL_OPTIONAL, type_name=f'.google.protobuf.{wrapper}')
  message.field.add(name='allowed_batch_sizes', number=6, type=field.TYPE_INT64,
                    label=field.LABEL_REPEATED)
  message.field.add(name='pad_variable_length_inputs', number=7, type=field.TYPE_BOOL,
                    label=field.LABEL_OPTIONAL)
  pool.Add(proto)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName('tensorflow.serving.BatchingParameters'))


def test_batching_parameters_example_parses():
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  parameters = text_format.Parse(_snippet('batching'), _batching_parameters_class()())
  for name in ('max_batch_size', 'batch_timeout_micros', 'num_batch_threads',
               'max_enqueued_batches'):
    assert parameters.HasField(name), name
  assert parameters.max_batch_size.value >= 1
  assert parameters.num_batch_threads.value >= 1  # TF Serving: "Must be >= 1"
  assert parameters.max_enqueued_batches.value >= 1
  assert parameters.batch_timeout_micros.value >= 0
  # The documented choice for images of different sizes (see the section's text).
  assert not parameters.pad_variable_length_inputs
  if parameters.allowed_batch_sizes:
    sizes = list(parameters.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == parameters.max_batch_size.value
  # A bare number where TF Serving expects the wrapper is refused, as by the server.
  with pytest.raises(text_format.ParseError):
    text_format.Parse('max_batch_size: 8', _batching_parameters_class()())


def test_docker_batching_command_reads_the_documented_file():
  command = _snippet('docker-batching')
  assert '--enable_batching' in command
  mount = re.search(r'-v "\$PWD/([^:"]+):([^"]+)"', command)
  flag = re.search(r'--batching_parameters_file=(\S+)', command)
  assert mount and flag
  local, container = mount.groups()
  assert flag.group(1).startswith(container.rstrip('/') + '/')
  local_file = local.rstrip('/') + flag.group(1)[len(container.rstrip('/')):]
  assert f'`{local_file}`' in _section(), local_file


def test_section_names_the_files_and_flags_of_the_code():
  from deeplab2_kmax import precision  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import litert_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import onnx_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import runtimes as runtimes_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import serving_warmup  # pylint: disable=g-import-not-at-top
  section = _section()
  from deeplab2_kmax.export import cli  # pylint: disable=g-import-not-at-top
  for name in (onnx_format.ONNX_FILE, litert_format.LITERT_FILE, serving_warmup.WARMUP_FILE,
               saved_model.DESCRIPTOR_FILE, export.ASSETS_EXTRA,
               onnx_format.METADATA_DESCRIPTOR, cli.EXPERIMENT_FILE, cli.COMMAND_LINE_FILE,
               '--overwrite', '--fail_fast'):
    assert name in section, name
  assert f'--format={",".join(runtimes_lib.FORMATS)}' in section
  assert f'--precision={"|".join(precision.PRECISIONS)}' in section
  assert f'--onnx_opset={onnx_format.DEFAULT_OPSET}' in section
  assert f'--litert_weights={"|".join(litert_format.WEIGHT_TYPES)}' in section
  for name in export.INPUT_NAMES.values():
    assert f'`{name}`' in section, name
