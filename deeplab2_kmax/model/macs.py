"""Counts multiply-accumulates of a Keras model's forward pass from its TF graph.

The model is traced once with a static input shape; every Conv2D, DepthwiseConv2dNative,
MatMul, BatchMatMul and Einsum op contributes its MACs (for an einsum, the product of the sizes
of all its indices). Element-wise ops, normalisations and resizes are not counted, as in the
usual MAC figures of papers (and DeepLab2's analytic count). Only ops the outputs depend on
are counted (at inference the auxiliary class heads of the transformer decoder are dead code).
Dilated convolutions are counted as TF runs them (space-to-batch on the padded grid), as
DeepLab2's count does.
"""

import collections
import re

import numpy as np
import tensorflow as tf


def _static_shape(tensor):
  shape = tensor.shape
  if shape.rank is None or any(d is None for d in shape.as_list()):
    return None
  return shape.as_list()


def _einsum_macs(equation, shapes):
  inputs, _ = equation.replace(' ', '').split('->')
  sizes = {}
  for letters, shape in zip(inputs.split(','), shapes):
    if '.' in letters:
      return None  # ellipsis equations are not used by our layers
    for letter, size in zip(letters, shape):
      sizes[letter] = size
  return int(np.prod(list(sizes.values()), dtype=np.int64))


def op_macs(op):
  """MACs of one graph op (0 for ops that are not multiply-accumulate heavy)."""
  kind = op.type
  if kind in ('Conv2D', 'DepthwiseConv2dNative'):
    output = _static_shape(op.outputs[0])
    kernel = _static_shape(op.inputs[1])
    if output is None or kernel is None:
      return 0
    if kind == 'Conv2D':
      return int(np.prod(output, dtype=np.int64)) * kernel[0] * kernel[1] * kernel[2]
    return int(np.prod(output, dtype=np.int64)) * kernel[0] * kernel[1]
  if kind == 'MatMul':
    a = _static_shape(op.inputs[0])
    output = _static_shape(op.outputs[0])
    if a is None or output is None:
      return 0
    inner = a[0] if op.get_attr('transpose_a') else a[1]
    return output[0] * output[1] * inner
  if kind in ('BatchMatMul', 'BatchMatMulV2', 'BatchMatMulV3'):
    a = _static_shape(op.inputs[0])
    output = _static_shape(op.outputs[0])
    if a is None or output is None:
      return 0
    inner = a[-2] if op.get_attr('adj_x') else a[-1]
    return int(np.prod(output, dtype=np.int64)) * inner
  if kind == 'Einsum':
    shapes = [_static_shape(t) for t in op.inputs]
    if any(s is None for s in shapes):
      return 0
    equation = op.get_attr('equation').decode()
    return _einsum_macs(equation, shapes) or 0
  return 0


def _live_ops(graph, outputs):
  """Ops the outputs depend on (what a graph optimiser keeps), in graph order."""
  live = set()
  stack = [t.op for t in outputs]
  while stack:
    op = stack.pop()
    if op.name in live:
      continue
    live.add(op.name)
    stack.extend(t.op for t in op.inputs)
    stack.extend(op.control_inputs)
  return [op for op in graph.get_operations() if op.name in live]


def _walk(graph, counts, scope_counts, outputs=None):
  ops = graph.get_operations() if outputs is None else _live_ops(graph, outputs)
  for op in ops:
    macs = op_macs(op)
    if macs:
      counts[op.type] += macs
      scope = re.sub(r'^(?:StatefulPartitionedCall/)*', '', op.name).split('/')
      scope_counts['/'.join(scope[:3])] += macs
    # Nested functions (tf.function / control flow) have their own graphs.
    for attr in ('then_branch', 'else_branch', 'body', 'f'):
      try:
        function_name = op.get_attr(attr).name
      except (ValueError, AttributeError, TypeError):
        continue
      function = graph._get_function(function_name)  # pylint: disable=protected-access
      if function is not None and hasattr(function, 'graph'):
        _walk(function.graph, counts, scope_counts)


def count_macs(model, input_shape, training=False):
  """Returns (total MACs, {op type: MACs}, {scope: MACs}) of model(zeros(input_shape)).

  Args:
    model: A built Keras model (or layer) taking one image tensor.
    input_shape: Static input shape, e.g. [1, 641, 641, 3].
    training: Forward mode to trace.
  """
  function = tf.function(lambda x: model(x, training=training))
  concrete = function.get_concrete_function(tf.TensorSpec(input_shape, tf.float32))
  counts = collections.Counter()
  scope_counts = collections.Counter()
  _walk(concrete.graph, counts, scope_counts, outputs=concrete.outputs)
  return int(sum(counts.values())), dict(counts), dict(scope_counts)
