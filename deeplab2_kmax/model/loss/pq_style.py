"""PQ-style loss (MaX-DeepLab): a class term and a mask dice term (reference §4.4).

PQ multiplies recognition quality by segmentation quality; the loss mirrors that by weighting
each term with the (stop-gradient) other quality of the matched pair:
- class term: per slot, softmax cross-entropy against the matched mask's class (void for
  unmatched slots), weighted by the matched dice (matched slots) or by the share of the slot's
  mask that lies on void pixels (unmatched slots), each floored at 1e-5; focal alpha 0.75 for
  non-void targets and 0.25 for void ones; averaged over the non-zero slots.
- mask dice term: per ground-truth mask, 1 - dice of the matched slot's softmax mask, weighted
  by the matched class probability (floored at 1e-5), summed over masks and scaled by
  alpha / N.
"""

from typing import Optional

import tensorflow as tf

from deeplab2_kmax.model.loss import matching as matching_lib
from deeplab2_kmax.model.loss import reduction
from deeplab2_kmax.model.loss import slot_softmax
from deeplab2_kmax.model.loss import targets as targets_lib

_WEIGHT_FLOOR = 1e-5


def class_term(class_logits: tf.Tensor, class_target: tf.Tensor, slot_is_matched: tf.Tensor,
               matched_mask_dice: tf.Tensor, void_ratio: tf.Tensor,
               focal_alpha: float = 0.75) -> tf.Tensor:
  """Weighted class cross-entropy of every slot.

  Args:
    class_logits: float [batch, N, num_classes + 1], void last.
    class_target: float32 [batch, N, num_classes + 1] one-hot targets.
    slot_is_matched: float32 [batch, N], 1 for slots matched to a non-void mask.
    matched_mask_dice: float32 [batch, N] dice with the matched mask.
    void_ratio: float32 [batch, N] share of each slot's mask on void pixels.
    focal_alpha: weight of non-void targets; void targets get 1 - alpha.

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  class_logits = tf.cast(class_logits, tf.float32)
  cross_entropy = tf.nn.softmax_cross_entropy_with_logits(
      labels=tf.stop_gradient(class_target), logits=class_logits)
  target_is_void = class_target[..., -1]
  alpha = focal_alpha * (1.0 - target_is_void) + (1.0 - focal_alpha) * target_is_void
  weight = (slot_is_matched * tf.maximum(matched_mask_dice, _WEIGHT_FLOOR)
            + (1.0 - slot_is_matched) * tf.maximum(void_ratio, _WEIGHT_FLOOR))
  return reduction.mean_over_nonzero(cross_entropy * alpha * tf.stop_gradient(weight))


def mask_dice_term(mask_logits: tf.Tensor, targets: targets_lib.MaskTargets,
                   slots: matching_lib.SlotTargets, matched_class_prob: tf.Tensor,
                   focal_alpha: float = 0.75,
                   log_normaliser: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Weighted dice loss of each ground-truth mask against its matched slot.

  Args:
    mask_logits: float [batch, P, N] mask logits (final or auxiliary output), slot order.
    targets: the K ground-truth masks at the P pixels.
    slots: the matching in slot order (matching_lib.slot_targets); a mask whose slot is
      padding has a probability of 0 everywhere.
    matched_class_prob: float32 [batch, K], the weight of each mask (floored at 1e-5).
    focal_alpha: the class term's alpha, reused in the scale alpha / N.
    log_normaliser: optional float32 [batch, P], `slot_softmax.log_sum_exp(mask_logits)` when
      the caller has it (the mask-ID cross-entropy needs it too).

  Returns:
    float32 [batch], unscaled by the loss weight.
  """
  mask_logits = tf.cast(mask_logits, tf.float32)
  num_slots = mask_logits.shape[-1]
  if log_normaliser is None:
    log_normaliser = slot_softmax.log_sum_exp(mask_logits)
  # Only pixels that belong to some ground-truth mask take part (void and crowd do not).
  slot_mass = slot_softmax.softmax_mass(mask_logits, log_normaliser, slots.pixel_in_mask)
  mask_mass = tf.gather(slot_mass, slots.mask_slot, batch_dims=1) * slots.mask_slot_is_real
  pixel_prob = tf.exp(matching_lib.logit_of_pixel_slot(mask_logits, slots) - log_normaliser)
  intersection = matching_lib.sum_per_mask(pixel_prob, targets)
  total = mask_mass + targets.mask_area
  dice_loss = 1.0 - (2.0 * intersection + 1.0) / (total + 1.0)
  weight = targets.mask_non_void * tf.maximum(matched_class_prob, _WEIGHT_FLOOR)
  return tf.reduce_sum(dice_loss * tf.stop_gradient(weight), axis=-1) * (focal_alpha / num_slots)
