"""Hungarian-matcher speed on the COCO kMaX problem size (181x181, batch 8) on CPU.

    python bench/hungarian.py [--size=181] [--batch_size=8] [--repeats=5]

Times the batched matcher in graph mode (`tf.function`) and compiled with XLA
(`jit_compile=True`) on random costs laid out like the loss's (dice x class similarity in
[-1, 0], with -999 rows for void ground truth), after one warm-up call each, and prints one
JSON line with the median milliseconds per batch.
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

_SIZE = flags.DEFINE_integer('size', 181, 'Square problem size (COCO: 128 things + 53 stuff).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Problems per batch.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per mode (the median is printed).')


def main(argv):
  del argv
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # The figure is a CPU one.
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model.loss import hungarian  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  size, batch = _SIZE.value, _BATCH_SIZE.value
  costs = rng.uniform(-1, 0, size=(batch, size, size)).astype(np.float32)
  # About a third of the GT rows are void padding, as in a typical COCO crop.
  costs[:, size - size // 3:, :] = -999.0
  costs = tf.constant(costs)
  result = {'benchmark': 'hungarian', 'size': size, 'batch_size': batch, 'dtype': 'float32'}
  for mode, jit in (('graph', False), ('xla', True)):
    solve = tf.function(hungarian.linear_sum_assignment, jit_compile=jit)
    start = time.perf_counter()
    solve(costs).numpy()
    first = time.perf_counter() - start
    timings = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      solve(costs).numpy()
      timings.append(time.perf_counter() - start)
    result[f'{mode}_ms_per_batch'] = round(1000 * statistics.median(timings), 1)
    result[f'{mode}_first_call_s'] = round(first, 2)
  result.update({'tf_version': tf.__version__, 'cpu_count': os.cpu_count(),
                 'machine': platform.processor() or platform.machine(),
                 'load_average_1min': round(os.getloadavg()[0], 2),
                 'date': time.strftime('%Y-%m-%d')})
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
