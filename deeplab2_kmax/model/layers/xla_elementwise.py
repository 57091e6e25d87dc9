"""Element-wise chains compiled as one XLA kernel each (one pass over memory, not one per op).

TF's graph executor runs every element-wise op as its own pass over its operands, so a chain
of them on a large map (an exact GELU is five ops, its gradient nine) is bound by memory
traffic. `fused(function)` calls a small `tf.function(jit_compile=True)` of the chain from the
surrounding graph: on a [2, 161, 161, 256] float32 map the exact GELU takes 35 ms instead of
64 ms and its gradient 41 ms instead of 122 ms (2-core Xeon, TF 2.20; docs/benchmarks.md,
issue #19). A launch costs ~0.1 ms more than TF's ops, so tensors of fewer than
MIN_ELEMENTS elements run the same function as plain TF ops.

Anything that must run without XLA traces the model inside `disabled()`: a SavedModel for TF
Serving, whose model server leaves its XLA:CPU JIT off unless started with
--xla_cpu_compilation_enabled, and the ONNX and LiteRT converters.
"""

import contextlib

import tensorflow as tf

# Below this many elements an XLA launch costs more than TF's separate ops (2-core CPU).
MIN_ELEMENTS = 1 << 17
_disabled_depth = 0


@contextlib.contextmanager
def disabled():
  """Within this context, functions from `fused` trace as plain TF ops (no XLA functions)."""
  global _disabled_depth
  _disabled_depth += 1
  try:
    yield
  finally:
    _disabled_depth -= 1


def enabled():
  """Whether `fused` functions compile with XLA here (not within `disabled()`)."""
  return _disabled_depth == 0


def fused(function):
  """Returns `run(x, *args)`: `function(x, *args)`, as one XLA kernel when x is large.

  Args:
    function: An element-wise TF function of a tensor x (whose size decides) and further
      tensor or Python arguments.
  """
  compiled = tf.function(function, jit_compile=True)

  def run(x, *args):
    x = tf.convert_to_tensor(x)
    size = x.shape.num_elements()
    if not enabled() or (size is not None and size < MIN_ELEMENTS):
      return function(x, *args)
    return compiled(x, *args)

  return run
