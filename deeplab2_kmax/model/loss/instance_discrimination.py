"""Instance discrimination losses on the normalised pixel features (reference §4.5).

Two forms:
- MaX-DeepLab (`sample_k = 0`): each ground-truth mask's mean feature, L2-normalised, is a
  class prototype; every thing pixel is classified among the non-void masks by
  feature . prototype / temperature (softmax cross-entropy).
- Pixel-contrastive (CMT/kMaX, `sample_k > 0`): k pixels per image are sampled without
  replacement with Gumbel-top-k on `sample_temperature * log(inverse mask area)` (so a
  temperature > 1 favours small masks; void pixels are never drawn while valid ones remain);
  each sampled pixel's target is the uniform distribution over the sampled pixels of its own
  mask (itself included), and its prediction the softmax of feature dot products /
  temperature. Things and stuff both count.
"""

from typing import Optional

import tensorflow as tf

from deeplab2_kmax.model.layers import xla_elementwise
from deeplab2_kmax.model.loss import counter_random
from deeplab2_kmax.model.loss import reduction
from deeplab2_kmax.model.loss import targets as targets_lib

_MASKED_LOGIT = -99999.0


def prototype_instance_discrimination(pixel_feature: tf.Tensor,
                                      targets: targets_lib.MaskTargets,
                                      temperature: float = 0.3,
                                      top_k_percent: float = 1.0) -> tf.Tensor:
  """MaX-DeepLab's instance discrimination.

  Args:
    pixel_feature: float [batch, P, D] L2-normalised pixel features.
    targets: ground truth at the features' resolution.
    temperature: softmax temperature.
    top_k_percent: fraction of hardest pixels kept.

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  feature = tf.cast(pixel_feature, tf.float32)
  gt_masks = targets.pixel_mask_one_hot
  prototypes = (tf.einsum('bpd,bpk->bkd', feature, gt_masks)
                / tf.maximum(targets.mask_area, 1.0)[:, :, None])
  prototypes = tf.math.l2_normalize(prototypes, axis=-1)
  logits = tf.einsum('bpd,bkd->bpk', feature, prototypes) / temperature
  non_void = targets.mask_non_void[:, None, :]
  logits = logits * non_void + (1.0 - non_void) * _MASKED_LOGIT
  cross_entropy = tf.nn.softmax_cross_entropy_with_logits(labels=gt_masks, logits=logits)
  return reduction.mean_over_nonzero(cross_entropy * targets.pixel_thing, top_k_percent)


def gumbel_top_k(logits: tf.Tensor, k: int, seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Samples k indices per row without replacement, P(i first) = softmax(logits)_i.

  Args:
    logits: float32 [batch, P].
    k: number of samples, <= P.
    seed: optional int32 [2] for reproducible sampling: the same draw in eager, graph and
      XLA-compiled code (counter_random.py says why TF's stateless ops do not give that).

  Returns:
    int32 [batch, k].
  """
  if seed is None:
    uniform = tf.random.uniform(tf.shape(logits), minval=1e-20, maxval=1.0)
  else:
    uniform = counter_random.uniform(tf.shape(logits), seed)
  gumbel = -tf.math.log(-tf.math.log(uniform))
  return tf.math.top_k(logits + gumbel, k=k).indices


def pixel_contrastive_instance_discrimination(
    pixel_feature: tf.Tensor, targets: targets_lib.MaskTargets, sample_k: int,
    sample_temperature: float = 0.6, temperature: float = 0.3, top_k_percent: float = 1.0,
    seed: Optional[tf.Tensor] = None, sample_indices: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Pixel-contrastive instance discrimination.

  Args:
    pixel_feature: float [batch, P, D] L2-normalised pixel features.
    targets: ground truth at the features' resolution.
    sample_k: pixels sampled per image (<= P).
    sample_temperature: multiplies log(inverse mask area) in the sampling logits.
    temperature: softmax temperature of the feature similarities.
    top_k_percent: fraction of hardest sampled pixels kept.
    seed: optional int32 [2] for reproducible sampling.
    sample_indices: optional int32 [batch, sample_k] pixels to use instead of sampling
      (tests, or to share one draw between outputs).

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  num_pixels = pixel_feature.shape[1]
  if not 0 < sample_k <= num_pixels:
    raise ValueError(f'instance_discrimination_sample_k must be in [1, {num_pixels}] (the '
                     f'pixels at the output resolution), got {sample_k}.')
  if sample_indices is None:
    sample_indices = sample_pixels(targets, sample_k, sample_temperature, seed)
  feature = tf.gather(tf.cast(pixel_feature, tf.float32), sample_indices, batch_dims=1)
  masks = tf.gather(targets.pixel_mask_one_hot, sample_indices, batch_dims=1)
  # Cross-entropy against the uniform target over the n_i sampled pixels of i's mask:
  #   CE_i = logsumexp_j(logit_ij) - (1 / n_i) sum_{j in mask(i)} logit_ij,
  # and the second sum is f_i . (sum of the features of mask(i)) / temperature. Pooling the
  # features per mask ([batch, K, D]) avoids the [k, k] target matrix (and the [k, k, K]
  # product building it): ~4x faster forward, ~1.7x with backward, than the dense
  # softmax_cross_entropy_with_logits at k = 4096 on CPU. A pixel outside every mask
  # (void, drawn only when too few valid pixels exist) has no target and loss 0.
  log_sum_exp = similarity_log_sum_exp(feature, temperature)
  mask_feature_sums = tf.einsum('bjk,bjd->bkd', masks, feature)
  same_mask_feature_sum = tf.einsum('bik,bkd->bid', masks, mask_feature_sums)
  same_mask_count = tf.einsum('bik,bk->bi', masks, tf.reduce_sum(masks, axis=1))
  positive = (tf.reduce_sum(feature * same_mask_feature_sum, axis=-1)
              / (temperature * tf.maximum(same_mask_count, 1.0)))
  cross_entropy = tf.where(same_mask_count > 0, log_sum_exp - positive, 0.0)
  return reduction.mean_over_nonzero(cross_entropy, top_k_percent)


def _row_log_sum_exp_of(logits):
  row_max = tf.reduce_max(logits, axis=-1, keepdims=True)
  return tf.math.log(tf.reduce_sum(tf.exp(logits - row_max), axis=-1)) + row_max[..., 0]


def _softmax_times_upstream_of(logits, log_sum_exp, upstream):
  return upstream[..., None] * tf.exp(logits - log_sum_exp[..., None])


# Each a pass or two over the [batch, k, k] logits as one XLA kernel, instead of TF's separate
# max, subtract, exp and sum passes (0.31 -> 0.23 s forward, 0.51 -> 0.38 s backward at
# k = 4096, batch 2, for each of kMaX's seven outputs; docs/benchmarks.md, issue #19).
_row_log_sum_exp = xla_elementwise.fused(_row_log_sum_exp_of)
_softmax_times_upstream = xla_elementwise.fused(_softmax_times_upstream_of)


def similarity_log_sum_exp(feature: tf.Tensor, temperature: float) -> tf.Tensor:
  """logsumexp_j(f_i . f_j / temperature) for every row i, without keeping [k, k] tensors.

  Differentiating the formula op by op keeps the logits and their exponentials (two float32
  [batch, k, k] tensors, 256 MB at k = 4096 and batch 2, for each of kMaX's seven outputs)
  until the backward pass. Here the backward pass recomputes them from the features
  ([batch, k, D]) instead:
    d lse_i / d f_m = (sum_j P_mj f_j [i = m] + P_im f_i) / temperature,  P = softmax(logits),
  which equals the op-by-op gradient to float32 rounding (tests/model/loss).

  Args:
    feature: float32 [batch, k, D].
    temperature: softmax temperature.

  Returns:
    float32 [batch, k].
  """

  def similarities(values):
    # The temperature scales the [batch, k, D] operand, not the [batch, k, k] product.
    return tf.einsum('bid,bjd->bij', values / temperature, values)

  @tf.custom_gradient
  def log_sum_exp(values):
    result = _row_log_sum_exp(similarities(values))

    def gradient(upstream):
      # Only `values` and the [batch, k] result are kept from the forward pass.
      weights = _softmax_times_upstream(similarities(values), result, upstream)
      return (tf.einsum('bij,bjd->bid', weights, values)
              + tf.einsum('bij,bid->bjd', weights, values)) / temperature

    return result, gradient

  return log_sum_exp(feature)


def sample_pixels(targets: targets_lib.MaskTargets, sample_k: int,
                  sample_temperature: float, seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Draws the pixels of the pixel-contrastive loss; int32 [batch, sample_k]."""
  logits = tf.math.log(targets.inverse_pixel_mask_area) * sample_temperature
  logits += (1.0 - targets.pixel_non_void) * _MASKED_LOGIT
  return gumbel_top_k(logits, sample_k, seed)
