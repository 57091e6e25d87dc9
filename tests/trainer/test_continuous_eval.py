"""continuous_eval: each checkpoint that appears in the model dir is evaluated (a results JSON
per checkpoint) until none arrives within continuous_eval_timeout, or until the final
training step's checkpoint has been evaluated."""

import json
import os
import shutil
import time

import tensorflow as tf

from deeplab2_kmax.trainer import evaluator as evaluator_lib
from deeplab2_kmax.trainer import runner

_TIMEOUT_S = 3


def _publish(source_dir, model_dir, step):
  """Copies checkpoint `step` into model_dir the way CheckpointManager writes it: data files
  first, then the `checkpoint` state file naming it."""
  for name in os.listdir(source_dir):
    if name.startswith(f'ckpt-{step}.'):
      shutil.copy(os.path.join(source_dir, name), model_dir)
  tf.compat.v1.train.update_checkpoint_state(model_dir, os.path.join(model_dir, f'ckpt-{step}'))


def test_continuous_eval_evaluates_new_checkpoints_and_stops_on_timeout(tiny, tmp_path):
  config = tiny(f'evaluator_options {{ continuous_eval_timeout: {_TIMEOUT_S} }} '
                'trainer_options { solver_options { training_number_of_steps: 100 } }')
  # Two checkpoints (steps 2 and 5, different weights) written aside by a model of this config.
  staging, model_dir = str(tmp_path / 'staging'), str(tmp_path / 'run')
  os.makedirs(model_dir)
  writer = runner.Experiment(config, 'eval', staging, log_fn=lambda _: None)
  writer.global_step.assign(2)
  writer.manager.save(checkpoint_number=2)
  for variable in writer.model.trainable_variables:
    variable.assign(variable * 0.5)
  writer.global_step.assign(5)
  writer.manager.save(checkpoint_number=5)
  _publish(staging, model_dir, 2)

  lines, evaluated_at = [], {}

  def log(line):
    # Called with each metrics table: once step 2's is printed, the evaluator is about to
    # wait for a newer checkpoint, so step 5 appears while it waits, as from a trainer.
    lines.append(line)
    for step in (2, 5):
      if line.startswith(f'[eval] step {step}:'):
        evaluated_at[step] = time.monotonic()
        if step == 2:
          _publish(staging, model_dir, 5)

  results = runner.Experiment(config, 'continuous_eval', model_dir, log_fn=log).run()
  finished = time.monotonic()
  for step in (2, 5):
    with open(evaluator_lib.results_path(model_dir, step)) as f:
      saved = json.load(f)
    assert saved['step'] == step and saved['num_images'] == 8
  assert results['step'] == 5
  # It returned because nothing newer came within the timeout, not before (checkpoints_iterator
  # polls once a second and gives up when the next poll would pass the timeout).
  assert finished - evaluated_at[5] >= _TIMEOUT_S - 1
  assert any(f'within {_TIMEOUT_S} s; stopping' in line for line in lines)
  results_dir = os.path.join(model_dir, evaluator_lib.RESULTS_DIR)
  assert sorted(f for f in os.listdir(results_dir) if f.endswith('.json')) == [
      'results-00000002.json', 'results-00000005.json']

  # With a 5-step schedule, step 5's checkpoint is the last: it stops without waiting.
  final = tiny('evaluator_options { continuous_eval_timeout: 600 } '
               'trainer_options { solver_options { training_number_of_steps: 5 } }')
  lines = []
  start = time.monotonic()
  again = runner.Experiment(final, 'continuous_eval', model_dir, log_fn=lines.append).run()
  assert again['step'] == 5 and time.monotonic() - start < 300
  assert any('evaluated the final step 5; stopping' in line for line in lines)
