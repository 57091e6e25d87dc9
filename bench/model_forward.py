"""Forward-pass latency of a kMaX model (inference, batch 1).

    python bench/model_forward.py --config_file=F [--crop=641]
        [--precision=float32|bfloat16|auto | --dtype=fp32|bf16|fp16] [--jit_compile] [--calls=3]

Builds the model eagerly, wraps `model(x, training=False)` in a tf.function, and prints one
JSON line: the first call (tracing + graph optimisation + run) and the median of --calls calls
after two warm-up calls, in seconds.

--precision resolves as the export's does (deeplab2_kmax/precision.py: `auto` is bfloat16 only
on a CPU with native bfloat16 flags or a GPU of compute capability >= 8.0); the line records
the resolved precision and the CPU flags `auto` decided from. --dtype is the older spelling
(fp32, bf16, or fp16, which --precision does not offer); give one or the other.
"""

import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

_CONFIG_FILE = flags.DEFINE_string('config_file', None, 'ExperimentOptions textproto.',
                                   required=True)
_CONFIG_OVERRIDE = flags.DEFINE_multi_string('config_override', [], 'Textproto overrides.')
_CROP = flags.DEFINE_integer('crop', 641, 'Square input size (k * 32 + 1).')
_DTYPE = flags.DEFINE_enum('dtype', 'fp32', ['fp32', 'bf16', 'fp16'],
                           'Compute precision (the older flag; see --precision).')
_PRECISION = flags.DEFINE_enum('precision', None, ['float32', 'bfloat16', 'auto'],
                               'Compute precision as in the export; "auto" picks bfloat16 only '
                               'where this machine has native bfloat16. Instead of --dtype.')
_JIT = flags.DEFINE_boolean('jit_compile', False, 'Compile the forward pass with XLA.')
_CALLS = flags.DEFINE_integer('calls', 3, 'Timed calls after warm-up.')

_POLICIES = {'fp32': 'float32', 'bf16': 'mixed_bfloat16', 'fp16': 'mixed_float16'}
# --precision's resolved values as --dtype names.
_DTYPES = {'float32': 'fp32', 'bfloat16': 'bf16'}
_PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}


def resolve_dtype(precision, dtype: str, dtype_given: bool, flags_=None, gpus=None) -> tuple:
  """(--dtype name, resolved precision) from --precision (None: unset) and --dtype."""
  from deeplab2_kmax import precision as precision_lib  # pylint: disable=g-import-not-at-top
  if precision is None:
    return dtype, _PRECISIONS[dtype]
  if dtype_given:
    raise app.UsageError('give --precision or --dtype, not both.')
  resolved = precision_lib.resolve(precision, flags=flags_, gpus=gpus)
  return _DTYPES[resolved], resolved


def main(argv):
  del argv
  dtype, resolved = resolve_dtype(_PRECISION.value, _DTYPE.value, flags.FLAGS['dtype'].present)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import precision as precision_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top

  config = loader.load_config(_CONFIG_FILE.value, _CONFIG_OVERRIDE.value,
                              environ=loader.PlaceholderEnvironment(), validate=False)
  crop = _CROP.value
  model = builder.build_model(config, crop_size=(crop, crop), dtype=_POLICIES[dtype])
  images = tf.constant(
      np.random.RandomState(0).uniform(0, 255, (1, crop, crop, 3)).astype(np.float32))
  forward = tf.function(lambda x: model(x, training=False), jit_compile=_JIT.value)

  def run():
    start = time.perf_counter()
    outputs = forward(images)
    # Wait for the results (device execution is asynchronous).
    _ = [v.numpy() for v in outputs.values()]
    return time.perf_counter() - start

  first = run()
  for _ in range(2):
    run()
  times = [run() for _ in range(_CALLS.value)]
  print(json.dumps({
      'benchmark': 'model_forward',
      'config': os.path.basename(_CONFIG_FILE.value),
      'crop': crop,
      'batch_size': 1,
      'dtype': dtype,
      'precision': resolved,
      'precision_requested': _PRECISION.value or _DTYPE.value,
      **precision_lib.describe(),
      'bf16_gpus': precision_lib.bf16_gpus(),
      'jit_compile': _JIT.value,
      'first_call_s': round(first, 3),
      'median_s': round(statistics.median(times), 3),
      'times_s': [round(t, 3) for t in times],
      'device': 'GPU' if tf.config.list_physical_devices('GPU') else 'CPU',
      'cpu_count': os.cpu_count(),
      'tf_version': tf.__version__,
      'machine': platform.machine(),
      'date': time.strftime('%Y-%m-%d'),
  }))


if __name__ == '__main__':
  app.run(main)
