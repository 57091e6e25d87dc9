"""Subprocess entry for the distribution tests (device setup must precede TensorFlow's
initialisation, so these run outside the pytest process).

    python -m tests.trainer.distributed_helper mirrored DATA_DIR OUT_DIR
      -> OUT_DIR/{one_device,mirrored}.npz: weights after one step on one device and on
         MirroredStrategy over 2 logical CPUs, same global batch and initial weights.
    python -m tests.trainer.distributed_helper worker DATA_DIR OUT_DIR   (TF_CONFIG set)
      -> OUT_DIR/worker_<index>.npz: weights after two MultiWorkerMirrored steps.
    python -m tests.trainer.distributed_helper fp16_skip DATA_DIR OUT_DIR
      -> OUT_DIR/fp16_skip_{0,1,2}.npz: mixed_float16 AdamW training state (weights, every
         optimizer variable, global step, loss scale) on MirroredStrategy over 2 logical CPUs
         after a normal step (0), a step whose scaled gradients overflow (1) and another
         normal step (2).
    python -m tests.trainer.distributed_helper eval_mirrored DATA_DIR OUT_DIR
      -> OUT_DIR/eval_{one_device,mirrored}.json: evaluation results of the same predictions
         on one device and on MirroredStrategy over 2 logical CPUs.
    python -m tests.trainer.distributed_helper eval_workers OUT_DIR DATA_DIR...  (TF_CONFIG)
      -> OUT_DIR/eval_<k>_worker_<index>.json for the k-th DATA_DIR on MultiWorkerMirrored,
         and eval_<k>_one_device.json (worker 0 alone); continuous_eval_worker_<index>.json:
         the error of a continuous_eval Experiment on the cluster (null: none).
    python -m tests.trainer.distributed_helper bn_mirrored OUT_DIR
      -> OUT_DIR/bn_mirrored.npz: each replica's copy of BN moving statistics after a training
         call with a different batch per replica (MirroredStrategy over 2 logical CPUs).
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


# AdamW with weight decay (which moves kernels even without a gradient) and gradient clipping
# (which all-reduces the gradients first on several replicas); no warm-up, so step 0 moves.
FP16_SKIP_OVERRIDE = '''
trainer_options {
  mixed_precision_policy: "mixed_float16" steps_per_loop: 1
  solver_options { optimizer: "adamw" adamw_weight_decay: 0.05 warmup_steps: 0
                   use_gradient_clipping: true clip_gradient_norm: 1.0 }
}
'''
# This untrained tiny model's float16 gradients overflow at a loss scale of 2^24 while its loss
# stays finite (tests/trainer/test_precision.py); 2^12 does not overflow.
OVERFLOWING_SCALE = 2.0 ** 24
SAFE_SCALE = 2.0 ** 12


def _weights(model):
  return {v.path: np.asarray(v.numpy()) for v in model.weights}


def _training_state(experiment):
  """Every replica's copy of the trainable weights and optimizer variables, the steps and the
  scale (batch-norm moving statistics come from the forward pass and move on any step)."""
  strategy = experiment.strategy
  state = {'global_step': experiment.global_step.numpy(),
           'loss_scale': experiment.trainer.loss_scale.numpy()}
  variables = [('weight', v) for v in experiment.model.trainable_variables]
  for group in experiment.groups:
    variables += [(f'{group.name}_optimizer', v) for v in group.optimizer.variables]
  for kind, variable in variables:
    for replica, value in enumerate(strategy.experimental_local_results(variable.value)):
      state[f'{kind}/{variable.path}/replica_{replica}'] = np.asarray(value.numpy())
  return state


def _fp16_skip(data_dir, out_dir):
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import conftest  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config(data_dir, FP16_SKIP_OVERRIDE)
  experiment = runner.Experiment(config, 'train', os.path.join(out_dir, 'model'),
                                 strategy_lib.create_strategy(devices=['/cpu:0', '/cpu:1']),
                                 log_fn=print)
  assert experiment.strategy.num_replicas_in_sync == 2
  trainer = experiment.trainer
  for index, scale in enumerate([SAFE_SCALE, OVERFLOWING_SCALE, SAFE_SCALE]):
    trainer.loss_scale.assign(scale)
    trainer.train(tf.constant(1, tf.int32))
    np.savez(os.path.join(out_dir, f'fp16_skip_{index}.npz'), **_training_state(experiment))


class _PartlyRightPredictions:
  """Stands in for model + post-processor: predicts each image's ground truth, its columns
  from a per-image position on rolled by 9 pixels, so that PQ, SQ and RQ lie strictly between
  0 and 1 and every image contributes its own matches and misses (an image counted twice or
  not at all changes them). Depends on the image alone, not on how images are batched."""

  def __init__(self, descriptor):
    self.divisor = descriptor.panoptic_label_divisor

  def model(self, images, training=False):
    del training
    return {'images': images}

  def __call__(self, outputs, batch):
    from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
    gt = batch[common.GT_PANOPTIC_RAW]
    width = tf.shape(gt)[2]
    # [batch, 1, 1]: a column from the image's mean intensity, in [0, width).
    mean = tf.reduce_mean(outputs['images'], axis=[1, 2, 3])
    start = tf.cast(tf.math.floormod(mean * 7.0, tf.cast(width, tf.float32)), tf.int32)
    columns = tf.range(width)[tf.newaxis, tf.newaxis, :]
    panoptic = tf.where(columns < start[:, tf.newaxis, tf.newaxis], gt,
                        tf.roll(gt, shift=9, axis=2))
    # Scores differ between segments (and images): COCO's AP ranks detections by score and
    # breaks ties by image order, which several workers do not keep.
    scores = (0.25 + 0.5 * tf.cast(columns, tf.float32) / tf.cast(width, tf.float32)
              + 0.01 * tf.math.floormod(mean, 10.0)[:, tf.newaxis, tf.newaxis])
    return {common.PRED_PANOPTIC: panoptic,
            common.PRED_SEMANTIC: panoptic // self.divisor,
            common.PRED_INSTANCE_SCORES: tf.broadcast_to(scores, tf.shape(panoptic))}


def _evaluate(config, strategy) -> dict:
  """The real eval pipeline and Evaluator over `strategy`, predictions from
  _PartlyRightPredictions (no model to build and trace: seconds, not a minute); the results
  without their timing."""
  from deeplab2_kmax.data.input import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  pipeline = pipeline_lib.InputPipeline(config.eval_dataset_options, is_training=False)
  predictions = _PartlyRightPredictions(pipeline.descriptor)
  evaluator = evaluator_lib.Evaluator(
      config, predictions.model, predictions, pipeline.descriptor,
      tf.Variable(0, dtype=tf.int64), strategy, runner._distribute(strategy, pipeline),  # pylint: disable=protected-access
      log_fn=print)
  evaluator.evaluate(tf.constant(-1, tf.int32))
  results = dict(evaluator.last_results)
  results.pop('seconds')
  return results


def _write_json(path, value):
  with open(path, 'w') as f:
    json.dump(value, f, default=float)


def _eval_mirrored(data_dir, out_dir):
  """Evaluation on one device and on 2 replicas."""
  from deeplab2_kmax.trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import conftest  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config(data_dir)
  strategies = {'one_device': tf.distribute.OneDeviceStrategy('/cpu:0'),
                'mirrored': strategy_lib.create_strategy(devices=['/cpu:0', '/cpu:1'])}
  assert strategies['mirrored'].num_replicas_in_sync == 2
  for name, strategy in strategies.items():
    _write_json(os.path.join(out_dir, f'eval_{name}.json'), _evaluate(config, strategy))


def _eval_workers(out_dir, *data_dirs):
  """Evaluation of each dataset on every worker of MultiWorkerMirrored (TF_CONFIG), and on
  worker 0 alone on one device: eval_<k>_worker_<index>.json, eval_<k>_one_device.json."""
  from deeplab2_kmax.trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import conftest  # pylint: disable=g-import-not-at-top
  strategy = strategy_lib.create_strategy()
  assert strategy_lib.num_workers(strategy) == 2
  index = strategy.cluster_resolver.task_id
  for k, data_dir in enumerate(data_dirs):
    config = conftest.tiny_config(data_dir)
    _write_json(os.path.join(out_dir, f'eval_{k}_worker_{index}.json'),
                _evaluate(config, strategy))
    if index == 0:
      _write_json(os.path.join(out_dir, f'eval_{k}_one_device.json'),
                  _evaluate(config, tf.distribute.OneDeviceStrategy('/cpu:0')))
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  try:
    runner.Experiment(config, 'continuous_eval', os.path.join(out_dir, 'model'), strategy)
    refusal = None
  except ValueError as error:
    refusal = str(error)
  _write_json(os.path.join(out_dir, f'continuous_eval_worker_{index}.json'), refusal)


def _batch_norm_mirrored(out_dir):
  """One training call of unsynchronised and synchronised BatchNorms (fused per-channel, and
  over two axes) on MirroredStrategy over 2 logical CPUs, each replica with its own batch:
  every replica's copy of the moving statistics -> bn_mirrored.npz, with the batches."""
  from deeplab2_kmax.model.layers import normalization  # pylint: disable=g-import-not-at-top
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  shapes = {'channels': (2, 5, 5, 3), 'two_axes': (2, 4, 3, 6)}
  axes = {'channels': -1, 'two_axes': [1, 3]}
  layers = {}
  with strategy.scope():
    for name, shape in shapes.items():
      for synchronized in (False, True):
        key = f'{name}_{"synchronized" if synchronized else "local"}'
        layers[key] = normalization.BatchNorm(axis=axes[name], momentum=0.5,
                                              synchronized=synchronized)
        layers[key].build(shape)
  # Replica r's batch has mean about 3r: the replicas' moments differ.
  batches = {name: [np.random.RandomState(r).randn(*shape).astype(np.float32) + 3 * r
                    for r in range(2)] for name, shape in shapes.items()}
  inputs = strategy.experimental_distribute_values_from_function(
      lambda context: {name: tf.constant(b[context.replica_id_in_sync_group])
                       for name, b in batches.items()})

  @tf.function
  def step(inputs):
    def replica_fn(inputs):
      return [layer(inputs[key.rsplit('_', 1)[0]], training=True,
                    then_activation='relu' if key.startswith('channels') else None)
              for key, layer in layers.items()]
    return strategy.run(replica_fn, args=(inputs,))

  step(inputs)
  saved = {f'batch/{name}/{r}': b[r] for name, b in batches.items() for r in range(2)}
  for key, layer in layers.items():
    for variable in (layer.moving_mean, layer.moving_variance):
      for r, copy in enumerate(strategy.experimental_local_results(variable.value)):
        saved[f'{key}/{variable.name}/{r}'] = copy.numpy()
  np.savez(os.path.join(out_dir, 'bn_mirrored.npz'), **saved)


def main(mode, data_dir, out_dir):
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from tests.trainer import conftest  # pylint: disable=g-import-not-at-top
  if mode == 'fp16_skip':
    _fp16_skip(data_dir, out_dir)
  elif mode == 'eval_mirrored':
    _eval_mirrored(data_dir, out_dir)

  elif mode == 'mirrored':
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
  if sys.argv[1] in ('mirrored', 'fp16_skip', 'eval_mirrored', 'bn_mirrored'):
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  if sys.argv[1] == 'eval_workers':
    _eval_workers(*sys.argv[2:])
  elif sys.argv[1] == 'bn_mirrored':
    _batch_norm_mirrored(sys.argv[2])
  else:
    main(*sys.argv[1:])
