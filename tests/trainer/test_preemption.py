"""Preemption (trainer/preemption.py, TensorFlow's PreemptionCheckpointHandler).

Short variant (CI, about 35 s: one tiny training in this process, one device, the handler's
local mode): SIGTERM to this process after step 2 saves step 3 (the handler lets the loop under
way finish, then saves before the next) and exits with status 42; metrics.jsonl ends with the
preemption record; the SIGTERM handler before the run is back afterwards. (Resuming from a
checkpoint is the kill test's: tests/trainer/test_kill_resume.py.)

Fault test (slow: two TensorFlow processes trace the step twice over, 3-5 minutes on 2 busy
cores): two MultiWorkerMirrored workers on 127.0.0.1 train the tiny config with the real
command line; worker 1 (not the chief) gets SIGTERM after step 2; both save the same step S
(a step between checkpoint multiples, as it happens) and exit with status 42; both are
started again, resume from step S and finish at the final step with identical weights (the
chief's checkpoint and worker 1's scratch copy of it, batch-norm moving statistics included);
the step log (each worker's metrics.jsonl: `first_step`..`step` per loop) shows every step
from 1 to the final one trained exactly once. Then `--mode=eval` on the two workers gives the
results one machine gets for that checkpoint.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO_ROOT
from tests.trainer import conftest as trainer_conftest
from tests.trainer.conftest import SYNTHETIC_CONFIG, TINY_OVERRIDE

TOTAL_STEPS = 10
# SGD without warm-up and no pixel sampling (each replica samples its own pixels), as
# distributed_helper's MultiWorkerMirrored test; checkpoints on multiples of 5 only, so that a
# preemption save in between is visible as such.
OVERRIDE = f'''
trainer_options {{
  steps_per_loop: 1 save_summaries_steps: 1 save_checkpoints_steps: 5
  loss_options {{ instance_discrimination_loss {{ weight: 0.0 }} }}
  solver_options {{ optimizer: "sgd" base_learning_rate: 0.01 warmup_steps: 0
                   training_number_of_steps: {TOTAL_STEPS} }}
}}
'''
_PREEMPTION_LINE = re.compile(
    r'^\[train\] preemption \(SIGTERM to a worker of this job\): every worker stopped at step '
    r'(\d+); (saved ckpt-\d+|the checkpoint of step \d+ was saved already); exiting with status '
    r'42 \(restart me\): the restarted job resumes from step (\d+)\.$', re.M)


def _start_workers(model_dir, env, log_dir, attempt, mode='train', num_workers=2):
  """The train command line on a local cluster (one process without TF_CONFIG for 1 worker);
  each one's output in log_dir/attempt<attempt>_worker<index>.log."""
  tf_configs = trainer_conftest.local_cluster_tf_configs(num_workers) if num_workers > 1 else ['']
  processes = []
  for index, tf_config in enumerate(tf_configs):
    out = open(log_dir / f'attempt{attempt}_worker{index}.log', 'w')
    processes.append((subprocess.Popen(
        [sys.executable, '-m', 'deeplab2_kmax.train', f'--config_file={SYNTHETIC_CONFIG}',
         f'--config_override={TINY_OVERRIDE}', f'--config_override={OVERRIDE}',
         f'--model_dir={model_dir}', f'--mode={mode}'], cwd=REPO_ROOT,
        env={**env, 'TF_CONFIG': tf_config}, stdout=out,
        stderr=subprocess.STDOUT, text=True), out))
  return processes


def _wait(processes, timeout):
  deadline = time.monotonic() + timeout
  try:
    for process, out in processes:
      process.wait(timeout=max(1, deadline - time.monotonic()))
      out.close()
  finally:
    for process, _ in processes:
      if process.poll() is None:
        process.kill()
  return [process.returncode for process, _ in processes]


def _train_steps(metrics_path):
  """The global steps each train record of metrics.jsonl says its loop trained, in order."""
  steps = []
  with open(metrics_path) as f:
    for line in f:
      record = json.loads(line)
      if record['mode'] == 'train':
        steps += list(range(record['first_step'], record['step'] + 1))
  return steps


def test_sigterm_saves_the_next_loop_start_and_exits_42_on_one_device(tiny, tmp_path):
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  config = tiny('trainer_options { steps_per_loop: 1 save_summaries_steps: 1 '
                'save_checkpoints_steps: 4 solver_options { training_number_of_steps: 6 } }')
  lines = []

  def log(line):
    lines.append(line)
    if line.startswith('[train] step 2/6'):
      os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  experiment = runner.Experiment(config, 'train', str(tmp_path), log_fn=log)
  with pytest.raises(SystemExit) as raised:
    experiment.run()
  assert raised.value.code == 42
  assert signal.getsignal(signal.SIGTERM) is before
  assert lines[-1] == (
      '[train] preemption (SIGTERM to a worker of this job): every worker stopped at step 3; '
      'saved ckpt-3; exiting with status 42 (restart me): the restarted job resumes from step 3.')
  assert [line.split(' loss')[0] for line in lines if line.startswith('[train] step')] == [
      '[train] step 1/6', '[train] step 2/6', '[train] step 3/6']
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-3')
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [(r['mode'], r['step']) for r in records] == [
      ('train', 1), ('train', 2), ('train', 3), ('preemption', 3)]


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_the_same_step_everywhere_and_the_restart_resumes_it(
    synthetic_data_dir, tmp_path):
  env = {**trainer_conftest.HELPER_ENV, 'SYNTHETIC_DATA_DIR': str(synthetic_data_dir)}
  model_dir = tmp_path / 'model'
  scratch = model_dir / 'worker_1_tmp'
  processes = _start_workers(model_dir, env, tmp_path, 1)
  metrics = model_dir / 'metrics.jsonl'
  deadline = time.monotonic() + 900
  while time.monotonic() < deadline and all(p.poll() is None for p, _ in processes):
    if metrics.exists() and any(step >= 2 for step in _train_steps(metrics)):
      break
    time.sleep(0.1)
  assert all(p.poll() is None for p, _ in processes), 'a worker ended before the SIGTERM'
  os.kill(processes[1][0].pid, signal.SIGTERM)
  codes = _wait(processes, 600)
  logs = [(tmp_path / f'attempt1_worker{i}.log').read_text() for i in range(2)]
  assert codes == [42, 42], '\n'.join(log[-3000:] for log in logs)
  saved = []
  for log in logs:
    match = _PREEMPTION_LINE.search(log)
    assert match, log[-3000:]
    assert match.group(1) == match.group(3)
    saved.append(int(match.group(1)))
  step = saved[0]
  assert saved == [step, step] and 2 <= step < TOTAL_STEPS
  assert tf.train.latest_checkpoint(str(model_dir)).endswith(f'ckpt-{step}')
  assert tf.train.latest_checkpoint(str(scratch)).endswith(f'ckpt-{step}')

  processes = _start_workers(model_dir, env, tmp_path, 2)
  codes = _wait(processes, 900)
  logs = [(tmp_path / f'attempt2_worker{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  assert f'[train] resumed from {model_dir / f"ckpt-{step}"} at step {step}' in logs[0]
  assert f'[train] resumed from {scratch / f"ckpt-{step}"} at step {step}' in logs[1]
  print(f'preempted at step {step}; both workers resumed from it')  # for the -s log

  # Weights, batch-norm moving statistics, optimizer state and step identical on both workers
  # at the final step. (The tiny config's BNs are not synchronised: the moving statistics stay
  # equal only because their updates are all-reduced, normalization.BatchNorm.build; with
  # Keras's default aggregation they differed by up to 18% here.)
  chief = tf.train.load_checkpoint(str(model_dir / f'ckpt-{TOTAL_STEPS}'))
  other = tf.train.load_checkpoint(str(scratch / f'ckpt-{TOTAL_STEPS}'))
  compared = sorted(chief.get_variable_to_shape_map())
  assert compared == sorted(other.get_variable_to_shape_map())
  assert any('global_step' in name for name in compared) and len(compared) > 500
  assert any('moving_mean' in name for name in compared)
  for name in compared:
    np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name), err_msg=name)

  # The step log of each worker: 1..TOTAL_STEPS, each once; the preemption record at `step`.
  for path in (metrics, scratch / 'metrics.jsonl'):
    assert _train_steps(path) == list(range(1, TOTAL_STEPS + 1)), path
    with open(path) as f:
      records = [json.loads(line) for line in f]
    assert [r['step'] for r in records if r['mode'] == 'preemption'] == [step]

  # The cluster evaluates the final checkpoint (each worker its share of the 8 images, the
  # shares gathered): the chief's results are those of one machine evaluating it alone.
  results = model_dir / 'eval' / f'results-{TOTAL_STEPS:08d}.json'
  codes = _wait(_start_workers(model_dir, env, tmp_path, 'eval', mode='eval'), 600)
  logs = [(tmp_path / f'attempteval_worker{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  on_cluster = json.loads(results.read_text())
  results.unlink()
  codes = _wait(_start_workers(model_dir, env, tmp_path, 'one', mode='eval', num_workers=1), 600)
  log = (tmp_path / 'attemptone_worker0.log').read_text()
  assert codes == [0], log[-3000:]
  alone = json.loads(results.read_text())
  assert on_cluster['num_images'] == alone['num_images'] == 8
  for worker_log in logs:
    assert f'[eval] step {TOTAL_STEPS}: 8 images' in worker_log, worker_log[-3000:]
  for group in ('All', 'Things', 'Stuff'):
    assert (on_cluster['panoptic_quality'][group] ==
            pytest.approx(alone['panoptic_quality'][group], abs=1e-9)), group
  assert on_cluster['miou']['miou'] == pytest.approx(alone['miou']['miou'], abs=1e-9)
  assert on_cluster['miou']['per_class'] == pytest.approx(alone['miou']['per_class'], abs=1e-9)
