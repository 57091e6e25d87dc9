"""Tiny experiment configs over the session's synthetic dataset, for runner tests."""

import contextlib
import io
import os

import pytest

from deeplab2_kmax.config import loader
from deeplab2_kmax.trainer import runner
from tests.conftest import REPO_ROOT

SYNTHETIC_CONFIG = str(REPO_ROOT / 'configs' / 'synthetic' / 'kmax_r50_os32_synthetic.textproto')

# A small kMaX on 33x33 crops: 4 cluster centers, one block per decoder stage, so a step
# takes well under a second on one CPU core.
TINY_OVERRIDE = '''
model_options {
  backbone { backbone_width_multiplier: 0.125 }
  decoder { decoder_channels: 16 aspp_channels: 16 }
  kmax {
    num_cluster_centers: 4
    pixel_space_head { output_channels: 16 head_channels: 16 }
    auxiliary_semantic_head { head_channels: 16 }
    pixel_decoder { dims: [32, 16, 16, 16] }
    transformer_decoder { channels: 16 num_heads: 2 key_channels: 8 value_channels: 16
                          ffn_channels: 32 num_blocks: [1, 0, 0] }
    instance_discrimination_sample_k: 64
  }
}
trainer_options {
  save_checkpoints_steps: 2 save_summaries_steps: 2 steps_per_loop: 2
  solver_options { training_number_of_steps: 4 warmup_steps: 1 }
}
train_dataset_options {
  batch_size: 2 crop_size: [33, 33] min_resize_value: 33 max_resize_value: 33
  deterministic: true seed: 5 shuffle_buffer_size: 8 cycle_length: 2
}
eval_dataset_options {
  batch_size: 4 crop_size: [33, 33] min_resize_value: 33 max_resize_value: 33
}
evaluator_options { eval_interval: 4 }
'''


def tiny_config(data_dir, *overrides):
  """The synthetic demo config shrunk by TINY_OVERRIDE (and `overrides`) on `data_dir`."""
  os.environ['SYNTHETIC_DATA_DIR'] = str(data_dir)
  return loader.load_config(SYNTHETIC_CONFIG, [TINY_OVERRIDE, *overrides])


@pytest.fixture
def tiny(synthetic_data_dir):
  return lambda *overrides: tiny_config(synthetic_data_dir, *overrides)


@pytest.fixture(scope='session')
def tiny_train_and_eval_run(synthetic_data_dir, tmp_path_factory):
  """One train_and_eval run of the tiny config, shared by the tests that read its outputs:
  4 steps of one loop each, a checkpoint every 2 steps, eval and training images at step 4.
  A `ckpt-3_temp/` folder (an interrupted checkpoint write) is planted in model_dir first.

  Returns a dict: experiment, config, model_dir (pathlib.Path), results (of the last eval),
  stdout (everything the run printed) and planted_temp (the planted folder's path).
  """
  config = tiny_config(synthetic_data_dir, 'trainer_options { save_images_steps: 4 '
                       'steps_per_loop: 1 }')
  model_dir = tmp_path_factory.mktemp('tiny_train_and_eval')
  planted = model_dir / 'ckpt-3_temp'
  planted.mkdir()
  (planted / 'part-00000-of-00001.data-00000-of-00001').write_bytes(b'partial')
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    experiment = runner.Experiment(config, 'train_and_eval', str(model_dir),
                                   command_line=['python', '-m', 'deeplab2_kmax.train',
                                                 f'--model_dir={model_dir}'])
    results = experiment.run()
  return {'experiment': experiment, 'config': config, 'model_dir': model_dir,
          'results': results, 'stdout': stdout.getvalue(), 'planted_temp': planted}
