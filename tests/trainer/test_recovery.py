"""Blow-up recovery (trainer_options.loss_upper_bound, recovery_max_trials) with planted bad
batches: a batch whose images are NaN (a non-finite loss) is recovered from (the last
all-finite checkpoint is restored, the batches read since it are skipped, training reaches its
final step with finite weights), and a loss above the bound after the last allowed recovery
stops training with a message naming the step, the loss, the bound and the recoveries.

One Experiment serves both scenarios (the step is traced once: about 30 s on 2 busy cores);
the bound is a variable of the trainer, set between them.
"""

import json
import re

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.config import loader
from deeplab2_kmax.data.input import pipeline as pipeline_lib
from deeplab2_kmax.trainer import controller as controller_lib
from deeplab2_kmax.trainer import runner
from deeplab2_kmax.trainer import trainer as trainer_lib
from tests.trainer.conftest import SYNTHETIC_CONFIG

# Batches are numbered from 0 in the order the training iterator reads them: batch 2 is the
# one of step 3 (ckpt-2 is the last checkpoint before it).
NAN_BATCH = 2
OVERRIDE = ('trainer_options { steps_per_loop: 1 save_summaries_steps: 1 save_checkpoints_steps: 2 '
            'recovery_max_trials: 2 solver_options { training_number_of_steps: 6 } }')


def _plant_nan_batch(experiment, config, index):
  """Replaces the trainer's data by the same batches, batch `index` with NaN images."""
  pipeline = pipeline_lib.InputPipeline(config.train_dataset_options, is_training=True,
                                        descriptor=experiment.descriptor)

  def dataset_fn(input_context):
    def poison(position, batch):
      batch = dict(batch)
      image = batch[common.IMAGE]
      batch[common.IMAGE] = tf.where(tf.equal(position, index), image * np.nan, image)
      return batch
    return pipeline.dataset(input_context).enumerate().map(poison)

  experiment.trainer.train_dataset = experiment.strategy.distribute_datasets_from_function(
      dataset_fn)


def _records(model_dir):
  with open(model_dir / controller_lib.METRICS_FILE) as f:
    return [json.loads(line) for line in f]


def test_recovery_skips_a_nan_batch_then_stops_after_the_last_trial(tiny, tmp_path):
  config = tiny(OVERRIDE)
  lines = []
  experiment = runner.Experiment(config, 'train', str(tmp_path), log_fn=lines.append)
  _plant_nan_batch(experiment, config, NAN_BATCH)
  experiment.run()

  # A fresh run with recovery saves its start step; the NaN batch is step 3's.
  assert '[train] saved ckpt-0 (start step: blow-up recovery returns to it until a later ' \
         'checkpoint is written)' in lines
  recovery = [line for line in lines if line.startswith('[train] recovery')]
  assert recovery == [
      '[train] recovery 1/2: non-finite (NaN/Inf) loss at step 3 (its update was not applied); '
      'restored ckpt-2 (step 2) and skipped the 1 batch read since it (step 3 of the '
      'interrupted loop); training goes on from step 2.']
  assert int(experiment.global_step.numpy()) == 6
  assert all(np.all(np.isfinite(v.numpy())) for v in experiment.model.weights)
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-6')
  records = _records(tmp_path)
  trained = [(r['first_step'], r['step']) for r in records if r['mode'] == 'train']
  # Step 3 blew up (no train record); after the recovery steps 3..6 are trained with the
  # batches that follow the bad one.
  assert trained == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]
  recoveries = [r for r in records if r.pop('wall_time') and r['mode'] == 'recovery']
  assert recoveries == [{'mode': 'recovery', 'step': 2, 'bad_step': 3, 'loss': None,
                         'restored_step': 2, 'reached_step': 3, 'skipped_batches': 1,
                         'trial': 1}]

  # Every loss from now on is above the bound: step 7 blows up, recovery 2/2 returns to
  # ckpt-6, step 7 blows up again and training stops.
  experiment.trainer.loss_upper_bound.assign(1.0)
  with pytest.raises(trainer_lib.LossAboveBoundError) as raised:
    experiment.controller.train(10)
  message = str(raised.value)
  assert re.fullmatch(
      r'loss (\S+) at step 7 is above trainer_options.loss_upper_bound \(1\); training stopped '
      r'and the update was not applied \(lower solver_options.base_learning_rate or enable '
      r'use_gradient_clipping, or raise loss_upper_bound if such losses are normal for this '
      r'run\)\. This was the blow-up after 2 recoveries \(trainer_options.recovery_max_trials: '
      r'2\)\. The last checkpoint whose variables are all finite is '
      + re.escape(str(tmp_path / 'ckpt-6')) + r' \(step 6\)\.', message), message
  assert float(message.split()[1]) > 1.0
  assert lines[-1].startswith('[train] recovery 2/2: loss ')
  assert 'above trainer_options.loss_upper_bound at step 7' in lines[-1]
  assert raised.value.step == 7 and raised.value.loss > 1.0


@pytest.mark.parametrize('override, expected', [
    ('trainer_options { loss_upper_bound: -1 }',
     'trainer_options.loss_upper_bound: -1 must be finite and >= 0 (0: no bound, only a NaN/Inf '
     'loss counts as a blow-up); set it well above the losses of a healthy run'),
    ('trainer_options { loss_upper_bound: inf }', 'trainer_options.loss_upper_bound: inf must be'),
    ('trainer_options { recovery_max_trials: -2 }',
     'trainer_options.recovery_max_trials: -2 must be >= 0 (0: no recovery, a blow-up stops '
     'training)'),
])
def test_recovery_options_are_validated_naming_file_field_and_value(synthetic_data_dir,
                                                                    override, expected):
  import os  # pylint: disable=g-import-not-at-top
  os.environ['SYNTHETIC_DATA_DIR'] = str(synthetic_data_dir)
  with pytest.raises(loader.ConfigError) as raised:
    loader.load_config(SYNTHETIC_CONFIG, [override])
  message = str(raised.value)
  assert message.startswith('--config_override[0]:1: '), message
  assert expected in message


def test_recovery_defaults_are_off():
  from deeplab2_kmax.protos import trainer_pb2  # pylint: disable=g-import-not-at-top
  options = trainer_pb2.TrainerOptions()
  assert options.loss_upper_bound == 0 and options.recovery_max_trials == 0
