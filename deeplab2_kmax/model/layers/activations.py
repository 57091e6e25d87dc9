"""Activation functions by name, with DeepLab2's meaning of each name.

DeepLab2's 'gelu' is the exact (erf) GELU; Keras 3's `keras.ops.gelu` defaults to the tanh
approximation, so the names are resolved here and never passed to Keras directly.
"""

import tensorflow as tf

from deeplab2_kmax.model.layers import xla_elementwise

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def gelu_float32(x):
  """Exact GELU of a float32 tensor, 0.5 x erfc(-x / sqrt(2)) (no cancellation for x << 0)."""
  return 0.5 * x * tf.math.erfc(-x * _INV_SQRT2)


def _gelu_in_float32(x):
  return tf.cast(gelu_float32(tf.cast(x, tf.float32)), x.dtype)


def _gelu_backward_in_float32(x, upstream, scale=None, offset=None):
  x = tf.cast(x, tf.float32)
  if scale is not None:
    x = x * scale + offset
  derivative = (0.5 * tf.math.erfc(-x * _INV_SQRT2)
                + x * _INV_SQRT_2PI * tf.exp(-0.5 * tf.square(x)))
  return tf.cast(tf.cast(upstream, tf.float32) * derivative, upstream.dtype)


fused_gelu = xla_elementwise.fused(_gelu_in_float32)
fused_gelu.__doc__ = """Exact GELU of x in x's dtype (computed in float32), one XLA kernel on
large maps; no custom gradient (use get_activation('gelu') to differentiate)."""
_gelu_backward_fused = xla_elementwise.fused(_gelu_backward_in_float32)


@tf.custom_gradient
def _exact_gelu(x):
  """0.5 x erfc(-x / sqrt(2)), with a gradient that keeps only x for the backward pass.

  Differentiating the formula op by op keeps three more full-size tensors per call (the erfc
  argument, erfc and 0.5 x) until the backward pass; in the kMaX-R50 step those
  were ~2.5 GB of the 641x641 batch-2 peak (docs/benchmarks.md, issue #19). The gradient
  gelu'(x) = Phi(x) + x phi(x) is recomputed from x instead; it equals the op-by-op one to
  float32 rounding (tests/model/test_activations.py). Forward and gradient each run as one
  XLA kernel on large maps (xla_elementwise: 2-3x faster than TF's op-by-op passes).

  Non-float32 inputs are evaluated in float32: TF's bfloat16 GELU is unvectorised on CPU (about
  3x slower than casting to float32 and back) and less accurate.
  """
  def gradient(upstream):
    return exact_gelu_backward(x, upstream)

  return fused_gelu(x), gradient


def exact_gelu_backward(x, upstream, scale=None, offset=None):
  """upstream * gelu'(y), with gelu'(y) = Phi(y) + y phi(y), in x's dtype (computed in float32).

  Args:
    x: [..., channels], any float dtype: the GELU's input y, or with `scale` and `offset`
      the tensor whose affine map y = x * scale + offset is the GELU's input (a BN's input:
      the map is then computed inside the same XLA kernel instead of as one more pass).
    upstream: The gradient of the GELU's output, x's shape.
    scale, offset: Optional float32 [channels].
  """
  args = () if scale is None else (scale, offset)
  return tf.cast(_gelu_backward_fused(x, tf.cast(upstream, x.dtype), *args), x.dtype)


def _relu_backward_in_float32(x, upstream, scale=None, offset=None):
  x = tf.cast(x, tf.float32)
  if scale is not None:
    x = x * scale + offset
  # TF's ReluGrad: the upstream gradient where the input is positive, 0 elsewhere.
  return tf.where(x > 0.0, upstream, tf.zeros_like(upstream))


_relu_backward_fused = xla_elementwise.fused(_relu_backward_in_float32)


def relu_backward(x, upstream, scale=None, offset=None):
  """upstream where y > 0, else 0, in upstream's dtype; y as in `exact_gelu_backward`."""
  args = () if scale is None else (scale, offset)
  return _relu_backward_fused(x, tf.cast(upstream, x.dtype), *args)


# The activations whose gradient a BN + activation training step (normalization.py) and the
# recomputed activations (recomputed_activation.py) compute from the BN's input.
_BACKWARD = {'gelu': exact_gelu_backward, 'relu': relu_backward}
_FLOAT32_FORWARD = {'gelu': gelu_float32, 'relu': tf.nn.relu, None: lambda x: x}


def has_input_gradient(name):
  """Whether `backward(name, ...)` exists: the activation's gradient from its input alone."""
  return name is not None and name.lower() in _BACKWARD


def backward(name, x, upstream, scale=None, offset=None):
  """The gradient of activation `name` ('gelu' or 'relu') at y = x (* scale + offset)."""
  return _BACKWARD[name.lower()](x, upstream, scale=scale, offset=offset)


def without_gradient(name, x):
  """Activation `name` ('gelu' or 'relu') of x, for callers that differentiate it by hand."""
  return fused_gelu(x) if name.lower() == 'gelu' else tf.nn.relu(x)


def _affine_then_activation(x, scale, offset, name, residual=None):
  y = tf.cast(x, tf.float32) * scale + offset
  if residual is not None:
    y = y + tf.cast(residual, tf.float32)
  return tf.cast(_FLOAT32_FORWARD[name](y), x.dtype)


_affine_then_activation_fused = xla_elementwise.fused(_affine_then_activation)


def affine_then_activation(name, x, scale, offset, residual=None):
  """activation(x * scale + offset [+ residual]) in x's dtype, computed in float32 as one XLA
  kernel on large maps (no gradient of its own: the callers differentiate it by hand).

  Args:
    name: 'gelu' (exact), 'relu' or None (none).
    x: [..., channels], any float dtype.
    scale, offset: float32, broadcasting against x (per channel: [channels]).
    residual: Optional, x's shape.
  """
  return _affine_then_activation_fused(x, tf.cast(scale, tf.float32),
                                       tf.cast(offset, tf.float32),
                                       None if name is None else name.lower(), residual)


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
