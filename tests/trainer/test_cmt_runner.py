"""CMT-DeepLab through the README's runner: tiny synthetic train_and_eval, like kMaX's test."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.config import loader
from deeplab2_kmax.trainer import evaluator as evaluator_lib
from deeplab2_kmax.trainer import runner
from tests.conftest import REPO_ROOT
from tests.trainer.conftest import TINY_OVERRIDE
from tests.trainer.test_runner import _scalar_tags

CMT_CONFIG = str(REPO_ROOT / 'configs' / 'synthetic' / 'cmt_r50_os32_synthetic_demo.textproto')


# About 3 min on the 2 cores at load ~3 (171 s measured; tracing the train step and evaluation
# dominates; 10 min measured at load average 9), so not in CI; the in-process CMT model tests
# (tests/model/test_cmt_model.py) cover the forward, loss and gradients.
@pytest.mark.slow
def test_cmt_trains_and_evaluates_through_the_runner(synthetic_data_dir, tmp_path):
  os.environ[common.ENV_SYNTHETIC_DATA_DIR] = str(synthetic_data_dir)
  # kMaX's tiny override, applied to the CMT member; two layers at stride 32 so that the
  # pixel update of the first reaches the second as well as the final features.
  override = TINY_OVERRIDE.replace('kmax {', 'cmt {').replace('num_blocks: [1, 0, 0]',
                                                            'num_blocks: [2, 0, 0]')
  config = loader.load_config(CMT_CONFIG, [override])
  assert config.model_options.WhichOneof('meta_architecture') == common.META_CMT
  lines = []
  experiment = runner.Experiment(config, 'train_and_eval', str(tmp_path), log_fn=lines.append)
  results = experiment.run()
  assert experiment.model.name == 'cmt_deeplab'
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-4')
  with open(evaluator_lib.results_path(str(tmp_path), 4)) as f:
    saved = json.load(f)
  assert saved['num_images'] == 8 and results['step'] == 4
  for group in (common.PQ_ALL, common.PQ_THINGS, common.PQ_STUFF):
    assert 0.0 <= saved['panoptic_quality'][group][common.PQ] <= 1.0
  tags = _scalar_tags(tmp_path / 'train')
  assert {'losses/total_loss', 'losses/aux_0reference_mask_loss',
          'losses/aux_1reference_mask_loss'} <= tags
  logs = experiment.trainer.last_logs
  assert np.isfinite(logs['losses/total_loss'])
  assert 0.0 < logs['losses/aux_1reference_mask_loss'] <= 1.0
