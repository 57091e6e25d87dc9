"""MaX-DeepLab through the README's runner: tiny synthetic train_and_eval on the MaX demo config,
like CMT's and kMaX's runner tests."""

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
from tests.trainer.test_runner import _scalar_tags

MAX_CONFIG = str(REPO_ROOT / 'configs' / 'synthetic' /
                 'max_deeplab_s_os16_synthetic_demo.textproto')

# The tiny MaX-DeepLab-S of tests/model/test_max_model.py on 33x33 crops (as the kMaX runner
# test): 4 slots; stochastic depth (keep 0.8, linear) on so the training step traces the
# drop-path masks; the backbone at a tenth of the learning rate (DeepLab2's MaX recipe) so the
# two variable groups of the optimizer are exercised.
TINY_MAX_OVERRIDE = '''
model_options {
  backbone { backbone_width_multiplier: 0.0625 stem_width_multiplier: 0.25
             backbone_layer_multiplier: 0.34 drop_path_keep_prob: 0.8
             drop_path_schedule: "linear" }
  decoder { decoder_channels: 16 aspp_channels: 16 }
  max_deeplab {
    num_mask_slots: 4 max_num_mask_slots: 4
    pixel_space_head { output_channels: 16 head_channels: 16 }
    auxiliary_semantic_head { head_channels: 16 }
    dual_path { memory_channels: 16 base_transformer_expansion: 0.125
                transformer_num_heads: 2 transformer_ffn_channels: 32
                global_feed_forward_network_channels: 16 }
  }
}
trainer_options {
  save_checkpoints_steps: 2 save_summaries_steps: 2 steps_per_loop: 2
  solver_options { training_number_of_steps: 4 warmup_steps: 1
                   backbone_learning_rate_multiplier: 0.1 }
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


# 40 s on 2 cores at load ~1.8 (tracing the train and eval steps dominates): run by CI.
def test_max_trains_and_evaluates_through_the_runner(synthetic_data_dir, tmp_path):
  os.environ[common.ENV_SYNTHETIC_DATA_DIR] = str(synthetic_data_dir)
  config = loader.load_config(MAX_CONFIG, [TINY_MAX_OVERRIDE])
  assert config.model_options.WhichOneof('meta_architecture') == common.META_MAX_DEEPLAB
  assert config.evaluator_options.transformer_post_processing == 'pixelwise'
  lines = []
  experiment = runner.Experiment(config, 'train_and_eval', str(tmp_path), log_fn=lines.append)
  encoder = experiment.model.encoder
  start = {v.path: v.numpy().copy() for v in encoder.trainable_variables}
  results = experiment.run()
  assert experiment.model.name == common.META_MAX_DEEPLAB
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-4')
  with open(evaluator_lib.results_path(str(tmp_path), 4)) as f:
    saved = json.load(f)
  assert saved['num_images'] == 8 and results['step'] == 4
  for group in (common.PQ_ALL, common.PQ_THINGS, common.PQ_STUFF):
    assert 0.0 <= saved['panoptic_quality'][group][common.PQ] <= 1.0
  tags = _scalar_tags(tmp_path / 'train')
  assert {'losses/total_loss', 'losses/pq_style_loss_class_term',
          'losses/instance_discrimination_loss', 'losses/semantic_loss'} <= tags
  assert not [tag for tag in tags if tag.startswith('losses/aux_')]  # MaX: final output only
  logs = experiment.trainer.last_logs
  assert np.isfinite(logs['losses/total_loss'])
  # Both learning-rate groups trained: the backbone (stem) and the scratch memory moved.
  moved = {path for path, value in start.items()
           if not np.allclose(value, next(v for v in encoder.trainable_variables
                                          if v.path == path).numpy())}
  assert any('/memory_feature' in path for path in moved)
  assert any('/encoder/stem/' in path for path in moved)
