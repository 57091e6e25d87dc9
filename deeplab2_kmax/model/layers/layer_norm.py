"""Layer normalisation over the last axis (kMaX's pixel-decoder backbone norms), lean in
memory and passes.

Keras' LayerNormalization differentiates its formula op by op: in training it keeps two more
full-size tensors than its input for the backward pass (0.15 GB of the kMaX-R50 step at
641 x 641, batch 2: the stride-4 and stride-8 backbone features) and runs each element-wise
op as its own pass. Here the forward pass and its gradient are one XLA kernel each
(xla_elementwise.fused) and the backward pass keeps only the input:

    x_hat = (x - mean) * r,  r = 1 / sqrt(var + epsilon),  y = x_hat * gamma + beta,
    dx = r * (g gamma - mean(g gamma) - x_hat * mean(g gamma x_hat)),
    d gamma = sum(g x_hat),  d beta = sum(g),

means over the last axis, sums over all others; equal to Keras' gradient to float32 rounding
(tests/model/test_layers.py). Inference is the same forward kernel (Keras' layer within
`xla_elementwise.disabled()`).
"""

import tensorflow as tf

from deeplab2_kmax.model.layers import xla_elementwise


def _normalize(x, gamma, beta, epsilon):
  y = tf.cast(x, tf.float32)
  mean, variance = tf.nn.moments(y, axes=[-1], keepdims=True)
  y = (y - mean) * (tf.math.rsqrt(variance + epsilon) * gamma) + beta
  return tf.cast(y, x.dtype)


def _gradient(x, gamma, upstream, epsilon):
  y = tf.cast(x, tf.float32)
  upstream = tf.cast(upstream, tf.float32)
  mean, variance = tf.nn.moments(y, axes=[-1], keepdims=True)
  inverse_std = tf.math.rsqrt(variance + epsilon)
  normalized = (y - mean) * inverse_std
  scaled = upstream * gamma
  x_gradient = inverse_std * (
      scaled - tf.reduce_mean(scaled, axis=-1, keepdims=True)
      - normalized * tf.reduce_mean(scaled * normalized, axis=-1, keepdims=True))
  outer = list(range(len(x.shape) - 1))
  return (tf.cast(x_gradient, x.dtype), tf.reduce_sum(upstream * normalized, axis=outer),
          tf.reduce_sum(upstream, axis=outer))


_normalize_fused = xla_elementwise.fused(_normalize)
_gradient_fused = xla_elementwise.fused(_gradient)


def _normalize_keeping_input(x, gamma, beta, epsilon):
  @tf.custom_gradient
  def normalize(x, gamma, beta):
    def gradient(upstream):
      return _gradient_fused(x, gamma, upstream, epsilon)

    return _normalize_fused(x, gamma, beta, epsilon), gradient

  return normalize(x, gamma, beta)


def layer_norm(layer, x, training):
  """`layer(x)` for a keras.layers.LayerNormalization over the last axis.

  Args:
    layer: The Keras layer (holds gamma, beta and epsilon; built on its first call).
    x: [..., channels], any float dtype.
    training: Whether this is a training call (the lean backward pass).

  Returns:
    x's shape and dtype (statistics and affine map in float32).
  """
  if not (layer.built and layer.center and layer.scale
          and layer.axis in (-1, [-1], [len(x.shape) - 1])
          and not getattr(layer, 'rms_scaling', False)):
    return layer(x)
  gamma, beta = (tf.cast(tf.convert_to_tensor(v), tf.float32) for v in (layer.gamma, layer.beta))
  epsilon = float(layer.epsilon)
  if training:
    return _normalize_keeping_input(tf.convert_to_tensor(x), gamma, beta, epsilon)
  if not xla_elementwise.enabled():
    return layer(x)
  return _normalize_fused(x, gamma, beta, epsilon)
