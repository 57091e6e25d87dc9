"""A MaX-DeepLab model exports, predicts and evaluates like kMaX (issue 16): a tiny MaX model of
the synthetic MaX demo config, saved as a runner checkpoint, is exported by the command line;
its serving_default signature equals the in-framework model + pixel-wise post-processor (ids
exactly, scores to 1e-5); `predict` writes its panoptic PNGs and overlays; the evaluator runs
on the checkpoint with the pixel-wise post-processing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from tests.conftest import REPO_ROOT
from tests.export.conftest import assert_serving_equals_framework
from tests.export.conftest import sample_images
from tests.export.conftest import sharpen_max_head

MAX_DEMO_CONFIG = (REPO_ROOT / 'configs' / 'synthetic' /
                   'max_deeplab_s_os16_synthetic_demo.textproto')

# The tiny MaX-DeepLab-S of tests/model/test_max_model.py on 65x65 crops; the evaluator keeps
# every slot and segment so that the sharpened head's predictions show several segments.
TINY_MAX_OVERRIDE = '''
model_options {
  backbone { backbone_width_multiplier: 0.0625 stem_width_multiplier: 0.25
             backbone_layer_multiplier: 0.34 }
  decoder { decoder_channels: 16 aspp_channels: 16 }
  max_deeplab {
    num_mask_slots: 6 max_num_mask_slots: 6
    pixel_space_head { output_channels: 8 head_channels: 16 }
    auxiliary_low_level { feature_key: "res3" channels_project: 8 }
    auxiliary_low_level { feature_key: "res2" channels_project: 4 }
    auxiliary_semantic_head { head_channels: 16 }
    dual_path { memory_channels: 16 base_transformer_expansion: 0.125
                transformer_num_heads: 2 transformer_ffn_channels: 32
                global_feed_forward_network_channels: 16 }
  }
}
train_dataset_options { crop_size: [65, 65] min_resize_value: 65 max_resize_value: 65 }
eval_dataset_options { crop_size: [65, 65] min_resize_value: 65 max_resize_value: 65 }
evaluator_options {
  transformer_class_confidence_threshold: 0.0 pixel_confidence_threshold: 0.0
  thing_area_limit: 0 stuff_area_limit: 0
}
'''


@pytest.fixture(scope='module')
def exported_max(tmp_path_factory, synthetic_data_dir):
  """(config, module, checkpoint dir, SavedModel dir, loaded SavedModel) of the tiny MaX."""
  import keras  # pylint: disable=g-import-not-at-top
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import export  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.checkpoint import layout as checkpoint_layout  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('export_max')
  config = loader.load_config(str(MAX_DEMO_CONFIG), [TINY_MAX_OVERRIDE],
                              environ={'SYNTHETIC_DATA_DIR': str(synthetic_data_dir)})
  assert config.model_options.WhichOneof('meta_architecture') == common.META_MAX_DEEPLAB
  keras.utils.set_random_seed(5)
  module = export.build_serving_module(config)
  sharpen_max_head(module.model)
  step = tf.Variable(7, dtype=tf.int64)
  checkpoint = checkpoint_layout.make_checkpoint(module.model, [], step)
  tf.train.CheckpointManager(checkpoint, str(root / 'model'), max_to_keep=1).save(7)
  config_file = root / 'config.textproto'
  config_file.write_text(text_format.MessageToString(config))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab2_kmax.export', f'--config_file={config_file}',
       f'--checkpoint_path={root / "model"}', f'--output_path={root / "serving"}'],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  directory = root / 'serving' / '1'
  return config, module, root / 'model', directory, tf.saved_model.load(str(directory))


def test_max_module_post_processes_pixelwise(exported_max):
  _, module, _, _, _ = exported_max
  assert module.model.name == common.META_MAX_DEEPLAB
  mode = module.post_processor._mode  # pylint: disable=protected-access
  assert mode == common.POST_PROCESSING_PIXELWISE


@pytest.mark.parametrize('shape', [(1, 65, 65), (2, 48, 80)])
def test_max_serving_default_equals_in_framework(exported_max, shape):
  _, module, _, _, loaded = exported_max
  images = sample_images(sum(shape) + 2, shape)
  assert_serving_equals_framework(loaded, module, images, shape)


def test_max_predict_writes_panoptic_pngs_and_overlays(exported_max, tmp_path):
  from deeplab2_kmax import predict  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.formats import coco_panoptic  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.formats import png_encoding  # pylint: disable=g-import-not-at-top
  config, _, checkpoint_dir, directory, loaded = exported_max
  folder = tmp_path / 'images'
  folder.mkdir()
  shapes = {'a.png': (48, 70), 'b.png': (65, 65)}
  for index, (name, shape) in enumerate(shapes.items()):
    (folder / name).write_bytes(tf.io.encode_png(sample_images(40 + index, shape)).numpy())
  predictor = predict.Predictor.from_saved_model(str(directory))
  annotations = predict.predict_files(predictor, predict.resolve_inputs(str(folder / '*')),
                                      str(tmp_path / 'out'), show_progress=False)
  assert [a['file_name'] for a in annotations] == ['a.png', 'b.png']
  for name, shape in shapes.items():
    stem = name.split('.')[0]
    want = loaded.signatures['image_bytes'](
        image_bytes=tf.constant([(folder / name).read_bytes()]))
    want_panoptic = want[common.PRED_PANOPTIC].numpy()[0]
    ids = coco_panoptic.read_panoptic_png(str(tmp_path / 'out' / 'panoptic' / f'{stem}.png'))
    assert ids.shape == shape
    info = json.loads((tmp_path / 'out' / 'segments' / f'{stem}.json').read_text())
    decoded = np.zeros(shape, np.int64)
    for segment in info['segments_info']:
      decoded[ids == segment['id']] = segment['panoptic_label']
    np.testing.assert_array_equal(decoded, want_panoptic)
    overlay = png_encoding.read_png(str(tmp_path / 'out' / 'overlay' / f'{stem}.png'))
    assert overlay.shape[0] >= predict.MIN_OVERLAY_HEIGHT and overlay.shape[1] > shape[1]
  # The checkpoint predictor (the runner's checkpoint, no SavedModel) agrees.
  data = (folder / 'a.png').read_bytes()
  got = predict.Predictor.from_checkpoint(config, str(checkpoint_dir))(data)
  np.testing.assert_array_equal(got[common.PRED_PANOPTIC],
                                predictor(data)[common.PRED_PANOPTIC])


def test_max_evaluator_runs_pixelwise_on_the_checkpoint(exported_max, tmp_path):
  # pylint: disable=g-import-not-at-top
  import shutil
  from deeplab2_kmax.trainer import evaluator as evaluator_lib
  from deeplab2_kmax.trainer import runner
  # pylint: enable=g-import-not-at-top
  config, _, checkpoint_dir, _, _ = exported_max
  model_dir = tmp_path / 'run'
  shutil.copytree(checkpoint_dir, model_dir)
  lines = []
  experiment = runner.Experiment(config, 'eval', str(model_dir), log_fn=lines.append)
  mode = experiment.evaluator.post_processor._mode  # pylint: disable=protected-access
  assert mode == common.POST_PROCESSING_PIXELWISE
  results = experiment.run()
  assert results['step'] == 7
  with open(evaluator_lib.results_path(str(model_dir), 7)) as f:
    saved = json.load(f)
  assert saved['num_images'] == 8
  for group in (common.PQ_ALL, common.PQ_THINGS, common.PQ_STUFF):
    assert 0.0 <= saved['panoptic_quality'][group][common.PQ] <= 1.0
