"""CMT-DeepLab's reference-mask approximation loss (a reconstruction, see docs/cmt.md).

Each cluster center predicts a reference mask R in [0, 1] (the model outputs log R as
`reference_mask_logits`). The loss pulls the reference mask of every slot matched to a
non-void ground-truth mask towards that mask: 1 - dice(R, g) on non-void pixels, averaged over
the matched masks of the example. The matching is the one computed on the final output (the
same Hungarian permutation every other term uses).
"""

import tensorflow as tf

from deeplab2_kmax.model.loss import matching as matching_lib
from deeplab2_kmax.model.loss import targets as targets_lib


def reference_mask_loss(reference_mask_logits: tf.Tensor, targets: targets_lib.MaskTargets,
                        matching: matching_lib.Matching) -> tf.Tensor:
  """Mean 1 - dice of the matched reference masks.

  Args:
    reference_mask_logits: float [batch, P, N], log R of every slot's reference mask.
    targets: ground truth at the same P pixels (K masks).
    matching: from matching_lib.match on the final output.

  Returns:
    float32 [batch]; 0 for an example without matched masks.
  """
  reference = tf.exp(tf.cast(reference_mask_logits, tf.float32))
  reference = reference * targets.pixel_non_void[:, :, None]
  num_slots = reference.shape[-1]
  dice = matching_lib.soft_dice(targets, reference)  # [batch, K, N]
  pairs = tf.one_hot(matching.matched_slot, num_slots, dtype=tf.float32)  # -1 -> zeros
  matched_dice = tf.reduce_sum(dice * pairs, axis=2)
  is_matched = tf.reduce_sum(pairs, axis=2)
  return (tf.reduce_sum((1.0 - matched_dice) * is_matched, axis=1)
          / tf.maximum(tf.reduce_sum(is_matched, axis=1), 1.0))
