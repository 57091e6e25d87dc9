"""Issue #18, training rows: a bad --model_dir, non-finite state at a checkpoint, a killed
checkpoint write, checkpoint numbering, the console and metrics.jsonl, the run record, and too
few cluster centers for the things in a crop. The training runs share the session's
tiny_train_and_eval_run (tests/trainer/conftest.py)."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.config import loader
from deeplab2_kmax.config import run_record
from deeplab2_kmax.trainer import controller as controller_lib
from tests.conftest import REPO_ROOT
from tests.trainer.conftest import SYNTHETIC_CONFIG


def _run_train_cli(*args):
  start = time.monotonic()
  result = subprocess.run([sys.executable, '-m', 'deeplab2_kmax.train',
                           f'--config_file={SYNTHETIC_CONFIG}', *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  return result, time.monotonic() - start


# ---- --model_dir is a file / cannot be written ----

def test_hostile_model_dir_is_a_file_is_one_line_before_anything_is_built(tmp_path):
  a_file = tmp_path / 'model_dir'
  a_file.write_text('not a folder')
  result, seconds = _run_train_cli(f'--model_dir={a_file}', '--mode=train')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'error: --model_dir {a_file} is a file, not a folder; give a folder (checkpoints, '
      f'summaries and eval results go there).']
  # Checked before TensorFlow is imported: well under the 16 s it took to fail before.
  assert seconds < 10


# ---- Non-finite variables are never checkpointed ----

def test_hostile_non_finite_variable_is_never_checkpointed(tiny_train_and_eval_run):
  # The shared run's state (step 4, ckpt-4 on disk), changed here and put back afterwards.
  run = tiny_train_and_eval_run
  experiment, model_dir = run['experiment'], run['model_dir']
  control = experiment.controller
  last = str(model_dir / 'ckpt-4')
  assert control.last_finite == (last, 4)
  # What a diverging rate did: a batch-norm moving variance overflowed while the loss was finite.
  name = 'encoder/stem.batch_norm.moving_variance'
  variance = control.variables[name]
  kept = variance.numpy()
  try:
    variance.assign(tf.tensor_scatter_nd_update(variance.value, [[0]], [np.inf]))
    experiment.global_step.assign(6)
    with pytest.raises(controller_lib.NonFiniteStateError) as raised:
      control.save_checkpoint()
  finally:
    variance.assign(kept)
    experiment.global_step.assign(4)
  assert str(raised.value) == (
      f'non-finite values (NaN/Inf) at step 6 in 1 variable ({name}); the checkpoint of step 6 '
      f'was not written and training stopped. The last checkpoint whose variables are all '
      f'finite is {last} (step 4). Lower solver_options.base_learning_rate or enable '
      f'use_gradient_clipping, then resume.')
  assert tf.train.latest_checkpoint(str(model_dir)) == last
  assert not list(model_dir.glob('ckpt-6*'))


# ---- A killed checkpoint write leaves no folder behind ----

def test_hostile_unfinished_checkpoint_write_is_removed_at_start(tiny_train_and_eval_run):
  run = tiny_train_and_eval_run
  assert not run['planted_temp'].exists()
  assert (f'[train] removed ckpt-3_temp from {run["model_dir"]}: unfinished checkpoint '
          f'write(s) of an interrupted run.') in run['stdout'].splitlines()
  assert not list(run['model_dir'].glob('*_temp'))


# ---- Checkpoints are numbered by their step, on multiples of the interval ----

def test_hostile_checkpoints_are_numbered_by_step_on_multiples_of_the_interval(
    tiny_train_and_eval_run):
  # One step per loop, interval 2: ckpt-2 and ckpt-4 (Orbit wrote ckpt-1, ckpt-3, ckpt-4).
  model_dir = tiny_train_and_eval_run['model_dir']
  assert sorted(p.name for p in model_dir.glob('ckpt-*.index')) == ['ckpt-2.index',
                                                                     'ckpt-4.index']
  for step in (2, 4):
    reader = tf.train.load_checkpoint(str(model_dir / f'ckpt-{step}'))
    assert reader.get_tensor('global_step/.ATTRIBUTES/VARIABLE_VALUE') == step


@pytest.mark.parametrize('step, total, steps_per_loop, intervals, end', [
    (0, 4, 1, (2,), 1),          # loops shorter than the interval run whole
    (0, 10, 5, (2,), 2),         # a loop stops at the next checkpoint multiple...
    (2, 10, 5, (2, 3), 3),       # ...or evaluation multiple, whichever comes first
    (9, 10, 5, (4,), 10),        # and at the final step, saved whatever the interval
    (4, 10, 5, (0,), 9),         # interval 0: no checkpoint multiples
])
def test_hostile_loops_end_on_checkpoint_multiples(step, total, steps_per_loop, intervals,
                                                   end):
  assert controller_lib.loop_end(step, total, steps_per_loop, *intervals) == end


# ---- What a user reads while training ----

def test_hostile_console_has_one_line_per_loop_and_metrics_go_to_jsonl(tiny_train_and_eval_run):
  run = tiny_train_and_eval_run
  lines = run['stdout'].splitlines()
  # Before the eval table: the cleanup, the tracing note, the cluster-center warning, then
  # exactly one line per training loop (4 loops of 1 step); no Orbit output dicts.
  table_start = next(i for i, line in enumerate(lines) if line.startswith('[eval] step 4'))
  assert lines[1] == '[train] tracing and compiling the first step (about a minute on CPU)…'
  steps = [line for line in lines[:table_start] if line.startswith('[train] step')]
  assert [line.split(' loss')[0] for line in steps] == [
      f'[train] step {step}/4' for step in range(1, 5)]
  assert steps[1].endswith('; saved ckpt-2') and steps[3].endswith('; saved ckpt-4')
  assert table_start == 7
  # The eval table, then nothing else (ckpt-4 is saved already).
  assert len(lines) == table_start + 7 and lines[-1].startswith('mIoU')
  assert not [line for line in lines if 'output:' in line or '{' in line]
  with open(run['model_dir'] / controller_lib.METRICS_FILE) as f:
    records = [json.loads(line) for line in f]
  assert [(r['mode'], r['step']) for r in records] == [
      ('train', 1), ('train', 2), ('train', 3), ('train', 4), ('eval', 4)]
  logs = run['experiment'].trainer.last_logs
  assert set(logs) <= set(records[3])
  assert records[3]['losses/total_loss'] == pytest.approx(logs['losses/total_loss'])
  assert records[4]['PQ/All'] == pytest.approx(
      run['results']['panoptic_quality']['All']['pq'])


def test_hostile_run_record_holds_the_effective_config_and_command_line(
    tiny_train_and_eval_run):
  run = tiny_train_and_eval_run
  recorded = run['model_dir'] / run_record.CONFIG_FILE
  assert loader.parse_text(recorded.read_text(), str(recorded)) == run['config']
  command = (run['model_dir'] / run_record.COMMAND_LINE_FILE).read_text().splitlines()
  assert re.fullmatch(r'# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00', command[0])
  assert command[1] == f'python -m deeplab2_kmax.train --model_dir={run["model_dir"]}'


def test_hostile_run_record_keeps_a_changed_config_and_says_what_changed(tiny, tmp_path):
  import datetime  # pylint: disable=g-import-not-at-top
  first, second = tiny(), tiny('train_dataset_options { batch_size: 4 }')
  at = datetime.datetime(2026, 12, 7, 15, 0, tzinfo=datetime.timezone.utc)
  assert run_record.write_run_record(str(tmp_path), first, ['train', '--a']) is None
  assert run_record.write_run_record(str(tmp_path), first, ['train', '--b']) is None
  change = run_record.write_run_record(str(tmp_path), second, ['train', '--c'], now=at)
  kept = tmp_path / 'experiment.20261207T150000Z.textproto'
  assert change == (f'the effective config differs from the one of the previous start in '
                    f'{tmp_path} (kept as {kept}): -batch_size: 2, +batch_size: 4')
  assert loader.parse_text(kept.read_text(), str(kept)) == first
  history = (tmp_path / run_record.COMMAND_LINE_FILE).read_text().splitlines()
  assert history[1::2] == ['train --a', 'train --b', 'train --c']


# ---- Too few cluster centers for the things of a crop ----

def test_hostile_too_few_cluster_centers_warn_once_naming_both_numbers(tiny_train_and_eval_run):
  run = tiny_train_and_eval_run
  field = 'model_options.kmax.num_cluster_centers'
  warnings = [line for line in run['stdout'].splitlines() if 'mask slots' in line]
  assert len(warnings) == 1
  match = re.fullmatch(
      rf'\[train\] warning: a training crop of the loop ending at step (\d+) has (\d+) thing '
      rf'instances but the model has only 4 mask slots \({re.escape(field)}\); the unmatched '
      rf'things make the mask-ID loss explode \(to thousands\)\. Set {re.escape(field)} to at '
      rf'least (\d+) \(stuff segments take slots too\)\.',
      warnings[0])
  assert match, warnings[0]
  things = int(match.group(2))
  assert things > 4 and int(match.group(3)) == things
  with open(run['model_dir'] / controller_lib.METRICS_FILE) as f:
    seen = [json.loads(line).get('max_things_per_crop', 0) for line in f]
  assert max(seen) == things


# ---- eval of a named checkpoint (a path here; zoo names resolve in
# checkpoint/paths.resolve_checkpoint, tests/export/test_hostile_serving.py) ----

def test_hostile_eval_of_a_named_checkpoint_equals_the_runs_own_eval(tiny_train_and_eval_run,
                                                                    tmp_path):
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  run = tiny_train_and_eval_run
  logs = []
  experiment = runner.Experiment(run['config'], 'eval', str(tmp_path / 'eval_only'),
                                 log_fn=logs.append,
                                 checkpoint_path=str(run['model_dir']))  # its newest: ckpt-4
  results = experiment.run()
  assert any(line.startswith('[eval] evaluating ') and line.endswith('ckpt-4') for line in logs)
  want = run['results']
  for group, values in want['panoptic_quality'].items():
    for name, value in values.items():
      assert results['panoptic_quality'][group][name] == pytest.approx(value, abs=1e-6), (
          group, name)
  assert results['miou']['miou'] == pytest.approx(want['miou']['miou'], abs=1e-6)
  assert results['num_images'] == want['num_images'] == 8
  with pytest.raises(ValueError, match='--checkpoint_path=.* goes with --mode=eval only'):
    runner.Experiment(run['config'], 'train', str(tmp_path / 'train'),
                      checkpoint_path=str(run['model_dir']))


def test_hostile_train_cli_refuses_checkpoint_path_outside_eval_and_a_missing_one(tmp_path):
  result, _ = _run_train_cli(f'--model_dir={tmp_path / "m"}', '--mode=train',
                             '--checkpoint_path=kmax_resnet50_coco_train')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: --checkpoint_path goes with --mode=eval only (got --mode=train); to start '
      'training from a checkpoint, set model_options.initial_checkpoint.')
  result, _ = _run_train_cli(f'--model_dir={tmp_path / "m"}', '--mode=eval',
                             f'--checkpoint_path={tmp_path / "nothing_here"}')
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --checkpoint_path {tmp_path / "nothing_here"} does not exist'), (
      result.stderr)
