"""Activation functions by name, with DeepLab2's meaning of each name.

DeepLab2's 'gelu' is the exact (erf) GELU; Keras 3's `keras.ops.gelu` defaults to the tanh
approximation, so the names are resolved here and never passed to Keras directly.
"""

import tensorflow as tf


_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_float32(x):
  return 0.5 * x * tf.math.erfc(-x * _INV_SQRT2)


@tf.custom_gradient
def _exact_gelu(x):
  """0.5 x erfc(-x / sqrt(2)), with a gradient that keeps only x for the backward pass.

  Differentiating the formula op by op keeps three more full-size tensors per call (the erfc
  argument, erfc and 0.5 x) until the backward pass; in the kMaX-R50 step those
  were ~2.5 GB of the 641x641 batch-2 peak (docs/benchmarks.md, issue #19). The gradient
  gelu'(x) = Phi(x) + x phi(x) is recomputed from x instead; it equals the op-by-op one to
  float32 rounding (tests/model/test_activations.py).

  Non-float32 inputs are evaluated in float32: TF's bfloat16 GELU is unvectorised on CPU (about
  3x slower than casting to float32 and back) and less accurate.
  """
  y = tf.cast(_gelu_float32(tf.cast(x, tf.float32)), x.dtype)

  def gradient(upstream):
    return exact_gelu_backward(x, upstream)

  return y, gradient


def exact_gelu_backward(x, upstream):
  """upstream * gelu'(x), with gelu'(x) = Phi(x) + x phi(x), in x's dtype (computed in
  float32)."""
  x32 = tf.cast(x, tf.float32)
  derivative = (0.5 * tf.math.erfc(-x32 * _INV_SQRT2)
                + x32 * _INV_SQRT_2PI * tf.exp(-0.5 * tf.square(x32)))
  return tf.cast(tf.cast(upstream, tf.float32) * derivative, x.dtype)


def _approximate_gelu(x):
  return tf.nn.gelu(x, approximate=True)


def _identity(x):
  return x


_ACTIVATIONS = {
    'gelu': _exact_gelu,
    'approximated_gelu': _approximate_gelu,
    'relu': tf.nn.relu,
    'relu6': tf.nn.relu6,
    'swish': tf.nn.silu,
    'silu': tf.nn.silu,
    'elu': tf.nn.elu,
    'sigmoid': tf.math.sigmoid,
    'softmax': tf.nn.softmax,
    'none': _identity,
    'identity': _identity,
}


def get_activation(name):
  """Returns the function for an activation name ('gelu' is exact; None or 'none' is identity)."""
  key = 'none' if name is None else name.lower()
  if key not in _ACTIVATIONS:
    raise ValueError(f'Unsupported activation "{name}"; use one of {sorted(_ACTIVATIONS)}.')
  return _ACTIVATIONS[key]
