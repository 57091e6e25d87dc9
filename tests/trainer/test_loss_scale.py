"""mixed_float16 training state on one device, tiny synthetic config: gradient clipping sees the
unscaled gradients; the dynamic loss scale and its good-step counter survive a checkpoint
restore; a checkpoint written before the scale was saved still restores, with a fresh scale.

One training run (module fixture) serves all three: a step whose scaled gradients overflow,
then a clipped SGD step, then a checkpoint of the runner's CheckpointManager."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.checkpoint import layout as checkpoint_layout
from deeplab2_kmax.trainer import checkpoints
from deeplab2_kmax.trainer import loss_scale as loss_scale_lib
from deeplab2_kmax.trainer import runner
from deeplab2_kmax.trainer import schedule as schedule_lib
from tests.trainer import distributed_helper

# Plain SGD (momentum 0), so an applied step moves the weights by exactly -rate * gradient;
# clipping at a global norm of 1, far below this untrained model's gradient norm (its loss is
# ~7000), so the clip is active; no warm-up, so the rate is not 0.
OVERRIDE = '''
trainer_options {
  mixed_precision_policy: "mixed_float16" steps_per_loop: 1
  solver_options { optimizer: "sgd" sgd_momentum: 0.0 base_learning_rate: 1.0 warmup_steps: 0
                   use_gradient_clipping: true clip_gradient_norm: 1.0 }
}
'''


def _train_variables(experiment):
  return [v.numpy().astype(np.float64) for v in experiment.trainer.train_variables]


@pytest.fixture(scope='module')
def run(synthetic_data_dir, tmp_path_factory):
  from tests.trainer.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(synthetic_data_dir, OVERRIDE)
  model_dir = tmp_path_factory.mktemp('fp16_run')
  experiment = runner.Experiment(config, 'train', str(model_dir), log_fn=lambda _: None)
  trainer = experiment.trainer
  # Step 0 overflows: skipped, the scale halves and the counter restarts.
  trainer.loss_scale.assign(distributed_helper.OVERFLOWING_SCALE)
  trainer.train(tf.constant(1, tf.int32))
  after_overflow = (float(trainer.loss_scale.numpy()), int(trainer.good_steps.numpy()))
  # Step 1 is applied at 2^12 and clipped.
  trainer.loss_scale.assign(distributed_helper.SAFE_SCALE)
  before = _train_variables(experiment)
  trainer.train(tf.constant(1, tf.int32))
  after = _train_variables(experiment)
  saved = experiment.manager.save(checkpoint_number=experiment.global_step)
  return {'config': config, 'model_dir': model_dir, 'experiment': experiment,
          'after_overflow': after_overflow, 'update': [a - b for a, b in zip(after, before)],
          'saved': saved, 'tmp': tmp_path_factory}


def test_gradient_clipping_applies_to_the_unscaled_gradients(run):
  solver = run['config'].trainer_options.solver_options
  rate = float(schedule_lib.LearningRateSchedule.from_solver(solver)(1))
  assert 0.5 < rate < 1.0
  update_norm = np.sqrt(sum(np.sum(u ** 2) for u in run['update']))
  # Clipped unscaled gradients have norm clip_gradient_norm, so SGD moves the weights by
  # rate * 1.0. Clipping the scaled gradients instead would move them 2^12 times less; no
  # clipping would move them by the full gradient's norm (> 100 here).
  assert update_norm == pytest.approx(rate * solver.clip_gradient_norm, rel=1e-4)


def test_loss_scale_and_counter_resume_from_the_checkpoint(run):
  experiment = run['experiment']
  assert run['after_overflow'] == (distributed_helper.OVERFLOWING_SCALE / 2, 0)
  scale, good_steps = float(experiment.trainer.loss_scale.numpy()), int(
      experiment.trainer.good_steps.numpy())
  assert (scale, good_steps) == (distributed_helper.SAFE_SCALE, 1)
  assert run['saved'].endswith('ckpt-2')
  reader = tf.train.load_checkpoint(run['saved'])
  assert reader.get_tensor('loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE') == scale
  assert reader.get_tensor('loss_scale/good_steps/.ATTRIBUTES/VARIABLE_VALUE') == good_steps

  lines = []
  resumed = runner.Experiment(run['config'], 'train', str(run['model_dir']),
                              log_fn=lines.append)
  assert int(resumed.global_step.numpy()) == 2
  assert float(resumed.trainer.loss_scale.numpy()) == scale
  assert int(resumed.trainer.good_steps.numpy()) == good_steps
  # One of the two steps was skipped: the optimizer counted one update.
  assert int(resumed.groups[0].optimizer.iterations.numpy()) == 1
  assert not any('loss scale' in line for line in lines)


def test_checkpoint_without_loss_scale_restores_with_a_fresh_scale(run):
  experiment = run['experiment']
  old_dir = run['tmp'].mktemp('old_checkpoint')
  # What the runner wrote before the scale was checkpointed.
  old = checkpoint_layout.make_checkpoint(experiment.model, experiment.groups,
                                          experiment.global_step)
  path = tf.train.CheckpointManager(old, str(old_dir), max_to_keep=1,
                                    checkpoint_name=checkpoints.CHECKPOINT_PREFIX).save(
                                        checkpoint_number=experiment.global_step)
  assert not any(name.startswith('loss_scale/') for name, _ in tf.train.list_variables(path))

  lines = []
  resumed = runner.Experiment(run['config'], 'train', str(old_dir), log_fn=lines.append)
  assert int(resumed.global_step.numpy()) == 2
  assert int(resumed.groups[0].optimizer.iterations.numpy()) == 1
  np.testing.assert_array_equal(resumed.trainer.train_variables[0].numpy(),
                                experiment.trainer.train_variables[0].numpy())
  assert float(resumed.trainer.loss_scale.numpy()) == loss_scale_lib.INITIAL_LOSS_SCALE
  assert int(resumed.trainer.good_steps.numpy()) == 0
  assert any(path in line and 'no dynamic loss scale' in line and 'starts afresh at 32768'
             in line for line in lines), lines
