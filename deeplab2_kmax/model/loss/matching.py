"""Hungarian matching of predicted mask slots to ground-truth masks (reference §4.3).

The cost of giving ground-truth mask i (class c_i) to slot j is `-dice(g_i, p_j) * q_j(c_i)`,
with p = softmax over slots of the mask logits on valid pixels and q = softmax of the slot's
class logits. The K x N cost is padded to a square S = max(K, N): void ground-truth rows get
-999 when there are at least as many slots as masks (so they soak up the left-over slots at no
cost to the real rows) and +999 otherwise (so real masks get the scarce slots), then the rest of
the square is -999. The matching is computed once, on the final output, and reused for every
auxiliary output.
"""

from typing import NamedTuple

import tensorflow as tf

from deeplab2_kmax.model.layers import segment_sum
from deeplab2_kmax.model.layers import xla_elementwise
from deeplab2_kmax.model.loss import hungarian
from deeplab2_kmax.model.loss import targets as targets_lib

# The matcher's data-dependent while loops run about 7x faster compiled by XLA than as graph
# ops on CPU (docs/benchmarks.md, Hungarian matching), whether or not the train step is.
_linear_sum_assignment = tf.function(hungarian.linear_sum_assignment, jit_compile=True)

_NEGATIVE_PAD = -999.0
_POSITIVE_PAD = 999.0
_DICE_EPSILON = 1e-5
# Logit of a padding slot (there are fewer slots than masks): softmax gives it no mass.
_PADDED_SLOT_LOGIT = -99999.0


class Matching(NamedTuple):
  """The assignment and the stop-gradient weights derived from it.

  Attributes:
    slot_of_square_row: int32 [batch, S]: the (padded) slot assigned to each (padded)
      ground-truth row of the square problem; slots >= N are padding.
    matched_slot: int32 [batch, K]: slot of each non-void ground-truth mask, -1 if none.
    slot_class_target: float32 [batch, N, num_classes + 1]: one-hot class target per slot,
      the matched mask's class channel or the void channel (last) for unmatched slots.
    slot_is_matched: float32 [batch, N], 1 for slots matched to a non-void mask.
    matched_mask_dice: float32 [batch, N], dice of each slot with its matched mask (0 if none).
    matched_class_prob: float32 [batch, K], probability that the matched slot gives to the
      mask's class (0 for void or unmatched masks).
    void_ratio: float32 [batch, N], share of each slot's soft mask on void pixels.
  """
  slot_of_square_row: tf.Tensor
  matched_slot: tf.Tensor
  slot_class_target: tf.Tensor
  slot_is_matched: tf.Tensor
  matched_mask_dice: tf.Tensor
  matched_class_prob: tf.Tensor
  void_ratio: tf.Tensor


def soft_dice(targets: targets_lib.MaskTargets, pred_masks: tf.Tensor) -> tf.Tensor:
  """Dice similarity of every ground-truth mask with every soft predicted mask.

  Args:
    targets: the K ground-truth masks at the P pixels.
    pred_masks: float32 [batch, P, N] soft masks in [0, 1].

  Returns:
    float32 [batch, K, N]: sum(g p) / ((sum g + sum p) / 2 + 1e-5).
  """
  intersection = sum_per_mask(pred_masks, targets)
  half_total = (targets.mask_area[:, :, None]
                + tf.reduce_sum(pred_masks, axis=1)[:, None, :]) / 2.0
  return intersection / (half_total + _DICE_EPSILON)


def match(targets: targets_lib.MaskTargets, mask_logits: tf.Tensor,
          class_logits: tf.Tensor) -> Matching:
  """Matches slots to ground-truth masks.

  Args:
    targets: ground truth at the output resolution (K masks, P pixels).
    mask_logits: float [batch, P, N] mask logits of the final output.
    class_logits: float [batch, N, num_classes + 1] class logits, void last.

  Returns:
    Matching; every tensor in it is stop-gradient.
  """
  mask_logits = tf.stop_gradient(tf.cast(mask_logits, tf.float32))
  class_logits = tf.stop_gradient(tf.cast(class_logits, tf.float32))
  num_masks = targets.pixel_mask_one_hot.shape[-1]
  num_slots = mask_logits.shape[-1]
  num_classes = class_logits.shape[-1] - 1
  size = max(num_masks, num_slots)

  mask_probs = tf.nn.softmax(mask_logits, axis=-1)
  dice = soft_dice(targets, mask_probs * targets.pixel_non_void[:, :, None])
  class_probs = tf.nn.softmax(class_logits, axis=-1)[:, :, :num_classes]
  gt_class_one_hot = tf.one_hot(targets.mask_class_index, num_classes)  # Void -> zeros.
  class_similarity = tf.einsum('bkc,bnc->bkn', gt_class_one_hot, class_probs)
  non_void_rows = targets.mask_non_void[:, :, None]
  fill = _NEGATIVE_PAD if num_slots >= num_masks else _POSITIVE_PAD
  cost = -dice * class_similarity * non_void_rows + (1.0 - non_void_rows) * fill
  cost = tf.pad(cost, [[0, 0], [0, size - num_masks], [0, size - num_slots]],
                constant_values=_NEGATIVE_PAD)
  slot_of_square_row = _linear_sum_assignment(cost)  # [batch, size], all assigned.

  slot_of_mask = slot_of_square_row[:, :num_masks]
  matched = tf.logical_and(slot_of_mask < num_slots, targets.mask_non_void > 0.5)
  matched_slot = tf.where(matched, slot_of_mask, -1)
  # [batch, K, N] 0/1 matrix of the real, non-void pairs.
  pairs = tf.one_hot(matched_slot, num_slots, dtype=tf.float32)
  matched_mask_dice = tf.reduce_sum(dice * pairs, axis=1)
  matched_class_prob = tf.reduce_sum(class_similarity * pairs, axis=2)
  slot_is_matched = tf.reduce_sum(pairs, axis=1)
  slot_class = tf.einsum('bkn,bkc->bnc', pairs, gt_class_one_hot)
  slot_class_target = tf.concat([slot_class, 1.0 - slot_is_matched[:, :, None]], axis=-1)

  void_pixels = 1.0 - targets.pixel_non_void
  void_ratio = (tf.einsum('bp,bpn->bn', void_pixels, mask_probs)
                / (tf.reduce_sum(mask_probs, axis=1) + _DICE_EPSILON))
  return Matching(slot_of_square_row=slot_of_square_row, matched_slot=matched_slot,
                  slot_class_target=slot_class_target, slot_is_matched=slot_is_matched,
                  matched_mask_dice=matched_mask_dice, matched_class_prob=matched_class_prob,
                  void_ratio=void_ratio)


class SlotTargets(NamedTuple):
  """The matched ground truth in slot order, so losses read the mask logits as they are.

  Gathering every output's [batch, P, N] logits into ground-truth order (and padding them to
  S columns) costs more than the losses themselves; instead each pixel and mask is told its
  slot. Row k of the square assignment gives mask k's slot, for void rows too (their pixels
  are trained towards whatever slot soaked them up, as in DeepLab2). A slot >= N is padding:
  its logit counts as -99999, so its probability is 0.

  Attributes:
    pixel_slot: int32 [batch, P], the slot of the pixel's mask, clipped into [0, N).
    pixel_slot_is_real: float32 [batch, P], 1 for pixels in a mask whose slot is < N.
    pixel_in_mask: float32 [batch, P], 1 for pixels that belong to some mask.
    mask_slot: int32 [batch, K], the slot of each mask, clipped into [0, N).
    mask_slot_is_real: float32 [batch, K], 1 for masks whose slot is < N.
  """
  pixel_slot: tf.Tensor
  pixel_slot_is_real: tf.Tensor
  pixel_in_mask: tf.Tensor
  mask_slot: tf.Tensor
  mask_slot_is_real: tf.Tensor


def slot_targets(targets: targets_lib.MaskTargets, matching: Matching,
                 num_slots: int) -> SlotTargets:
  """Per pixel and per mask, the slot the matching gave to the mask (see SlotTargets)."""
  num_masks = targets.pixel_mask_one_hot.shape[-1]
  size = matching.slot_of_square_row.shape[-1]
  raw_mask_slot = matching.slot_of_square_row[:, :num_masks]
  mask_slot_is_real = raw_mask_slot < num_slots
  pixel_in_mask = targets.pixel_mask_index < num_masks
  # Pixels in no mask have index K, which may lie past the square (S == K): clip, then mask.
  raw_pixel_slot = tf.gather(matching.slot_of_square_row,
                             tf.minimum(targets.pixel_mask_index, size - 1), batch_dims=1)
  pixel_slot_is_real = tf.logical_and(pixel_in_mask, raw_pixel_slot < num_slots)
  return SlotTargets(
      pixel_slot=tf.minimum(raw_pixel_slot, num_slots - 1),
      pixel_slot_is_real=tf.cast(pixel_slot_is_real, tf.float32),
      pixel_in_mask=tf.cast(pixel_in_mask, tf.float32),
      mask_slot=tf.minimum(raw_mask_slot, num_slots - 1),
      mask_slot_is_real=tf.cast(mask_slot_is_real, tf.float32))


def _spread_to_slots(upstream, slot, num_slots):
  # upstream[b, p] at slot[b, p] of a [batch, P, num_slots] zero tensor (one pass).
  return tf.where(tf.range(num_slots)[None, None, :] == slot[:, :, None],
                  upstream[:, :, None], tf.zeros_like(upstream)[:, :, None])


_spread_to_slots_fused = xla_elementwise.fused(_spread_to_slots)


def pick_slot(mask_logits: tf.Tensor, slot: tf.Tensor) -> tf.Tensor:
  """mask_logits[b, p, slot[b, p]]: [batch, P, N] and int32 [batch, P] -> [batch, P].

  The gradient writes the upstream gradient into its slot of a zero [batch, P, N] tensor in one
  element-wise pass. TF's gradient of the batched gather is a scatter (UnsortedSegmentSum):
  87-225 ms per call on [2, 25921, 128] in the kMaX-R50 step at 641x641, 14 calls (issue #19's
  profile, docs/benchmarks.md). Equal to TF's gradient (tests/model/loss/test_loss_terms.py).
  """
  num_slots = mask_logits.shape[-1]

  @tf.custom_gradient
  def pick(logits):
    def gradient(upstream):
      return _spread_to_slots_fused(upstream, slot, num_slots)

    return tf.gather(logits, slot[:, :, None], batch_dims=2)[:, :, 0], gradient

  return pick(mask_logits)


def logit_of_pixel_slot(mask_logits: tf.Tensor, slots: SlotTargets) -> tf.Tensor:
  """float32 [batch, P]: each pixel's logit for its mask's slot, -99999 for padding slots."""
  picked = pick_slot(mask_logits, slots.pixel_slot)
  return tf.where(slots.pixel_slot_is_real > 0.5, picked, _PADDED_SLOT_LOGIT)


def sum_per_mask(values: tf.Tensor, targets: targets_lib.MaskTargets) -> tf.Tensor:
  """Sums per-pixel values over each mask's pixels: [batch, P, ...] -> float32 [batch, K, ...].

  A segment sum over the pixels' mask indices: O(P) work per value, where a product with
  the one-hot masks costs O(P K).
  """
  num_masks = targets.pixel_mask_one_hot.shape[-1]
  # Pixels in no mask carry index num_masks, outside the segments, and are dropped.
  return segment_sum.batched_segment_sum(values, targets.pixel_mask_index, num_masks)
