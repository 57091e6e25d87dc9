"""A DeepLab2-layout checkpoint, converted by the model zoo, exported in all three formats by
the command line, and the formats against each other (issue #17).

The model is kMaX with the Axial-ResNet-50 encoder (configs/coco/kmax_deeplab/
kmax_meta_axial_r50_os32.textproto, DeepLab2's kmax_maxs_gelu_coco) at crop 65, so axial
attention with its relative-position gathers (in the encoder and the pixel decoder), the part of
DeepLab2's models that ONNX converters failed on (deeplab2 #147), goes through ONNX and LiteRT.
Its random weights are written in DeepLab2's checkpoint layout (what DeepLab2 publishes),
converted as `python -m deeplab2_kmax.model_zoo convert` does, and exported with
`python -m deeplab2_kmax.export --format=saved_model,onnx,litert`, as a user would.

Two sizes: at 1/16 width (tests/export/conftest.py's TINY_OVERRIDE) in CI, about a minute; at
full width and depth (`slow`: 11 minutes on 2 loaded cores, most of it in the converters).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from deeplab2_kmax import common
from tests.conftest import REPO_ROOT
from tests.export.conftest import TINY_OVERRIDE
from tests.export.conftest import sample_images
from tests.export.conftest import sharpen_max_head

pytest.importorskip('onnxruntime', reason='the [onnx] extra is not installed '
                    '(pip install -e ".[test]")')
pytest.importorskip('tf2onnx', reason='the [onnx] extra is not installed '
                    '(pip install -e ".[test]")')

AXIAL_R50_CONFIG = (REPO_ROOT / 'configs' / 'coco' / 'kmax_deeplab' /
                    'kmax_meta_axial_r50_os32.textproto')
CROP_65 = '''
model_options { initial_checkpoint: "" }
train_dataset_options { crop_size: [65, 65] min_resize_value: 65 max_resize_value: 65 }
eval_dataset_options { crop_size: [65, 65] min_resize_value: 65 max_resize_value: 65 }
export_options { include_raw_outputs: true }
'''
RAW_KEYS = (common.PRED_PIXEL_SPACE_MASK_LOGITS, common.PRED_TRANSFORMER_CLASS_LOGITS,
            common.PRED_SEMANTIC_LOGITS)


def _run(args, timeout=1800):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  result = subprocess.run([sys.executable, '-m'] + args, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


# The tiny override without its dataset lines (CROP_65 sets the crops).
TINY_MODEL = TINY_OVERRIDE[:TINY_OVERRIDE.index('train_dataset_options')]


@pytest.fixture(scope='module', params=['tiny', pytest.param('full', marks=pytest.mark.slow)])
def converted_export(request, tmp_path_factory):
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import runtimes  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.checkpoint import deeplab2_conversion  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('converted')
  overrides = [CROP_65] + ([TINY_MODEL] if request.param == 'tiny' else [])
  config = loader.load_config(str(AXIAL_R50_CONFIG), overrides,
                              environ=loader.PlaceholderEnvironment())
  assert config.model_options.backbone.name == 'axial_resnet50'

  config_file = root / 'config.textproto'
  config_file.write_text(text_format.MessageToString(config))
  keras.utils.set_random_seed(5)
  model = builder.build_model(config, crop_size=(65, 65))
  sharpen_max_head(model)
  deeplab2_checkpoint = deeplab2_conversion.write_deeplab2_checkpoint(deeplab2_conversion.to_deeplab2(model),
                                                          str(root / 'deeplab2' / 'ckpt'))
  # What `python -m deeplab2_kmax.model_zoo convert --from=... --output=...` runs (its command
  # line is tested in tests/model/test_deeplab2_conversion.py), in process: a subprocess would
  # build the model again.
  report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(deeplab2_checkpoint), model,
                                 source=deeplab2_checkpoint)
  report.check()
  ours = deeplab2_conversion.write_our_checkpoint(report.values, str(root / 'ours' / 'ckpt'))
  export_log = _run(['deeplab2_kmax.export', f'--config_file={config_file}',
                     f'--checkpoint_path={ours}', f'--output_path={root / "serving"}',
                     '--format=saved_model,onnx,litert'])
  directory = root / 'serving' / '1'
  return {'model': model, 'export_log': export_log,
          'saved_model': runtimes.load(str(root / 'serving')),
          'onnx': runtimes.load(str(directory / 'model.onnx')),
          'litert': runtimes.load(str(directory / 'model.tflite'))}


def test_export_command_writes_every_format(converted_export):
  log = converted_export['export_log']
  for name in ('saved_model', 'onnx', 'litert'):
    assert f'({name}:' in log, log
  assert 'model.onnx' in log and 'model.tflite' in log


def test_saved_model_holds_the_converted_weights(converted_export):
  """The SavedModel's raw logits equal the model whose weights were written in DeepLab2's
  layout (a 65x65 image is its own crop: no resize, no padding)."""
  image = sample_images(0, (1, 65, 65))
  got = converted_export['saved_model'](image)
  want = converted_export['model'](image.astype(np.float32), training=False)
  for key in RAW_KEYS:
    want_value = np.asarray(want[key])
    scale = 1.0 + np.abs(want_value).max()
    np.testing.assert_allclose(got[key], want_value, rtol=0, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize('file_format', ['onnx', 'litert'])
def test_axial_r50_format_matches_saved_model(converted_export, file_format):
  for seed, shape in enumerate(((65, 65), (80, 50))):
    images = sample_images(seed, (1,) + shape)
    want = converted_export['saved_model'](images)
    got = converted_export[file_format](images)
    for key in RAW_KEYS:
      scale = 1.0 + np.abs(want[key]).max()
      np.testing.assert_allclose(got[key], want[key], rtol=0, atol=2e-4 * scale,
                                 err_msg=f'{file_format} {shape} {key}')
    for key in (common.PRED_PANOPTIC, common.PRED_SEMANTIC):
      assert np.mean(got[key] == want[key]) >= 0.999, (file_format, shape, key)
    np.testing.assert_array_equal(got[common.PRED_SEGMENT_CLASSES],
                                  want[common.PRED_SEGMENT_CLASSES])
