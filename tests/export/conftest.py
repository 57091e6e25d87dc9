"""One tiny exported model per test session, shared by the export, C-runtime and predict tests.

The model is a kMaX at 1/16 width on 65x65 crops whose MaX-head weights are sharpened (large
mask-normalisation scale, large class kernels, void bias cancelled) so that its panoptic
predictions hold several segments of several classes instead of one void or stuff region: parity
on a prediction with one segment would prove little. It is saved as a runner checkpoint and
exported by the command line (`python -m deeplab2_kmax.export`), as a user would.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

DEMO_CONFIG = str(REPO_ROOT / 'configs' / 'synthetic' / 'kmax_r50_os32_synthetic_demo.textproto')

TINY_OVERRIDE = '''
model_options {
  backbone { backbone_width_multiplier: 0.0625 stem_width_multiplier: 0.25
             backbone_layer_multiplier: 0.34 }
  decoder { decoder_channels: 16 aspp_channels: 16 }
  kmax {
    num_cluster_centers: 6
    pixel_space_head { output_channels: 8 head_channels: 16 }
    auxiliary_low_level { feature_key: "res3" channels_project: 8 }
    auxiliary_low_level { feature_key: "res2" channels_project: 4 }
    auxiliary_semantic_head { head_channels: 16 }
    pixel_decoder { dims: [16, 8, 8, 4] }
    transformer_decoder { channels: 16 num_heads: 2 key_channels: 8 value_channels: 16
                          ffn_channels: 32 num_blocks: [1, 0, 0] }
  }
}
train_dataset_options { crop_size: [65, 65] min_resize_value: 65 max_resize_value: 65 }
eval_dataset_options { crop_size: [65, 65] min_resize_value: 65 max_resize_value: 65 }
evaluator_options {
  maskwise_postprocessing { transformer_class_confidence_threshold_thing: 0.0
                            transformer_class_confidence_threshold_stuff: 0.0 }
  thing_area_limit: 0 stuff_area_limit: 0
}
'''


def tiny_export_config(data_dir):
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  return loader.load_config(DEMO_CONFIG, [TINY_OVERRIDE],
                            environ={'SYNTHETIC_DATA_DIR': str(data_dir)})


def sharpen_max_head(model, seed: int = 0):
  """Makes a freshly initialised model's predictions confident and varied (module docstring)."""
  rng = np.random.default_rng(seed)
  prefix = f'{model.name}/predictor/'
  for variable in model.variables:
    if not variable.path.startswith(prefix):
      continue
    if variable.path.endswith('pixel_space_mask_batch_norm/gamma'):
      variable.assign(np.full(variable.shape, 30.0, np.float32))
    elif variable.path.endswith('transformer_class_head/conv/bias'):
      bias = np.zeros(variable.shape, np.float32)
      bias[-1] = -8.0  # cancels the head's constant void bias
      variable.assign(bias)
    elif variable.path.endswith('transformer_class_head/conv/kernel'):
      kernel = rng.normal(0.0, 30.0, variable.shape).astype(np.float32)
      kernel[..., -1] = 0.0
      variable.assign(kernel)


def sample_images(seed: int, shape) -> np.ndarray:
  """uint8 [*shape, 3] noise with a few flat rectangles (so masks have structure)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, tuple(shape) + (3,), dtype=np.uint8)
  height, width = shape[-2:]
  for _ in range(3):
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    images[..., top:top + height // 2, left:left + width // 2, :] = rng.integers(0, 256, 3)
  return images


_IN_FRAMEWORK_STEPS = {}


def in_framework(module, images) -> dict:
  """The evaluator's path on a list of uint8 images: the eval preprocessing, then model +
  post-processor in a tf.function (as Evaluator runs them with use_tf_function, the default).

  Returns numpy arrays like the signatures' outputs: [batch, max height, max width].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.input import preprocessing  # pylint: disable=g-import-not-at-top
  options = module.preprocess_options
  crops, resized = [], []
  for image in images:
    crop, _, size = preprocessing.preprocess_for_eval(
        tf.cast(image, tf.float32), None, options.crop_size, options.min_resize_value,
        options.max_resize_value, options.resize_factor, 0)
    crops.append(crop)
    resized.append(size)
  batch = {common.IMAGE: tf.stack(crops), common.RESIZED_SIZE: tf.stack(resized),
           common.GT_SIZE_RAW: tf.constant([image.shape[:2] for image in images], tf.int32)}
  if id(module) not in _IN_FRAMEWORK_STEPS:
    # Traced once per module for every batch size (the evaluator's batches are fixed).
    @tf.function(input_signature=[{
        common.IMAGE: tf.TensorSpec([None, *options.crop_size, 3], tf.float32),
        common.RESIZED_SIZE: tf.TensorSpec([None, 2], tf.int32),
        common.GT_SIZE_RAW: tf.TensorSpec([None, 2], tf.int32)}])
    def step(batch):
      return module.post_processor(module.model(batch[common.IMAGE], training=False), batch)
    _IN_FRAMEWORK_STEPS[id(module)] = step
  step = _IN_FRAMEWORK_STEPS[id(module)]
  return {k: v.numpy() for k, v in step(batch).items()}



def assert_serving_equals_framework(loaded, module, images, shape):
  """serving_default of the loaded SavedModel equals the model + post-processor in TF: ids
  exactly, scores to 1e-5, on the valid [height, width] region of `shape`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  got = {k: v.numpy() for k, v in loaded.signatures['serving_default'](
      images=tf.constant(images)).items()}
  want = in_framework(module, list(images))
  height, width = shape[1:]
  for key in (common.PRED_PANOPTIC, common.PRED_SEMANTIC, common.PRED_INSTANCE):
    np.testing.assert_array_equal(got[key], want[key][:, :height, :width], err_msg=key)
  for key in (common.PRED_INSTANCE_SCORES, common.PRED_SEMANTIC_SCORES):
    np.testing.assert_allclose(got[key], want[key][:, :height, :width], atol=1e-5, rtol=0,
                               err_msg=key)
  # Parity on a single void or stuff region would prove little.
  assert len(np.unique(got[common.PRED_PANOPTIC])) >= 2

def numpy_segments(panoptic, instance_scores, divisor: int, ignore_label: int):
  """(ids, classes, mean scores, areas) of the non-void segments, ids ascending."""
  ids, inverse, areas = np.unique(panoptic, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse.ravel(), weights=instance_scores.ravel().astype(np.float64))
  keep = ids // divisor != ignore_label
  return ids[keep], ids[keep] // divisor, (sums / areas)[keep], areas[keep]


@pytest.fixture(scope='session')
def exported(tmp_path_factory):
  """The tiny model in process and as a SavedModel written by the export command line."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import export  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.checkpoint import layout as checkpoint_layout
  root = tmp_path_factory.mktemp('export')
  config = tiny_export_config(root / 'data')
  keras.utils.set_random_seed(11)
  module = export.build_serving_module(config)
  sharpen_max_head(module.model)
  step = tf.Variable(123, dtype=tf.int64)
  checkpoint = checkpoint_layout.make_checkpoint(module.model, [], step)
  tf.train.CheckpointManager(checkpoint, str(root / 'model'), max_to_keep=1).save(123)
  config_file = root / 'config.textproto'
  config_file.write_text(text_format.MessageToString(config))
  base = root / 'serving'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab2_kmax.export', f'--config_file={config_file}',
       f'--checkpoint_path={root / "model"}', f'--output_path={base}'],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  directory = base / '1'
  return types.SimpleNamespace(config=config, config_file=config_file, module=module,
                               checkpoint_dir=root / 'model', base=base, directory=directory,
                               loaded=tf.saved_model.load(str(directory)), stdout=result.stdout,
                               root=root)


@pytest.fixture(scope='session')
def runtimes(exported, tmp_path_factory):
  """{format: runtime} of the tiny model written in every format, raw outputs included.

  One conversion per session (tf2onnx and the LiteRT converter take about a minute on 2 cores),
  shared by test_export_formats.py and test_workspace_snippets.py. The files are in one version
  folder: runtimes['onnx'].path, runtimes['litert'].path, runtimes['saved_model'].path.
  """
  pytest.importorskip('onnxruntime', reason='the [onnx] extra is not installed '
                      '(pip install -e ".[test]")')
  pytest.importorskip('tf2onnx', reason='the [onnx] extra is not installed '
                      '(pip install -e ".[test]")')
  from deeplab2_kmax import export  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import litert_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import onnx_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import runtimes as runtimes_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  module = export.ServingModule(exported.module.model, exported.module.post_processor,
                                exported.module.preprocess_options, exported.module.descriptor,
                                include_raw_outputs=True)
  base = tmp_path_factory.mktemp('formats')
  directory = saved_model.write(module, str(base), input_types=['image_tensor'])
  onnx_path = onnx_format.write(module, directory,
                                saved_model.descriptor_text(module.descriptor))
  litert_path = litert_format.write(module, directory)
  return {'saved_model': runtimes_lib.load(str(base)), 'onnx': runtimes_lib.load(onnx_path),
          'litert': runtimes_lib.load(litert_path)}
