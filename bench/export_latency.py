"""Latency of the exported SavedModel against the in-framework model (issue #7).

    python bench/export_latency.py [--config_file=F] [--checkpoint_path=C] [--batch_size=1]
        [--height=97] [--width=97] [--calls=20]

Exports the model of F (fresh weights, or C's) to a temporary folder, loads it back and times,
on the same uint8 batch:
- `exported`: the loaded serving_default signature (preprocessing, model, post-processing,
  per-segment arrays);
- `in_framework`: what the evaluator runs, in one tf.function in this process: the eval
  preprocessing, `model(images, training=False)` and the post-processor.
Calls alternate between the two (so load changes on a shared machine hit both alike), after
two warm-up calls each. Prints one JSON line with the medians and `exported / in_framework`.
"""

import json
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'synthetic',
                     'kmax_r50_os32_synthetic_demo.textproto')
_CONFIG_FILE = flags.DEFINE_string('config_file', _DEMO, 'ExperimentOptions textproto.')
_CONFIG_OVERRIDE = flags.DEFINE_multi_string('config_override', [], 'Textproto overrides.')
_CHECKPOINT = flags.DEFINE_string('checkpoint_path', None, 'Optional checkpoint (or folder).')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per call.')
_HEIGHT = flags.DEFINE_integer('height', 97, 'Image height (any; resized in the graph).')
_WIDTH = flags.DEFINE_integer('width', 97, 'Image width.')
_CALLS = flags.DEFINE_integer('calls', 20, 'Timed calls of each after warm-up.')


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import export  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top

  config = loader.load_config(_CONFIG_FILE.value, _CONFIG_OVERRIDE.value,
                              environ=loader.PlaceholderEnvironment(), validate=False)
  module = export.build_serving_module(config)
  if _CHECKPOINT.value:
    export.restore_model(module.model, _CHECKPOINT.value)
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    directory = export.export(module, folder, input_types=['image_tensor'])
    export_s = time.perf_counter() - start
    loaded = tf.saved_model.load(directory)
    signature = loaded.signatures[export.SIGNATURE_IMAGE_TENSOR]

    @tf.function
    def in_framework(images):
      batch = export.preprocess_batch(images, module.preprocess_options)
      outputs = module.model(batch[common.IMAGE], training=False)
      return module.post_processor(outputs, batch)

    images = tf.constant(np.random.RandomState(0).randint(
        0, 256, (_BATCH.value, _HEIGHT.value, _WIDTH.value, 3)).astype(np.uint8))

    def timed(function):
      start = time.perf_counter()
      outputs = function(images)
      _ = [v.numpy() for v in outputs.values()]  # wait for the results
      return time.perf_counter() - start

    for _ in range(2):
      timed(lambda x: signature(images=x))
      timed(in_framework)
    exported_s, framework_s = [], []
    for _ in range(_CALLS.value):
      exported_s.append(timed(lambda x: signature(images=x)))
      framework_s.append(timed(in_framework))
  exported, framework = statistics.median(exported_s), statistics.median(framework_s)
  print(json.dumps({
      'benchmark': 'export_latency',
      'config': os.path.basename(_CONFIG_FILE.value),
      'batch_size': _BATCH.value,
      'image': [_HEIGHT.value, _WIDTH.value],
      'crop': list(module.preprocess_options.crop_size),
      'calls': _CALLS.value,
      'exported_median_s': round(exported, 4),
      'in_framework_median_s': round(framework, 4),
      'exported_over_in_framework': round(exported / framework, 3),
      'export_s': round(export_s, 1),
      'device': 'GPU' if tf.config.list_physical_devices('GPU') else 'CPU',
      'cpu_count': os.cpu_count(),
      'load_avg_1m': round(os.getloadavg()[0], 2),
      'tf_version': tf.__version__,
      'machine': platform.machine(),
      'date': time.strftime('%Y-%m-%d'),
  }))


if __name__ == '__main__':
  app.run(main)
