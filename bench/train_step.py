"""Training-step time and memory of a kMaX config (the runner's real step: forward, loss with
Hungarian matching, backward, optimizer update).

    python bench/train_step.py --config_file=F [--crop=641] [--batch=2] [--dtype=fp32|bf16]
        [--jit_compile] [--steps=3] [--recompute=encoder,pixel_decoder,transformer_decoder]

Feeds one synthetic batch (a grid of thing and stuff segments of the config's dataset) over
and over, and prints one JSON line: first step (tracing + run), median step after one warm-up
step, the process's peak RSS and, when a GPU is present, TensorFlow's peak memory of GPU:0
(`get_memory_info('GPU:0')['peak']`). `--recompute` sets trainer_options.recompute (the parts
whose activations the backward pass recomputes; `all` for every part).
"""

import json
import os
import platform
import resource
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

_CONFIG_FILE = flags.DEFINE_string('config_file', None, 'ExperimentOptions textproto.',
                                   required=True)
_CONFIG_OVERRIDE = flags.DEFINE_multi_string('config_override', [], 'Textproto overrides.')
_CROP = flags.DEFINE_integer('crop', 641, 'Square crop (k * 32 + 1).')
_BATCH = flags.DEFINE_integer('batch', 2, 'Global batch size.')
_DTYPE = flags.DEFINE_enum('dtype', 'fp32', ['fp32', 'bf16'], 'Compute precision.')
_JIT = flags.DEFINE_boolean('jit_compile', False, 'Compile forward + backward with XLA.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps after the warm-up step.')
_RECOMPUTE = flags.DEFINE_list(
    'recompute', [], 'trainer_options.recompute: comma-separated parts (encoder, '
    'pixel_decoder, transformer_decoder) or "all"; default none.')

_POLICIES = {'fp32': 'float32', 'bf16': 'mixed_bfloat16'}


def synthetic_batch(descriptor, crop, batch, max_thing_id):
  """A batch whose label is a 4x4 grid of segments cycling through thing and stuff classes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.input import sample_generator  # pylint: disable=g-import-not-at-top
  classes = list(descriptor.thing_class_ids[:8]) + list(descriptor.stuff_class_ids[:8])
  things = set(descriptor.thing_class_ids)
  label = np.zeros([crop, crop], np.int32)
  cell = -(-crop // 4)
  for index in range(16):
    row, col = divmod(index, 4)
    class_id = classes[index % len(classes)]
    instance = index + 1 if class_id in things else 0
    label[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = (
        class_id * descriptor.panoptic_label_divisor + instance)
  targets, _ = sample_generator.panoptic_targets(
      tf.constant(label), label_divisor=descriptor.panoptic_label_divisor,
      ignore_label=descriptor.ignore_label, thing_class_ids=descriptor.thing_class_ids,
      max_thing_id=max_thing_id)
  example = dict(targets)
  example[common.IMAGE] = tf.constant(
      np.random.RandomState(0).uniform(0, 255, (crop, crop, 3)).astype(np.float32))
  return {k: tf.stack([v] * batch) for k, v in example.items()}


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model.loss import builder as loss_builder  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  from deeplab2_kmax.model import recompute  # pylint: disable=g-import-not-at-top

  crop, batch = _CROP.value, _BATCH.value
  parts = list(recompute.PARTS) if _RECOMPUTE.value == ['all'] else _RECOMPUTE.value
  unknown = [part for part in parts if part not in recompute.PARTS]
  if unknown:
    raise app.UsageError(f'--recompute: unknown part(s) {unknown}; use "all" or some of '
                         f'{", ".join(recompute.PARTS)}')
  recompute_field = ' '.join(f'recompute: "{part}"' for part in parts)
  override = (f'train_dataset_options {{ crop_size: [{crop}, {crop}] batch_size: {batch} }} '
              f'trainer_options {{ mixed_precision_policy: "{_POLICIES[_DTYPE.value]}" '
              f'jit_compile: {str(_JIT.value).lower()} {recompute_field} }}')
  config = loader.load_config(_CONFIG_FILE.value, [*_CONFIG_OVERRIDE.value, override],
                              environ=loader.PlaceholderEnvironment(), validate=False)
  descriptor = builder.dataset_descriptor(config)
  gpus = tf.config.list_physical_devices('GPU')
  strategy = tf.distribute.OneDeviceStrategy('/gpu:0' if gpus else '/cpu:0')
  with strategy.scope():
    model = builder.build_model(config, descriptor=descriptor)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    groups = optimizer_lib.build_optimizers(config.trainer_options.solver_options, model, step)
    loss = loss_builder.build_loss(config, descriptor)
  data = tf.data.Dataset.from_tensors(
      synthetic_batch(descriptor, crop, batch, config.train_dataset_options.max_thing_id))
  trainer = trainer_lib.Trainer(config, model, loss, groups, step, strategy,
                                strategy.experimental_distribute_dataset(data.repeat()),
                                log_fn=lambda _: None)

  def run():
    start = time.perf_counter()
    trainer.train(tf.constant(1, tf.int32))
    return time.perf_counter() - start

  first = run()
  run()
  times = [run() for _ in range(_STEPS.value)]
  gpu_peak = None
  if gpus:
    # Peak bytes TensorFlow's allocator held on GPU:0 since the process started.
    gpu_peak = round(tf.config.experimental.get_memory_info('GPU:0')['peak'] / 2**30, 2)
  print(json.dumps({
      'benchmark': 'train_step', 'config': os.path.basename(_CONFIG_FILE.value),
      'crop': crop, 'batch': batch, 'dtype': _DTYPE.value, 'jit_compile': _JIT.value,
      'recompute': list(config.trainer_options.recompute),
      'first_step_s': round(first, 3), 'median_step_s': round(statistics.median(times), 3),
      'steps_s': [round(t, 3) for t in times],
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      'peak_gpu_gb': gpu_peak,
      'params': int(model.count_params()), 'total_loss': trainer.last_logs.get(
          'losses/total_loss'), 'cpus': os.cpu_count(), 'machine': platform.machine()}))


if __name__ == '__main__':
  app.run(main)
