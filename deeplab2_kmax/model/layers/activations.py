"""Activation functions by name, with DeepLab2's meaning of each name.

DeepLab2's 'gelu' is the exact (erf) GELU; Keras 3's `keras.ops.gelu` defaults to the tanh
approximation, so the names are resolved here and never passed to Keras directly.
"""

import tensorflow as tf


def _exact_gelu(x):
  if x.dtype == tf.float32:
    return tf.nn.gelu(x, approximate=False)
  # 0.5 x (1 + erf(x / sqrt(2))) evaluated in float32: TF's bfloat16 GELU is unvectorised on
  # CPU (about 3x slower than casting to float32 and back) and less accurate.
  y = tf.cast(x, tf.float32)
  y = 0.5 * y * (1.0 + tf.math.erf(y * 0.7071067811865476))
  return tf.cast(y, x.dtype)


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
