"""The post-processor: model outputs -> panoptic_pred, semantic_pred, instance_pred,
instance_scores, semantic_scores, batched and in-graph (reference §5).

    post_processor = PostProcessor.from_options(evaluator_options, descriptor, crop_size)
    predictions = post_processor(model_outputs)              # at the crop size
    predictions = post_processor(model_outputs, eval_batch)  # at each image's raw size

Inputs: pixel_space_mask_logits [B, h, w, N] and transformer_class_logits
[B, N, num_classes + 1] (void last). `panoptic_pred` comes from the configured mode (pixelwise
or maskwise) with the area limits; `semantic_pred` is, as in DeepLab2's mIoU path, the class of
each pixel's best slot with no thresholds at all; `instance_pred` is slot + 1 on the pixels kept
in `panoptic_pred` (0 elsewhere). With `eval_batch` (holding size_raw and resized_size, int32
[B, 2]) every map is cropped to resized_size and resized to size_raw; the result is
[B, max raw height, max raw width], padded with void.

Everything compiles with XLA (`tf.function(jit_compile=True)`) and gives the graph-mode ids
exactly. With `eval_batch` the output shape depends on size_raw, so XLA takes it as a
compile-time constant and compiles once per distinct size_raw batch.
"""

from typing import Mapping, Optional, Sequence

import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.data import datasets
from deeplab2_kmax.model.post_processing import maskwise
from deeplab2_kmax.model.post_processing import panoptic
from deeplab2_kmax.model.post_processing import pixelwise
from deeplab2_kmax.model.post_processing import slot_classes as slot_classes_lib
from deeplab2_kmax.model.post_processing import undo_preprocessing


class PostProcessor:
  """Panoptic post-processing of a mask transformer."""

  def __init__(self, descriptor, crop_size: Sequence[int], *,
               mode: str = common.POST_PROCESSING_PIXELWISE, class_threshold: float = 0.7,
               pixel_threshold: float = 0.4, thing_threshold: float = 0.7,
               stuff_threshold: float = 0.7, overlap_threshold: float = 0.5,
               reorder_class_weight: float = 1.0, reorder_mask_weight: float = 0.0,
               thing_area_limit: int = 0, stuff_area_limit: int = 0):
    """Configures the post-processor.

    Args:
      descriptor: the dataset's DatasetDescriptor.
      crop_size: (height, width) of the evaluation crop the mask logits are resized to.
      mode: 'pixelwise' (MaX-DeepLab) or 'maskwise' (kMaX-DeepLab).
      class_threshold: pixelwise: minimum class confidence of a kept slot.
      pixel_threshold: minimum slot probability of a confident pixel / binary mask.
      thing_threshold: maskwise: minimum class confidence of a thing slot.
      stuff_threshold: maskwise: minimum class confidence of a stuff slot.
      overlap_threshold: maskwise: drop a slot if at most this fraction of it is still free.
      reorder_class_weight: maskwise ranking exponent of the class confidence.
      reorder_mask_weight: maskwise ranking exponent of the mask score.
      thing_area_limit: smaller thing instances become void (pixels at the crop size).
      stuff_area_limit: smaller stuff regions become void.
    """
    if mode not in (common.POST_PROCESSING_PIXELWISE, common.POST_PROCESSING_MASKWISE):
      raise ValueError(f'transformer_post_processing must be "pixelwise" or "maskwise", got '
                       f'"{mode}".')
    if len(crop_size) != 2 or min(crop_size) < 1:
      raise ValueError(f'crop_size must be (height, width), got {list(crop_size)}.')
    self._descriptor = descriptor
    self._thing_stuff = tuple(descriptor.thing_class_ids) + tuple(descriptor.stuff_class_ids)
    self._num_things = len(descriptor.thing_class_ids)
    self._crop_size = (int(crop_size[0]), int(crop_size[1]))
    self._mode = mode
    self._class_threshold = class_threshold
    self._pixel_threshold = pixel_threshold
    self._thing_threshold = thing_threshold
    self._stuff_threshold = stuff_threshold
    self._overlap_threshold = overlap_threshold
    self._reorder_class_weight = reorder_class_weight
    self._reorder_mask_weight = reorder_mask_weight
    self._thing_area_limit = thing_area_limit
    self._stuff_area_limit = stuff_area_limit

  @classmethod
  def from_options(cls, evaluator_options, descriptor,
                   crop_size: Sequence[int]) -> 'PostProcessor':
    """From evaluator_pb2.EvaluatorOptions and the evaluation crop size."""
    maskwise_options = evaluator_options.maskwise_postprocessing
    return cls(descriptor, crop_size, mode=evaluator_options.transformer_post_processing,
               class_threshold=evaluator_options.transformer_class_confidence_threshold,
               pixel_threshold=evaluator_options.pixel_confidence_threshold,
               thing_threshold=maskwise_options.transformer_class_confidence_threshold_thing,
               stuff_threshold=maskwise_options.transformer_class_confidence_threshold_stuff,
               overlap_threshold=maskwise_options.overlapping_threshold,
               reorder_class_weight=maskwise_options.reorder_class_weight,
               reorder_mask_weight=maskwise_options.reorder_mask_weight,
               thing_area_limit=evaluator_options.thing_area_limit,
               stuff_area_limit=evaluator_options.stuff_area_limit)

  def __call__(self, model_outputs: Mapping[str, tf.Tensor],
               eval_batch: Optional[Mapping[str, tf.Tensor]] = None) -> dict[str, tf.Tensor]:
    """Post-processes a batch.

    Args:
      model_outputs: holds pixel_space_mask_logits and transformer_class_logits.
      eval_batch: optional; holds size_raw and resized_size, int [batch, 2].

    Returns:
      dict with panoptic_pred, semantic_pred, instance_pred (int32) and instance_scores,
      semantic_scores (float32), each [batch, height, width].
    """
    mask_logits = model_outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS]
    class_logits = model_outputs[common.PRED_TRANSFORMER_CLASS_LOGITS]
    if class_logits.shape[-1] != len(self._thing_stuff) + 1:
      raise ValueError(f'transformer_class_logits have {class_logits.shape[-1]} channels; the '
                       f'dataset has {len(self._thing_stuff)} thing + stuff classes, so '
                       f'{len(self._thing_stuff) + 1} (void last) are needed.')
    classes = slot_classes_lib.slot_classes(class_logits)
    if self._mode == common.POST_PROCESSING_PIXELWISE:
      maps = pixelwise.pixelwise_slot_maps(mask_logits, classes, self._crop_size,
                                           self._class_threshold, self._pixel_threshold)
    else:
      maps = maskwise.maskwise_slot_maps(
          mask_logits, classes, self._crop_size, self._num_things, self._thing_threshold,
          self._stuff_threshold, self._overlap_threshold, self._pixel_threshold,
          self._reorder_class_weight, self._reorder_mask_weight)
    merged = panoptic.merge_panoptic(
        maps.mask_id, classes.class_index, self._thing_stuff, self._num_things,
        self._descriptor.ignore_label, self._descriptor.panoptic_label_divisor,
        self._thing_area_limit, self._stuff_area_limit)
    # The mIoU prediction: every pixel takes its best slot's class, no thresholds.
    best_slot = tf.argmax(slot_classes_lib.resize_mask_logits(mask_logits, self._crop_size),
                          axis=-1, output_type=tf.int32)
    semantic = tf.gather(tf.constant(self._thing_stuff, tf.int32),
                         tf.gather(classes.class_index, best_slot, batch_dims=1))
    result = {common.PRED_PANOPTIC: merged.panoptic, common.PRED_SEMANTIC: semantic,
              common.PRED_INSTANCE: merged.instance,
              common.PRED_INSTANCE_SCORES: maps.instance_score,
              common.PRED_SEMANTIC_SCORES: maps.semantic_score}
    if eval_batch is None:
      return result
    resized_size = eval_batch[common.RESIZED_SIZE]
    raw_size = eval_batch[common.GT_SIZE_RAW]
    ignore = self._descriptor.ignore_label
    fills = {common.PRED_PANOPTIC: ignore * self._descriptor.panoptic_label_divisor,
             common.PRED_SEMANTIC: ignore, common.PRED_INSTANCE: 0}
    for key, value in result.items():
      if key in fills:
        result[key] = undo_preprocessing.resize_nearest(value, resized_size, raw_size,
                                                        fills[key])
      else:
        result[key] = undo_preprocessing.resize_bilinear(value, resized_size, raw_size)
    return result


def build_post_processor(experiment_options, descriptor) -> PostProcessor:
  """The PostProcessor of an ExperimentOptions (crop from eval_dataset_options.crop_size)."""
  crop_size = datasets.crop_size_of(experiment_options.eval_dataset_options.crop_size,
                                    'eval_dataset_options.crop_size')
  return PostProcessor.from_options(experiment_options.evaluator_options, descriptor, crop_size)
