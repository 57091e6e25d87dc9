"""Hostile and careless inputs to export, the SavedModel and predict (issue #18).

Each test is named after the row of the issue's table it covers. The command lines run in a
fresh process each (absl flags are process-global), several cases per process so that
TensorFlow is imported once.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import export
from deeplab2_kmax import predict
from deeplab2_kmax.checkpoint import paths as checkpoint_paths
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.data.input import preprocessing
from deeplab2_kmax.export import cli as export_cli
from deeplab2_kmax.export import runtimes as runtimes_lib
from tests.conftest import REPO_ROOT
from tests.export.conftest import in_framework
from tests.export.conftest import sample_images

IMAGES_SPEC = 'serving_default input `images` must be uint8 [batch, height, width, 3]'

# Runs module.main once per flag list in one process; prints [[status, stdout, stderr], ...].
_CLI_DRIVER = textwrap.dedent('''
    import contextlib, importlib, io, json, sys
    from absl import flags
    module = importlib.import_module(sys.argv[1])
    module.define_flags()
    results = []
    for argv in json.loads(sys.argv[2]):
      out, err = io.StringIO(), io.StringIO()
      flags.FLAGS.unparse_flags()
      flags.FLAGS(['cli'] + argv)
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = module.main(['cli'])
      results.append([status, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
''')


def run_cli_cases(module: str, cases: list) -> list:
  """[(exit status, stdout, stderr)] of module.main for each flag list; a traceback fails."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  result = subprocess.run([sys.executable, '-c', _CLI_DRIVER, module, json.dumps(cases)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return [tuple(item) for item in json.loads(result.stdout.strip().splitlines()[-1])]


def _png(seed, shape) -> bytes:
  return tf.io.encode_png(sample_images(seed, shape)).numpy()


def _jpeg(seed, shape) -> bytes:
  return tf.io.encode_jpeg(sample_images(seed, shape)).numpy()


# ---- predict ----


@pytest.mark.parametrize('data, reason', [
    (b'hello world, not an image', "is not a JPEG, PNG, GIF, BMP or WebP image; its first bytes "
                                   "are b'hello wo'"),
    (b'', 'is empty (0 bytes)'),
])
def test_hostile_predict_text_or_empty_jpg_names_the_reason(exported, data, reason):
  predictor = predict.Predictor.from_saved_model(str(exported.directory))
  with pytest.raises(predict.BadInputError) as raised:
    predictor(data)
  assert str(raised.value) == reason


def test_hostile_predict_graph_error_keeps_the_export_message():
  """The export's own reason, not TensorFlow's first line "Graph execution error:"."""
  message = ('Graph execution error:\n\nDetected at node map/while/Assert_1/Assert defined at '
             '(most recent call last):\n<stack traces unavailable>\nassertion failed: '
             '[image_bytes: the image at batch index] [0] [is empty; send JPEG or PNG bytes]\n'
             '\t [[{{node map/while/Assert_1/Assert}}]] [Op:__inference_signature_wrapper_7]')
  error = tf.errors.InvalidArgumentError(None, None, message)
  assert export.error_message(error) == ('image_bytes: the image at batch index 0 is empty; send '
                                         'JPEG or PNG bytes')
  truncated = tf.errors.InvalidArgumentError(
      None, None, 'Graph execution error:\n\nDetected at node decode_image/DecodeImage defined '
      'at (most recent call last):\n<stack traces unavailable>\nInvalid PNG data, size 60\n\t '
      '[[{{node decode_image/DecodeImage}}]] [Op:__inference_signature_wrapper_7]')
  assert export.error_message(truncated) == 'Invalid PNG data, size 60'


def test_hostile_predict_same_stem_gets_distinct_outputs_and_image_ids(exported, tmp_path):
  folder = tmp_path / 'in'
  (folder / 'sub').mkdir(parents=True)
  (folder / 'x.jpg').write_bytes(_jpeg(1, (30, 40)))
  (folder / 'x.png').write_bytes(_png(2, (36, 20)))
  (folder / 'sub' / 'x.png').write_bytes(_png(3, (25, 25)))
  (folder / 'y.png').write_bytes(_png(4, (20, 30)))
  # A glob's matches are the inputs, but for folders.
  assert predict.resolve_inputs(str(folder / '*')) == [str(folder / name)
                                                       for name in ('x.jpg', 'x.png', 'y.png')]
  files = sorted(str(p) for p in folder.rglob('*.*'))
  assert predict.output_stems(files) == ['sub_x_png', 'x_jpg', 'x_png', 'y']
  predictor = predict.Predictor.from_saved_model(str(exported.directory))
  annotations = predict.predict_files(predictor, files, str(tmp_path / 'out'),
                                      show_progress=False)
  document = json.loads((tmp_path / 'out' / predict.PANOPTIC_JSON).read_text())
  ids = [a['image_id'] for a in document['annotations']]
  assert ids == ['sub_x_png', 'x_jpg', 'x_png', 'y'] == [a['image_id'] for a in annotations]
  # Each input's own prediction in its own files: the sizes tell them apart.
  for stem, shape in [('sub_x_png', (25, 25)), ('x_jpg', (30, 40)), ('x_png', (36, 20))]:
    assert coco_format.read_panoptic_png(str(tmp_path / 'out' / 'panoptic' / f'{stem}.png')).shape \
        == shape
    assert (tmp_path / 'out' / 'segments' / f'{stem}.json').exists()


def test_hostile_predict_output_stems_never_collide():
  files = ['d/x.jpg', 'd/x.png', 'd/x_jpg.png', 'a/x.jpg', 'b/x.jpg', 'x.jpg', 'x.jpg']
  stems = predict.output_stems(files)
  assert len(set(stems)) == len(files), stems
  assert predict.output_stems(['d/x.jpg', 'd/y.png']) == ['x', 'y']


def test_hostile_predict_folder_with_bad_images(exported, tmp_path):
  """Bad files are skipped and listed at the end (exit 1), the good ones written with
  panoptic.json; --fail_fast stops at the first bad one. --output_dir being a file is
  refused before the model loads (the missing --model would be reported otherwise)."""
  folder = tmp_path / 'in'
  folder.mkdir()
  (folder / 'a.png').write_bytes(_png(1, (30, 40)))
  (folder / 'b.jpg').write_text('hello world')
  (folder / 'c.jpg').write_bytes(b'')
  (folder / 'd.png').write_bytes(_png(2, (20, 30))[:60])  # truncated
  (folder / 'e.jpg').write_bytes(_jpeg(3, (40, 30)))
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  model = str(exported.base)
  skip, fail_fast, output_is_file = run_cli_cases('deeplab2_kmax.predict', [
      [f'--model={model}', f'--input={folder}', f'--output_dir={tmp_path / "out"}'],
      [f'--model={model}', f'--input={folder}', f'--output_dir={tmp_path / "out2"}',
       '--fail_fast'],
      [f'--model={tmp_path / "missing"}', f'--input={folder}', f'--output_dir={a_file}'],
  ])
  status, stdout, stderr = skip
  assert status == 1
  summary = stderr[stderr.index('error: '):].splitlines()
  assert summary == [
      f'error: 3 of 5 input files skipped; the outputs of the other 2 are in {tmp_path / "out"} '
      '(panoptic.json included):',
      f"  {folder / 'b.jpg'}: is not a JPEG, PNG, GIF, BMP or WebP image; its first bytes are "
      "b'hello wo'",
      f"  {folder / 'c.jpg'}: is empty (0 bytes)",
      f"  {folder / 'd.png'}: Invalid PNG data, size 60"]
  assert '[predict] 2 images' in stdout
  document = json.loads((tmp_path / 'out' / predict.PANOPTIC_JSON).read_text())
  assert [a['image_id'] for a in document['annotations']] == ['a', 'e']

  status, _, stderr = fail_fast
  assert status == 1
  assert stderr.strip().splitlines()[-1] == (
      f"error: {folder / 'b.jpg'}: is not a JPEG, PNG, GIF, BMP or WebP image; its first bytes "
      "are b'hello wo' (--fail_fast: stopped here)")
  assert not (tmp_path / 'out2' / predict.PANOPTIC_JSON).exists()

  status, stdout, stderr = output_is_file
  assert status == 1 and not stdout
  assert stderr == (f'error: --output_dir {a_file} is a file, not a folder; give a folder (it '
                    'is created if missing; the predictions go there).\n')


# ---- the SavedModel and the runtimes ----


@pytest.mark.parametrize('images, got', [
    (np.linspace(0, 1, 1 * 20 * 20 * 3, dtype=np.float32).reshape(1, 20, 20, 3),
     'got float32 [1, 20, 20, 3] in [0, 1]: scale to 0..255 and convert with .astype(np.uint8)'),
    (np.zeros((1, 20, 20, 3), np.int64), 'got int64 [1, 20, 20, 3]'),
])
def test_hostile_saved_model_float_input_is_refused(exported, images, got):
  runtime = runtimes_lib.SavedModelRuntime(str(exported.directory))
  with pytest.raises(ValueError) as raised:
    runtime(images)
  assert str(raised.value).startswith(f'{IMAGES_SPEC}; {got}')
  # A client calling the loaded signature with a tf.Tensor of another dtype is refused too.
  with pytest.raises(tf.errors.InvalidArgumentError, match='expected to be a uint8 tensor'):
    exported.loaded.signatures['serving_default'](images=tf.constant(images))


@pytest.mark.parametrize('shape, hint', [
    ((20, 30, 3), 'one image: add the batch axis'),
    ((1, 20, 30, 4), 'RGB only'),
    ((2, 20, 30), ''),
])
def test_hostile_saved_model_wrong_rank_or_channels_names_the_signature(exported, shape, hint):
  images = np.zeros(shape, np.uint8)
  runtime = runtimes_lib.SavedModelRuntime(str(exported.directory))
  with pytest.raises(ValueError) as raised:
    runtime(images)
  assert str(raised.value).startswith(f'{IMAGES_SPEC}; got uint8 {list(shape)}')
  assert hint in str(raised.value)
  # A tensor that reaches the graph (as from TF Serving or the C API) is checked there.
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    exported.loaded.signatures['serving_default'](images=tf.constant(images))
  assert export.error_message(raised.value) == (
      'serving_default: `images` must be uint8 [batch, height, width, 3]; got shape '
      f'[{" ".join(str(d) for d in shape)}]')


@pytest.mark.parametrize('shape', [(1, 1, 200), (2, 3, 100), (1, 200, 2), (1, 1, 5000)])
def test_hostile_saved_model_thin_images_are_predicted_at_their_size(exported, shape):
  images = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
  got = {k: v.numpy() for k, v in exported.loaded.signatures['serving_default'](
      images=tf.constant(images)).items()}
  assert got[common.PRED_PANOPTIC].shape == shape
  np.testing.assert_array_equal(got[export.IMAGE_SIZE], [shape[1:]] * shape[0])
  # The evaluator preprocesses with the same function: the same predictions.
  want = in_framework(exported.module, list(images))
  np.testing.assert_array_equal(got[common.PRED_PANOPTIC], want[common.PRED_PANOPTIC])


def test_hostile_resize_to_range_keeps_one_pixel_and_leaves_normal_sizes_alone():
  def size(height, width, factor=0):
    return preprocessing.resize_to_range_size(height, width, None, (641, 641), factor).numpy()
  np.testing.assert_array_equal(size(1, 5000), [1, 641])
  np.testing.assert_array_equal(size(3, 1000), [1, 641])
  np.testing.assert_array_equal(size(10, 2000), [3, 641])
  np.testing.assert_array_equal(size(5000, 1), [641, 1])
  np.testing.assert_array_equal(size(1, 5000, factor=32), [1, 641])
  # Unchanged where no side reaches 0: floor(side * 641 / 1000).
  np.testing.assert_array_equal(size(480, 1000), [307, 641])
  np.testing.assert_array_equal(size(641, 641), [641, 641])


# ---- export ----


def test_hostile_export_version_never_replaced_silently(tmp_path):
  from deeplab2_kmax.protos import export_pb2  # pylint: disable=g-import-not-at-top
  unset = export_pb2.ExportOptions()
  assert export_cli.choose_version(str(tmp_path / 'new'), None, unset, False) == 1
  (tmp_path / '1').mkdir()
  (tmp_path / '1' / 'saved_model.pb').write_bytes(b'x')
  (tmp_path / '3').mkdir()
  (tmp_path / 'notes').mkdir()
  assert export_cli.choose_version(str(tmp_path), None, unset, False) == 4
  with pytest.raises(ValueError) as raised:
    export_cli.choose_version(str(tmp_path), 1, unset, False)
  assert str(raised.value) == (
      f'{tmp_path / "1"} already holds an export (--version=1); pass --overwrite to replace '
      'it, or --version=4 (the next free number, also the default when neither --version nor '
      'export_options.version is set).')
  assert export_cli.choose_version(str(tmp_path), 1, unset, True) == 1
  configured = export_pb2.ExportOptions(version=1)
  with pytest.raises(ValueError, match=r'\(export_options.version: 1\)'):
    export_cli.choose_version(str(tmp_path), None, configured, False)
  assert export_cli.choose_version(str(tmp_path), 3, unset, False) == 3  # empty folder


def test_hostile_export_bad_paths_are_one_line_before_the_model(exported, tmp_path):
  """A second export to a taken version, an --output_path that is a file, a --checkpoint_path
  that does not exist: one line each, exit 1, before the model is built."""
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  common_flags = [f'--config_file={exported.config_file}']
  checkpoint = f'--checkpoint_path={exported.checkpoint_dir}'
  missing = tmp_path / 'runs' / 'ckpt-5'
  cases = run_cli_cases('deeplab2_kmax.export.cli', [
      common_flags + [checkpoint, f'--output_path={exported.base}', '--version=1'],
      common_flags + [checkpoint, f'--output_path={a_file}'],
      common_flags + [checkpoint, f'--output_path={a_file / "sub"}'],
      common_flags + [f'--checkpoint_path={missing}', f'--output_path={tmp_path / "out"}'],
  ])
  messages = [
      f'{exported.directory} already holds an export (--version=1); pass --overwrite to replace '
      'it, or --version=2',
      f"--output_path {a_file} is a file, not a folder; give a folder (TF Serving's model base "
      'path: the version folders go there).',
      f'--output_path {a_file / "sub"} cannot be created: {a_file} is a file;',
      f'--checkpoint_path {missing} does not exist; give a checkpoint prefix such as '
      'runs/x/ckpt-1000 (the files ckpt-1000.index and ckpt-1000.data-*), a folder of '
      'checkpoints (the newest is used), or a model-zoo name',
  ]
  for (status, stdout, stderr), message in zip(cases, messages):
    assert status == 1 and not stdout
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f'error: {message}'), stderr
  assert sorted(os.listdir(exported.base)) == ['1']


def test_hostile_export_writes_the_effective_config_and_command_line(exported):
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.protos import config_pb2  # pylint: disable=g-import-not-at-top
  extra = exported.directory / export.ASSETS_EXTRA
  written = text_format.Parse((extra / export_cli.EXPERIMENT_FILE).read_text(),
                              config_pb2.ExperimentOptions())
  assert written == exported.config
  command = (extra / export_cli.COMMAND_LINE_FILE).read_text()
  assert '-m deeplab2_kmax.export' in command
  assert f'--checkpoint_path={exported.checkpoint_dir}' in command
  assert f'--output_path={exported.base}' in command


# ---- model zoo -> export / predict ----


ZOO_NAME = 'kmax_resnet50_coco_train'


def test_hostile_zoo_name_or_converted_folder_as_checkpoint_path(exported, tmp_path,
                                                                 monkeypatch):
  """A model-zoo name resolves to the cached download (DeepLab2's layout, converted in memory)
  without touching the network, and predicts as the export of the same weights does; a
  `model_zoo convert` output folder (one checkpoint, no state file) is a checkpoint path too."""
  from deeplab2_kmax.checkpoint import deeplab2_conversion  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model_zoo import download  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setattr(download, 'download',
                      lambda *args, **kwargs: pytest.fail('the cached entry was downloaded'))
  # What `python -m deeplab2_kmax.model_zoo download` leaves in the cache: DeepLab2's layout.
  model = exported.module.model
  cached = deeplab2_conversion.write_deeplab2_checkpoint(
      deeplab2_conversion.to_deeplab2(model),
      str(tmp_path / 'cache' / 'checkpoints' / ZOO_NAME / 'ckpt'))
  assert checkpoint_paths.resolve_checkpoint(ZOO_NAME) == cached

  predictor = predict.Predictor.from_checkpoint(exported.config, ZOO_NAME)
  assert predictor.source == f'{cached} (DeepLab2 layout, converted)'
  data = _png(7, (48, 70))
  got = predictor(data)
  want = predict.Predictor.from_saved_model(str(exported.directory))(data)
  for key in export.PREDICTION_KEYS + export.SEGMENT_KEYS:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)

  report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(cached), model, source=cached)
  report.check()
  ours = deeplab2_conversion.write_our_checkpoint(report.values,
                                                  str(tmp_path / 'converted' / 'ckpt'))
  assert checkpoint_paths.resolve_checkpoint(str(tmp_path / 'converted')) == ours

  with pytest.raises(checkpoint_paths.CheckpointPathError,
                     match=f'close to it: {ZOO_NAME}.*model-zoo name'):
    checkpoint_paths.resolve_checkpoint(ZOO_NAME[:-1])
