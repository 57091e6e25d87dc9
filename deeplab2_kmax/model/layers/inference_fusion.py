"""Inference-only fusion of element-wise chains (batch-norm affine + exact GELU, ...) with XLA.

At inference a batch norm is a per-channel affine map, and DeepLab2's exact GELU,
0.5 x (1 + erf(x / sqrt(2))), is five element-wise TF ops (seven in bfloat16, with the casts
around a float32 erf). TF's graph executor runs each op as its own pass over memory, so on the
kMaX decoders' large maps these chains cost more than the convolutions before them. Grappler
fuses a convolution with a following BN and ReLU, but not with a GELU, and on CPU not with
a bfloat16 BN at all. Here each chain becomes one small XLA function (one loop, float32 inside,
called from the surrounding graph, `xla_elementwise.fused`): on a 161 x 161 x 256 bfloat16 map
the GELU takes 2.9 ms instead of 8.6 ms.

Nothing here runs when `training` (training fuses its own GELU and gradient: activations.py).
"""

import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import recomputed_activation
from deeplab2_kmax.model.layers import xla_elementwise


def is_active(training):
  """Whether inference chains are fused: not in training, and not within
  `xla_elementwise.disabled()`."""
  return not training and xla_elementwise.enabled()


def is_fusable(activation, training):
  """Whether a BN + `activation` (a name) chain is fused: at inference, for the exact GELU."""
  return is_active(training) and activation is not None and activation.lower() == 'gelu'


def _affine_add(x, scale, offset, residual):
  y = tf.cast(x, tf.float32) * scale + offset + tf.cast(residual, tf.float32)
  return tf.cast(y, x.dtype)


def _affine_l2_normalize(x, scale, offset):
  y = tf.cast(x, tf.float32) * scale + offset
  # tf.math.l2_normalize's form: y / sqrt(max(sum(y^2), 1e-12)).
  return y * tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(y), axis=-1, keepdims=True),
                                      1e-12))


def _affine_to_float32(x, scale, offset):
  return tf.cast(x, tf.float32) * scale + offset


_FUSED = {function: xla_elementwise.fused(function) for function in (
    _affine_add, _affine_l2_normalize, _affine_to_float32)}


def _run(function, x, *args):
  return _FUSED[function](x, *args)


def _float32(*tensors):
  return [tf.cast(t, tf.float32) for t in tensors]


def affine_gelu(x, scale, offset):
  """Exact gelu(x * scale + offset) in x's dtype, computed in float32.

  Args:
    x: [..., channels] tensor (any float dtype).
    scale, offset: [channels], e.g. `BatchNorm.inference_scale_offset()`.
  """
  return activations.affine_then_activation('gelu', x, scale, offset)


def gelu(x):
  """Exact GELU of x in x's dtype, computed in float32."""
  return activations.fused_gelu(x)


def normalize_and_activate(x, batch_norm, activation_name, activation_fn, training):
  """activation_fn(batch_norm(x)), as one fused step for a BN + exact GELU at inference."""
  if batch_norm.built and is_fusable(activation_name, training):
    return affine_gelu(x, *batch_norm.inference_scale_offset())
  if training and activations.has_input_gradient(activation_name):
    return batch_norm(x, training=training, then_activation=activation_name)
  return activation_fn(batch_norm(x, training=training))


def activation(x, name, training, fallback):
  """`name`(x), fused when `is_fusable(name, training)`; else fallback(x) (an exact GELU in
  training marked for a following convolution to recompute: recomputed_activation.activate)."""
  if is_fusable(name, training):
    return gelu(x)
  if training and activations.has_input_gradient(name):
    return recomputed_activation.activate(x, name.lower())
  return fallback(x)


def affine_add(x, scale, offset, residual):
  """x * scale + offset + residual in x's dtype (a BN'd residual branch joining its shortcut).

  Args:
    x: [..., channels]; residual: a tensor of x's shape.
    scale, offset: [channels].
  """
  return _run(_affine_add, x, *_float32(scale, offset), residual)


def affine_l2_normalize(x, scale, offset):
  """float32 tf.math.l2_normalize(x * scale + offset, axis=-1).

  Args:
    x: [..., channels]; scale, offset: [channels].
  """
  return _run(_affine_l2_normalize, x, *_float32(scale, offset))


def affine_to_float32(x, scale, offset):
  """float32 x * scale + offset; scale and offset broadcast against x's last axis."""
  return _run(_affine_to_float32, x, *_float32(scale, offset))
