"""Where a training step's memory goes: one sub-network more per run (issue #19).

    python bench/train_memory.py --config_file=F --part=encoder [--crop=641] [--batch=2]
        [--dtype=fp32|bf16] [--steps=3]

`--part` cuts the step after a sub-network; the run computes the gradient of every trainable
variable it reached, in one tf.function as the trainer does, on one synthetic batch
(bench/train_step.py's), and prints one JSON line:

| part                | forward                                 | differentiated objective     |
|---------------------|-----------------------------------------|------------------------------|
| built               | nothing (model, loss, optimizer slots)  | none: the static baseline    |
| encoder             | pixel encoder                           | sum of means of its outputs  |
| pixel_decoder       | + kMaX pixel decoder                    | the same over all endpoints  |
| transformer_decoder | + kMaX transformer decoder              | the same                     |
| model               | the whole model (heads, auxiliary outs) | the same over all outputs    |
| step                | the whole model                         | the real loss (matching,     |
|                     |                                         | mask-ID cross-entropy, ...)  |

Three figures per run: `peak_rss_gb` (the process's peak resident memory over three steps: what
the host must have), `forward_activation_gb` (the bytes of every floating-point tensor the
traced forward computes: an upper bound of what the backward pass keeps) and `retained_gb`
(the bytes of the forward tensors that a gradient op reads, i.e. what waits in memory from the
forward to the backward pass, before Grappler; independent of the allocator), with
`retained_by_scope_gb` splitting it by the model's sub-networks and the loss (`--top` largest
tensors are listed under `largest_retained`). Run each part in its own process (the peak RSS of
a process never goes down) and subtract consecutive parts.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# bench/train_step.py's flags (--config_file, --config_override, --crop, --batch, --dtype,
# --steps) and its synthetic batch; --jit_compile is not used here.
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

PARTS = ('built', 'encoder', 'pixel_decoder', 'transformer_decoder', 'model', 'step')
_PART = flags.DEFINE_enum('part', 'step', PARTS, 'Where the step is cut (module docstring).')
_TOP = flags.DEFINE_integer('top', 0, 'List this many of the largest retained tensors.')
_TRACE_ONLY = flags.DEFINE_boolean('trace_only', False,
                                   'Trace the step and report the graph figures; run nothing.')


def _surrogate(tensors):
  """Sum of the means of the floating-point tensors in a nest (every output gets a gradient)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = [tf.reduce_mean(tf.cast(t, tf.float32)) for t in tf.nest.flatten(tensors)
            if isinstance(t, tf.Tensor) and t.dtype.is_floating]
  return tf.add_n(values)


def _tensor_bytes(tensor) -> int:
  """Bytes of a tensor of static shape (unknown dimensions count as 1)."""
  if tensor.shape.rank is None:
    return 0
  elements = 1
  for dim in tensor.shape:
    elements *= dim if dim is not None else 1
  return elements * tensor.dtype.size


def forward_activation_bytes(forward_ops) -> int:
  """Bytes of the floating-point outputs of the forward ops of a traced step."""
  return sum(_tensor_bytes(output) for op in forward_ops
             if op.type not in ('ReadVariableOp', 'Const', 'VarHandleOp', 'Placeholder',
                                'Identity')
             for output in op.outputs if output.dtype.is_floating)


def _scope(op_name: str, sub_networks) -> str:
  """The sub-network an op belongs to ('kmax_deeplab_1/encoder_1/...' or, when a part is
  called on its own, 'encoder_1/...' -> 'encoder'); anything else is the loss (or, for the
  cut parts, the surrogate objective)."""
  for name in op_name.split('/')[:2]:
    base = name.rsplit('_', 1)[0] if name.rsplit('_', 1)[-1].isdigit() else name
    if base in sub_networks:
      return base
  return 'loss'


def retained_for_backward(forward_ops, backward_ops):
  """The forward tensors a backward op reads (variables excluded): [(bytes, op, tensor)]."""
  backward = set(backward_ops)
  retained = []
  for op in forward_ops:
    if op.type in ('ReadVariableOp', 'VarHandleOp', 'Const'):
      continue
    for output in op.outputs:
      if any(consumer in backward for consumer in output.consumers()):
        retained.append((_tensor_bytes(output), op, output))
  return retained


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model.loss import builder as loss_builder  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  crop, batch, part = train_step._CROP.value, train_step._BATCH.value, _PART.value  # pylint: disable=protected-access
  override = (f'train_dataset_options {{ crop_size: [{crop}, {crop}] batch_size: {batch} }} '
              'trainer_options { mixed_precision_policy: '
              f'"{train_step._POLICIES[train_step._DTYPE.value]}" }}')  # pylint: disable=protected-access
  config_file = train_step._CONFIG_FILE.value  # pylint: disable=protected-access
  config = loader.load_config(config_file, [*train_step._CONFIG_OVERRIDE.value, override],  # pylint: disable=protected-access
                              environ=loader.PlaceholderEnvironment(), validate=False)
  descriptor = builder.dataset_descriptor(config)
  model = builder.build_model(config, descriptor=descriptor)
  step_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
  groups = optimizer_lib.build_optimizers(config.trainer_options.solver_options, model,
                                          step_variable)
  for group in groups:   # Slots exist from the start, as in training.
    group.optimizer.build(group.variables)
  loss = loss_builder.build_loss(config, descriptor)
  data = train_step.synthetic_batch(descriptor, crop, batch,
                                    config.train_dataset_options.max_thing_id)
  variables = model.trainable_variables

  boundary = []   # How many ops the traced forward has: the rest are the backward's.

  @tf.function
  def run(batch_data):
    with tf.GradientTape() as tape:
      images = batch_data[common.IMAGE]
      if part == 'step':
        outputs = model(images, training=True)
        objective = tf.reduce_sum(loss(batch_data, outputs, seed=tf.constant([1, 2]))[
            common.TOTAL_LOSS]) / batch
      elif part == 'model':
        objective = _surrogate(model(images, training=True))
      else:
        endpoints = model.encoder(tf.cast(images, tf.float32) / 127.5 - 1.0, training=True)
        if part in ('pixel_decoder', 'transformer_decoder'):
          endpoints = model.pixel_decoder(endpoints, training=True)
        if part == 'transformer_decoder':
          endpoints = model.transformer_decoder(endpoints, training=True)
        objective = _surrogate(endpoints)
    boundary.append(len(tf.compat.v1.get_default_graph().get_operations()))
    gradients = tape.gradient(objective, variables)
    return objective, [g for g in gradients if g is not None]

  times, reached, activations, retained = [], 0, 0, []
  if part != 'built':
    operations = run.get_concrete_function(data).graph.get_operations()
    forward_ops, backward_ops = operations[:boundary[0]], operations[boundary[0]:]
    activations = forward_activation_bytes(forward_ops)
    retained = retained_for_backward(forward_ops, backward_ops)
  sub_networks = {layer.name for layer in model.layers}
  by_scope = {}
  for size, op, _ in retained:
    scope = _scope(op.name, sub_networks)
    by_scope[scope] = by_scope.get(scope, 0) + size
  largest = sorted(retained, key=lambda item: -item[0])[:_TOP.value]
  if part != 'built' and not _TRACE_ONLY.value:
    for _ in range(train_step._STEPS.value):  # pylint: disable=protected-access
      start = time.perf_counter()
      _, gradients = run(data)
      reached = len(gradients)
      times.append(time.perf_counter() - start)
  print(json.dumps({
      'benchmark': 'train_memory', 'config': os.path.basename(config_file),
      'part': part, 'crop': crop, 'batch': batch, 'dtype': train_step._DTYPE.value,  # pylint: disable=protected-access
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      'forward_activation_gb': round(activations / 2**30, 3),
      'retained_gb': round(sum(size for size, _, _ in retained) / 2**30, 3),
      'retained_by_scope_gb': {scope: round(size / 2**30, 3) for scope, size in sorted(
          by_scope.items(), key=lambda item: -item[1])},
      **({'largest_retained': [f'{size / 2**20:.1f} MB {op.type} {tensor.shape} {op.name}'
                               for size, op, tensor in largest]} if largest else {}),
      'variables_with_gradient': reached, 'trainable_variables': len(variables),
      'first_step_s': round(times[0], 1) if times else None,
      'median_step_s': round(statistics.median(times[1:]), 2) if len(times) > 1 else None,
      'tf_version': tf.__version__, 'cpus': os.cpu_count(), 'machine': platform.machine(),
      'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}), flush=True)


if __name__ == '__main__':
  app.run(main)
