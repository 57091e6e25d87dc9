"""Tiny experiment configs over the session's synthetic dataset, for runner tests, and the
subprocesses of the distribution tests (tests/trainer/distributed_helper.py, local clusters)."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

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


# TensorFlow's start-up logging would bury a failing subprocess's traceback.
HELPER_ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'PYTHONPATH': str(REPO_ROOT)}


def run_helper(mode, *args, timeout=600) -> subprocess.CompletedProcess:
  """Runs `python -m tests.trainer.distributed_helper MODE ARGS...` to its end."""
  return subprocess.run([sys.executable, '-m', 'tests.trainer.distributed_helper', mode,
                         *map(str, args)], cwd=REPO_ROOT, env=HELPER_ENV, capture_output=True,
                        text=True, timeout=timeout)


def local_cluster_tf_configs(num_workers=2) -> list[str]:
  """TF_CONFIG values (JSON) of `num_workers` workers on free ports of 127.0.0.1, by index."""
  ports = []
  for _ in range(num_workers):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      ports.append(s.getsockname()[1])
  workers = [f'127.0.0.1:{port}' for port in ports]
  return [json.dumps({'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': i}})
          for i in range(num_workers)]


def run_helper_workers(mode, *args, num_workers=2, timeout=900) -> list[tuple[int, str]]:
  """Runs distributed_helper MODE on a local cluster of `num_workers` processes (TF_CONFIG set);
  returns each worker's (exit status, stderr), all of them killed after `timeout` seconds."""
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'tests.trainer.distributed_helper', mode, *map(str, args)],
      cwd=REPO_ROOT, env={**HELPER_ENV, 'TF_CONFIG': tf_config}, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for tf_config in local_cluster_tf_configs(num_workers)]
  deadline = time.monotonic() + timeout
  try:
    errors = [process.communicate(timeout=max(1, deadline - time.monotonic()))[1]
              for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  return [(process.returncode, error) for process, error in zip(processes, errors)]


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
