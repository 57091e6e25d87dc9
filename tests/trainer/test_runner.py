"""End to end on the tiny synthetic config: train -> checkpoints -> eval results JSON and
TensorBoard files; resume and NaN stop (slow: each traces another training step); the train.py
command line's error handling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.trainer import controller as controller_lib
from deeplab2_kmax.trainer import evaluator as evaluator_lib
from deeplab2_kmax.trainer import runner
from deeplab2_kmax.trainer import schedule as schedule_lib
from deeplab2_kmax.trainer import trainer as trainer_lib
from tests.conftest import REPO_ROOT


def _events(folder):
  return [f for f in os.listdir(folder) if f.startswith('events.out.tfevents')]


def _images(folder, tag):
  """{step: decoded uint8 image} of an image summary tag in the folder's event files."""
  images = {}
  for name in _events(folder):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
      for value in event.summary.value:
        if value.tag == tag:
          # tf.summary.image stores [width, height, png...] as a string tensor.
          png = tf.make_ndarray(value.tensor)[2]
          images[event.step] = tf.io.decode_png(png).numpy()
  return images


def _scalar_tags(folder):
  """Tags of every summary (scalars and images) in the folder's event files."""
  tags = set()
  for name in _events(folder):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
      for value in event.summary.value:
        tags.add(value.tag)
  return tags


def test_train_and_eval_writes_checkpoints_results_and_summaries(tiny_train_and_eval_run):
  run = tiny_train_and_eval_run
  experiment, config, tmp_path = run['experiment'], run['config'], run['model_dir']
  results = run['results']
  lines = run['stdout'].splitlines()
  # Checkpoints every 2 steps, the step counter saved with them.
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-4')
  assert os.path.exists(tmp_path / 'ckpt-2.index')
  assert int(experiment.global_step.numpy()) == 4
  # The results JSON of the evaluated step, over all 8 validation images.
  with open(evaluator_lib.results_path(str(tmp_path), 4)) as f:
    saved = json.load(f)
  assert saved['num_images'] == 8 and saved['step'] == 4
  for group in (common.PQ_ALL, common.PQ_THINGS, common.PQ_STUFF):
    assert 0.0 <= saved['panoptic_quality'][group][common.PQ] <= 1.0
  assert 0.0 <= saved['miou'][common.MIOU] <= 1.0
  assert 'AP' in saved['mask_ap']
  assert results['step'] == 4
  # Console lines: step, loss, images/s and ETA.
  train_lines = [l for l in lines if l.startswith('[train] step')]
  assert train_lines[0].startswith('[train] step 1/4 loss') and 'images/s' in train_lines[0]
  assert 'ETA' in train_lines[0]
  assert any('PQ' in l for l in lines) and any(l.startswith('Things') for l in lines)
  # TensorBoard: loss terms, learning rate, throughput; eval metrics.
  tags = _scalar_tags(tmp_path / 'train')
  assert {'losses/total_loss', 'losses/pq_style_loss_class_term', 'learning_rate',
          'images_per_second'} <= tags
  assert {'PQ/All', 'SQ/Things', 'RQ/Stuff', 'mIoU', 'panoptic/sample_0',
          'panoptic/sample_3'} <= _scalar_tags(tmp_path / 'eval')
  # Training images at step 4 only (every 4 steps): input | ground truth | prediction, 33x33
  # each with 2-pixel white gaps, for the first 2 images of the batch.
  panels = _images(tmp_path / 'train', 'panoptic/sample_1')
  assert list(panels) == [4] and panels[4].shape == (33, 3 * 33 + 2 * 2, 3)
  assert np.all(panels[4][:, 33:35] == 255) and np.all(panels[4][:, 68:70] == 255)
  assert 'panoptic/sample_2' not in tags
  logs = experiment.trainer.last_logs
  expected_lr = schedule_lib.LearningRateSchedule.from_solver(
      config.trainer_options.solver_options)(4)
  assert logs['learning_rate'] == pytest.approx(float(expected_lr), rel=1e-6)
  assert np.isfinite(logs['losses/total_loss'])


@pytest.mark.slow
def test_a_longer_schedule_resumes_from_the_last_checkpoint(tiny, tmp_path):
  runner.Experiment(tiny(), 'train', str(tmp_path), log_fn=lambda _: None).run()
  # A second run with a longer schedule resumes at step 4 (optimizer state included).
  longer = tiny('trainer_options { solver_options { training_number_of_steps: 6 } }')
  lines = []
  again = runner.Experiment(longer, 'train', str(tmp_path), log_fn=lines.append)
  assert int(again.global_step.numpy()) == 4
  assert int(again.groups[0].optimizer.iterations.numpy()) == 4
  again.run()
  assert [l.split(' loss')[0] for l in lines if l.startswith('[train] step')] == [
      '[train] step 6/6']
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-6')


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_the_last_finite_checkpoint(tiny, tmp_path):
  # A huge rate blows the weights up after the first update: either the state to save at
  # step 1 is not finite (no checkpoint is written) or the loss of step 2 (the one after it) is
  # not. Both stops name the last checkpoint whose variables are all finite, and no checkpoint
  # on disk holds NaN/Inf.
  config = tiny('trainer_options { save_checkpoints_steps: 1 steps_per_loop: 1 '
                'save_summaries_steps: 1 solver_options { base_learning_rate: 1e30 '
                'warmup_steps: 0 optimizer: "sgd" } }')
  experiment = runner.Experiment(config, 'train', str(tmp_path), log_fn=lambda _: None)
  with pytest.raises((trainer_lib.NonFiniteLossError,
                      controller_lib.NonFiniteStateError)) as raised:
    experiment.run()
  message = str(raised.value)
  assert ('at step 1 ' in message if isinstance(raised.value, controller_lib.NonFiniteStateError)
          else 'loss at step 2;' in message), message
  state = tf.train.get_checkpoint_state(str(tmp_path))
  paths = list(state.all_model_checkpoint_paths) if state else []
  for path in paths:
    reader = tf.train.load_checkpoint(path)
    for name, dtype in reader.get_variable_to_dtype_map().items():
      if dtype.is_floating:
        assert np.all(np.isfinite(reader.get_tensor(name))), (path, name)
  if paths:
    assert f'whose variables are all finite is {paths[-1]} (step ' in message
  else:
    assert 'No checkpoint with all-finite variables was written' in message


def _run_cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'deeplab2_kmax.train', *args],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=240,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', **(env or {})})


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
  bad = tmp_path / 'bad.textproto'
  bad.write_text('trainer_options { solver_options { learning_rate_typo: 1 } }\n')
  result = _run_cli(f'--config_file={bad}', f'--model_dir={tmp_path / "m"}', '--mode=train')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'learning_rate_typo' in errors[0] and str(bad) in errors[0]


def test_cli_eval_without_checkpoint_says_so(synthetic_data_dir, tmp_path):
  from tests.trainer.conftest import SYNTHETIC_CONFIG, TINY_OVERRIDE  # pylint: disable=g-import-not-at-top
  result = _run_cli(f'--config_file={SYNTHETIC_CONFIG}', f'--config_override={TINY_OVERRIDE}',
                    f'--model_dir={tmp_path / "empty"}', '--mode=eval',
                    env={'SYNTHETIC_DATA_DIR': str(synthetic_data_dir)})
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert 'error: no checkpoint in' in result.stderr
