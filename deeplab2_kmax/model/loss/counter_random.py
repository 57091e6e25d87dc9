"""Seeded uniform noise that is bit-identical in eager, graph and XLA-compiled code.

TensorFlow's stateless random ops are deterministic per seed, but their XLA kernels draw other
numbers than the regular kernels: `tf.random.stateless_uniform` with the same seed and the same
Philox algorithm gave completely different values inside `tf.function(jit_compile=True)` on
CPU (TF 2.20, measured 2026-11-24). A loss that samples with them therefore sees other samples,
and has another gradient, when the train step is XLA-compiled.

Here each element's 32 random bits are an integer hash of (seed, flat element index), computed
with uint32 xor, shift and multiply only, which every backend evaluates exactly; the bits become
a float32 without rounding. The hash is Wellons' `lowbias32` (a bijection of uint32 with full
avalanche), applied twice with the seed folded in, so within one draw distinct elements get
distinct bits.
"""

import tensorflow as tf

# 2^32 / golden ratio: spreads small consecutive seeds over the uint32 range.
_GOLDEN = 0x9E3779B9


def _lowbias32(x: tf.Tensor) -> tf.Tensor:
  """Wellons' lowbias32 integer hash of uint32 `x` (elementwise)."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
  x = x * tf.constant(0x7FEB352D, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
  x = x * tf.constant(0x846CA68B, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def uniform(shape, seed: tf.Tensor) -> tf.Tensor:
  """float32 noise of `shape`, uniform on (0, 1) in steps of 2^-23, a function of `seed` only.

  Args:
    shape: the output shape (a list or an int32 tensor; may be dynamic).
    seed: int32 or int64 [2].

  Returns:
    float32 `shape`, every value in [2^-24, 1 - 2^-24] (so log(u) and log(1 - u) are finite).
  """
  seed = tf.cast(tf.cast(seed, tf.int64) % (2 ** 32), tf.uint32)
  key = _lowbias32(tf.bitwise.bitwise_xor(seed[0], tf.constant(_GOLDEN, tf.uint32)))
  key = _lowbias32(tf.bitwise.bitwise_xor(key, seed[1]))
  size = tf.reduce_prod(tf.cast(shape, tf.int32))
  counter = tf.cast(tf.range(size), tf.uint32)
  bits = _lowbias32(_lowbias32(tf.bitwise.bitwise_xor(counter, key)) + key)
  # The top 23 bits, centred in their 2^-23 step: top + 0.5 fits float32's 24-bit significand,
  # so no rounding happens anywhere.
  top = tf.cast(tf.bitwise.right_shift(bits, tf.constant(9, tf.uint32)), tf.float32)
  return tf.reshape((top + 0.5) * (2.0 ** -23), shape)
