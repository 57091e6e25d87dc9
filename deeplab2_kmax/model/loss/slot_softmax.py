"""The per-pixel softmax over mask slots, in forms whose backward pass keeps only the logits.

The mask-ID cross-entropy and the dice term both read the softmax of the mask logits
[batch, P, N] over the N slots. Differentiated op by op, each log-sum-exp and each `exp` keeps
its own [batch, P, N] float32 tensor until the backward pass: three per output, 0.5 GB for
kMaX's seven outputs at 641x641, batch 2 (docs/benchmarks.md, issue #19). The logits are kept
anyway (they are the model's output), so these functions recompute the exponentials from them
in the backward pass; their gradients equal the op-by-op ones to float32 rounding
(tests/model/loss/test_loss_terms.py).
"""

import tensorflow as tf


def log_sum_exp(logits: tf.Tensor) -> tf.Tensor:
  """log sum_n exp(logits[..., n]); float32 [..., N] -> [...]."""

  @tf.custom_gradient
  def forward(values):
    row_max = tf.reduce_max(values, axis=-1, keepdims=True)
    result = tf.math.log(tf.reduce_sum(tf.exp(values - row_max), axis=-1)) + row_max[..., 0]

    def gradient(upstream):
      return upstream[..., None] * tf.exp(values - result[..., None])

    return result, gradient

  return forward(logits)


def softmax_mass(logits: tf.Tensor, log_normaliser: tf.Tensor,
                 pixel_weight: tf.Tensor) -> tf.Tensor:
  """Each slot's softmax probability summed over the pixels, weighted.

  Args:
    logits: float32 [batch, P, N].
    log_normaliser: float32 [batch, P], `log_sum_exp(logits)`.
    pixel_weight: float32 [batch, P] (no gradient).

  Returns:
    float32 [batch, N]: sum_p exp(logits[b, p, n] - log_normaliser[b, p]) * pixel_weight[b, p].
  """
  pixel_weight = tf.stop_gradient(pixel_weight)

  @tf.custom_gradient
  def forward(values, normaliser):
    def weighted_probabilities():
      return tf.exp(values - normaliser[..., None]) * pixel_weight[..., None]

    def gradient(upstream):
      values_gradient = weighted_probabilities() * upstream[:, None, :]
      return values_gradient, -tf.reduce_sum(values_gradient, axis=-1)

    return tf.reduce_sum(weighted_probabilities(), axis=1), gradient

  return forward(logits, log_normaliser)
