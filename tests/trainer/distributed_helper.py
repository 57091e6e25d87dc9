"""Subprocess entry for the distribution tests (device setup must precede TensorFlow's
initialisation, so these run outside the pytest process).

    python -m tests.trainer.distributed_helper mirrored DATA_DIR OUT_DIR
      -> OUT_DIR/{one_device,mirrored}.npz: weights after one step on one device and on
         MirroredStrategy over 2 logical CPUs, same global batch and initial weights.
    python -m tests.trainer.distributed_helper worker DATA_DIR OUT_DIR   (TF_CONFIG set)
      -> OUT_DIR/worker_<index>.npz: weights after two MultiWorkerMirrored steps.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

# Same global batch split into per-replica batches: only gradient summation order differs.
# SGD (not Adam, whose first step is sign(g) and so flips on near-zero gradients) and
# synchronised BN make the two runs comparable; the sampled instance-discrimination loss is
# weighted 0 because each replica samples its own pixels.
OVERRIDE = '''
trainer_options {
  steps_per_loop: 1 save_summaries_steps: 1 save_checkpoints_steps: 1
  loss_options { instance_discrimination_loss { weight: 0.0 } }
  solver_options { optimizer: "sgd" base_learning_rate: 0.01 warmup_steps: 0
                   use_sync_batchnorm: true training_number_of_steps: STEPS }
}
'''


def _weights(model):
  return {v.path: np.asarray(v.numpy()) for v in model.weights}


def main(mode, data_dir, out_dir):
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import conftest  # pylint: disable=g-import-not-at-top
  if mode == 'mirrored':
    config = conftest.tiny_config(data_dir, OVERRIDE.replace('STEPS', '1'))
    single = runner.Experiment(config, 'train', os.path.join(out_dir, 'one'),
                               tf.distribute.OneDeviceStrategy('/cpu:0'), log_fn=print)
    mirrored = runner.Experiment(config, 'train', os.path.join(out_dir, 'mirrored'),
                                 strategy_lib.create_strategy(devices=['/cpu:0', '/cpu:1']),
                                 log_fn=print)
    assert mirrored.strategy.num_replicas_in_sync == 2
    initial = _weights(single.model)
    for variable in mirrored.model.weights:
      variable.assign(initial[variable.path])
    single.run()
    mirrored.run()
    np.savez(os.path.join(out_dir, 'initial.npz'), **initial)
    np.savez(os.path.join(out_dir, 'one_device.npz'), **_weights(single.model))
    np.savez(os.path.join(out_dir, 'mirrored.npz'), **_weights(mirrored.model))
  else:
    index = json.loads(os.environ['TF_CONFIG'])['task']['index']
    strategy = strategy_lib.create_strategy()
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    config = conftest.tiny_config(data_dir, OVERRIDE.replace('STEPS', '2'))
    experiment = runner.Experiment(config, 'train', os.path.join(out_dir, 'model'), strategy,
                                   log_fn=print)
    experiment.run()
    np.savez(os.path.join(out_dir, f'worker_{index}.npz'), **_weights(experiment.model))


if __name__ == '__main__':
  if sys.argv[1] == 'mirrored':
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  main(*sys.argv[1:])
