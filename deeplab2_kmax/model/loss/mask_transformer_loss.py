"""The mask-transformer loss: all terms of kMaX-/CMT-/MaX-DeepLab in one callable (§4.1).

    loss = MaskTransformerLoss(loss_options, descriptor, num_aux_outputs=6, sample_k=4096)
    losses = loss(ground_truth_batch, model_outputs)   # dict of float32 [batch]

Ground truth (keys from common.py): semantic_gt int [B, H, W], thing_id_mask_gt int [B, H, W],
thing_id_class_gt int [B, max_thing_id], semantic_loss_weight float [B, H, W] (optional).
Model outputs: pixel_space_mask_logits [B, h, w, N], pixel_space_normalized_feature
[B, h, w, D], transformer_class_logits [B, N, num_classes + 1] (void last), semantic_logits
[B, h', w', C] (when the semantic loss is on), and auxiliary_outputs_pred: a sequence of
num_aux_outputs dicts with the first three keys at the same h x w.

Returned keys, each already multiplied by its configured weight: pq_style_loss_class_term,
pq_style_loss_mask_dice_term, mask_id_cross_entropy_loss, instance_discrimination_loss (for
the final output and, prefixed 'aux_{i}', for each auxiliary output), semantic_loss (final
only), total_loss (their sum) and non_finite_loss_count. A term that is NaN or Inf for an
example is replaced by 0 in the dict and the total, and counted in non_finite_loss_count so the
trainer can report it. The gradient of such a term can still hold NaN (0 times a NaN local
derivative), so a trainer should skip the update when the count is non-zero.

LossOptions.reference_mask_loss (CMT-DeepLab's reference-mask approximation, see
reference_mask.py) adds 'aux_{i}reference_mask_loss' for every auxiliary output; those outputs
must then carry `reference_mask_logits` [B, h, w, N] (CMT with use_reference_masks).

The matching is computed once on the final output and reused for the auxiliary outputs, as are
the class-term and dice-term weights. Everything is computed in float32, whatever the model's
compute dtype.
"""

from typing import Mapping, Optional, Sequence

import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model.loss import instance_discrimination
from deeplab2_kmax.model.loss import mask_id_cross_entropy
from deeplab2_kmax.model.loss import matching as matching_lib
from deeplab2_kmax.model.loss import pq_style
from deeplab2_kmax.model.loss import reference_mask
from deeplab2_kmax.model.loss import semantic
from deeplab2_kmax.model.loss import slot_softmax
from deeplab2_kmax.model.loss import targets as targets_lib

# Per-output terms, in DeepLab2's order.
_PER_OUTPUT_TERMS = (common.PQ_STYLE_LOSS_CLASS_TERM, common.PQ_STYLE_LOSS_MASK_DICE_TERM,
                     common.MASK_ID_CROSS_ENTROPY_LOSS, common.INSTANCE_DISCRIMINATION_LOSS)


def auxiliary_loss_name(index: int, term: str) -> str:
  """Name of a term of auxiliary output `index`, e.g. 'aux_0pq_style_loss_class_term'."""
  return f'{common.AUXILIARY_LOSS_PREFIX}{index}{term}'


class MaskTransformerLoss:
  """PQ-style, mask-ID, instance-discrimination and semantic losses of a mask transformer."""

  def __init__(self, loss_options, descriptor, *, num_aux_outputs: int = 0,
               sample_k: int = 0, sample_temperature: float = 0.6,
               temperature: float = 0.3, focal_alpha: float = 0.75,
               max_thing_id: Optional[int] = None):
    """Configures the loss.

    Args:
      loss_options: trainer_pb2.LossOptions; a term is on iff its message is set, and uses its
        `weight` (and `top_k_percent` where DeepLab2 does: mask-ID, instance discrimination,
        semantic).
      descriptor: the dataset's DatasetDescriptor (thing_class_ids, stuff_class_ids,
        ignore_label).
      num_aux_outputs: auxiliary outputs the model returns in training (kMaX: one per
        transformer-decoder layer, 6).
      sample_k: 0 for MaX-DeepLab's instance discrimination, > 0 for the pixel-contrastive
        form with this many pixels per image.
      sample_temperature: pixel-sampling temperature of the pixel-contrastive form.
      temperature: softmax temperature of both instance-discrimination forms.
      focal_alpha: class-term weight of non-void targets (void targets: 1 - alpha).
      max_thing_id: if given, the ground truth's thing_id_class_gt width is checked against it.
    """
    if num_aux_outputs < 0:
      raise ValueError(f'num_aux_outputs must be >= 0, got {num_aux_outputs}.')
    if sample_k < 0:
      raise ValueError(f'instance_discrimination_sample_k must be >= 0, got {sample_k}.')
    self._thing_class_ids = tuple(descriptor.thing_class_ids)
    self._stuff_class_ids = tuple(descriptor.stuff_class_ids)
    self._ignore_label = descriptor.ignore_label
    self._num_aux_outputs = num_aux_outputs
    self._sample_k = sample_k
    self._sample_temperature = sample_temperature
    self._temperature = temperature
    self._focal_alpha = focal_alpha
    self._max_thing_id = max_thing_id

    def option(name):
      if loss_options.HasField(name):
        single = getattr(loss_options, name)
        return float(single.weight), float(single.top_k_percent)
      return None

    self._pq = option(common.PQ_STYLE_LOSS)
    self._mask_id = option(common.MASK_ID_CROSS_ENTROPY_LOSS)
    self._instance = option(common.INSTANCE_DISCRIMINATION_LOSS)
    self._semantic = option(common.SEMANTIC_LOSS)
    self._reference = option(common.REFERENCE_MASK_LOSS)
    for name, value in ((common.MASK_ID_CROSS_ENTROPY_LOSS, self._mask_id),
                        (common.INSTANCE_DISCRIMINATION_LOSS, self._instance),
                        (common.SEMANTIC_LOSS, self._semantic)):
      if value is not None and not 0.0 < value[1] <= 1.0:
        raise ValueError(f'{name}.top_k_percent must lie in (0, 1], got {value[1]}.')

  @property
  def loss_terms(self) -> tuple[str, ...]:
    """Names of the loss terms this configuration returns (without total_loss)."""
    terms = []
    if self._pq is not None:
      terms += [common.PQ_STYLE_LOSS_CLASS_TERM, common.PQ_STYLE_LOSS_MASK_DICE_TERM]
    if self._mask_id is not None:
      terms.append(common.MASK_ID_CROSS_ENTROPY_LOSS)
    if self._instance is not None:
      terms.append(common.INSTANCE_DISCRIMINATION_LOSS)
    per_output = list(terms)
    if self._reference is not None:
      per_aux = per_output + [common.REFERENCE_MASK_LOSS]
    else:
      per_aux = per_output
    for index in range(self._num_aux_outputs):
      terms += [auxiliary_loss_name(index, term) for term in per_aux]
    if self._semantic is not None:
      terms.append(common.SEMANTIC_LOSS)
    return tuple(terms)

  def _outputs(self, model_outputs: Mapping[str, tf.Tensor]) -> Sequence[Mapping[str, tf.Tensor]]:
    outputs = [model_outputs]
    if self._num_aux_outputs:
      auxiliary = model_outputs.get(common.PRED_AUXILIARY_OUTPUTS)
      if auxiliary is None or len(auxiliary) != self._num_aux_outputs:
        found = 'none' if auxiliary is None else len(auxiliary)
        raise ValueError(f'The loss expects {self._num_aux_outputs} auxiliary outputs under '
                         f'"{common.PRED_AUXILIARY_OUTPUTS}", the model returned {found}.')
      outputs += list(auxiliary)
    final_shape = model_outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape
    for index, output in enumerate(outputs[1:]):
      shape = output[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape
      if shape[1:] != final_shape[1:]:
        raise ValueError(f'Auxiliary output {index} has mask logits of shape {shape}; they must '
                         f'be resized to the final output shape {final_shape} by the model.')
    return outputs

  def __call__(self, ground_truth: Mapping[str, tf.Tensor],
               model_outputs: Mapping[str, tf.Tensor],
               seed: Optional[tf.Tensor] = None) -> dict[str, tf.Tensor]:
    """Computes every configured term.

    Args:
      ground_truth: the training batch (see the module docstring).
      model_outputs: the model's training outputs.
      seed: optional int32 [2] making the pixel sampling reproducible.

    Returns:
      dict of float32 [batch] tensors: each term (weighted), 'total_loss' and
      'non_finite_loss_count'.
    """
    outputs = self._outputs(model_outputs)
    mask_logits = model_outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS]
    _, height, width, num_slots = mask_logits.shape
    if None in (height, width, num_slots):
      raise ValueError(f'pixel_space_mask_logits needs a static height, width and slot count, '
                       f'got {mask_logits.shape}.')
    thing_id_class = ground_truth[common.GT_THING_ID_CLASS]
    if self._max_thing_id is not None and thing_id_class.shape[-1] != self._max_thing_id:
      raise ValueError(f'thing_id_class_gt has {thing_id_class.shape[-1]} thing ids, the loss '
                       f'was built for max_thing_id {self._max_thing_id}.')
    num_classes = len(self._thing_class_ids) + len(self._stuff_class_ids)
    for index, output in enumerate(outputs):
      width_found = output[common.PRED_TRANSFORMER_CLASS_LOGITS].shape[-1]
      if width_found != num_classes + 1:
        raise ValueError(f'transformer_class_logits of output {index} have {width_found} '
                         f'channels; the dataset has {len(self._thing_class_ids)} thing + '
                         f'{len(self._stuff_class_ids)} stuff classes, so {num_classes + 1} '
                         '(void last) are needed.')
    targets = targets_lib.prepare_mask_targets(
        ground_truth[common.GT_SEMANTIC], ground_truth[common.GT_THING_ID_MASK], thing_id_class,
        (height, width), thing_class_ids=self._thing_class_ids,
        stuff_class_ids=self._stuff_class_ids, ignore_label=self._ignore_label)
    batch = tf.shape(mask_logits)[0]
    num_pixels = height * width

    def flat(tensor):
      return tf.reshape(tf.cast(tensor, tf.float32), [batch, num_pixels, tensor.shape[-1]])

    matching = None
    if self._pq is not None or self._mask_id is not None or self._reference is not None:
      matching = matching_lib.match(
          targets, flat(mask_logits), model_outputs[common.PRED_TRANSFORMER_CLASS_LOGITS])
      slots = matching_lib.slot_targets(targets, matching, num_slots)

    losses = {}
    for index, output in enumerate(outputs):
      terms = {}
      output_mask_logits = flat(output[common.PRED_PIXEL_SPACE_MASK_LOGITS])
      # The slot softmax's normaliser, shared by the dice term and the mask-ID cross-entropy.
      log_normaliser = (slot_softmax.log_sum_exp(output_mask_logits)
                        if self._pq is not None or self._mask_id is not None else None)
      if self._pq is not None:
        terms[common.PQ_STYLE_LOSS_CLASS_TERM] = self._pq[0] * pq_style.class_term(
            output[common.PRED_TRANSFORMER_CLASS_LOGITS], matching.slot_class_target,
            matching.slot_is_matched, matching.matched_mask_dice, matching.void_ratio,
            self._focal_alpha)
        terms[common.PQ_STYLE_LOSS_MASK_DICE_TERM] = self._pq[0] * pq_style.mask_dice_term(
            output_mask_logits, targets, slots, matching.matched_class_prob, self._focal_alpha,
            log_normaliser)
      if self._mask_id is not None:
        terms[common.MASK_ID_CROSS_ENTROPY_LOSS] = (
            self._mask_id[0] * mask_id_cross_entropy.mask_id_cross_entropy(
                output_mask_logits, slots, targets.pixel_non_void, self._mask_id[1],
                log_normaliser))
      if self._instance is not None:
        feature = flat(output[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE])
        if self._sample_k:
          output_seed = None if seed is None else tf.cast(seed, tf.int32) + [0, index]
          value = instance_discrimination.pixel_contrastive_instance_discrimination(
              feature, targets, self._sample_k, self._sample_temperature, self._temperature,
              self._instance[1], seed=output_seed)
        else:
          value = instance_discrimination.prototype_instance_discrimination(
              feature, targets, self._temperature, self._instance[1])
        terms[common.INSTANCE_DISCRIMINATION_LOSS] = self._instance[0] * value
      if self._reference is not None and index > 0:
        logits = output.get(common.PRED_REFERENCE_MASK_LOGITS)
        if logits is None:
          raise ValueError(f'reference_mask_loss is configured but auxiliary output {index - 1} '
                           f'has no "{common.PRED_REFERENCE_MASK_LOGITS}"; it needs the cmt '
                           'meta-architecture with use_reference_masks: true.')
        terms[common.REFERENCE_MASK_LOSS] = self._reference[0] * (
            reference_mask.reference_mask_loss(flat(logits), targets, matching))
      for term, value in terms.items():
        losses[term if index == 0 else auxiliary_loss_name(index - 1, term)] = value

    if self._semantic is not None:
      logits = model_outputs.get(common.PRED_SEMANTIC_LOGITS)
      if logits is None:
        raise ValueError(f'semantic_loss is configured but the model returned no '
                         f'"{common.PRED_SEMANTIC_LOGITS}".')
      weight = ground_truth.get(common.SEMANTIC_LOSS_WEIGHT)
      if weight is None:
        weight = tf.ones(tf.shape(ground_truth[common.GT_SEMANTIC]), tf.float32)
      losses[common.SEMANTIC_LOSS] = self._semantic[0] * semantic.semantic_loss(
          logits, ground_truth[common.GT_SEMANTIC], weight, self._ignore_label,
          self._semantic[1])

    return _guard_and_total(losses, batch)


def _guard_and_total(losses: dict[str, tf.Tensor], batch: tf.Tensor) -> dict[str, tf.Tensor]:
  """Zeroes non-finite per-example terms, counts them and adds the total."""
  count = tf.zeros([batch], tf.float32)
  guarded = {}
  for name, value in losses.items():
    finite = tf.math.is_finite(value)
    guarded[name] = tf.where(finite, value, tf.zeros_like(value))
    count += 1.0 - tf.cast(finite, tf.float32)
  guarded[common.TOTAL_LOSS] = (tf.add_n(list(guarded.values())) if guarded
                                else tf.zeros([batch], tf.float32))
  guarded[common.NON_FINITE_LOSS_COUNT] = count
  return guarded
