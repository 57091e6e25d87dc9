"""Which forward tensors wait for the backward pass: the memory a training step holds."""

import tensorflow as tf


def retained_for_backward(forward, *specs):
  """Traces `forward` under a tape and its gradient w.r.t. every input.

  Args:
    forward: a function of tensors returning a tensor (summed before differentiation).
    *specs: tf.TensorSpec of each input.

  Returns:
    [(op type, shape)] of the forward ops' outputs that an op of the backward pass reads.
  """
  boundary = []

  def step(*inputs):
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      value = tf.reduce_sum(forward(*inputs))
    boundary.append(len(tf.compat.v1.get_default_graph().get_operations()))
    return tape.gradient(value, inputs)

  operations = tf.function(step).get_concrete_function(*specs).graph.get_operations()
  backward = set(operations[boundary[0]:])
  return [(op.type, tuple(output.shape) if output.shape.rank is not None else None)
          for op in operations[:boundary[0]]
          for output in op.outputs if any(c in backward for c in output.consumers())]
