"""Panoptic training targets from a panoptic label map (DeepLab2's PanopticSampleGenerator).

From `label` (int32 [height, width, 1], semantic * divisor + instance) it derives:

| key                    | dtype / shape             | meaning                                     |
|------------------------|---------------------------|---------------------------------------------|
| semantic_gt            | int32 [height, width]     | label // divisor                            |
| panoptic_gt            | int32 [height, width]     | the label itself (crowd regions included)   |
| is_crowd_gt            | bool [height, width]      | thing class with instance id 0 (crowd)      |
| thing_id_mask_gt       | int32 [height, width]     | 0..T-1 per non-crowd thing instance, in     |
|                        |                           | tf.unique order of the label; -1 elsewhere  |
| thing_id_class_gt      | int32 [max_thing_id]      | semantic class of each thing id; -1 padding |
| semantic_loss_weight   | float32 [height, width]   | 1, or small_instance_weight on thing        |
|                        |                           | instances smaller than the threshold        |
"""

from typing import Sequence

import tensorflow as tf

from deeplab2_kmax import common


def panoptic_targets(label: tf.Tensor, *, label_divisor: int, ignore_label: int,
                     thing_class_ids: Sequence[int], max_thing_id: int,
                     small_instance_threshold: int = 0,
                     small_instance_weight: float = 1.0) -> tuple[dict, tf.Tensor]:
  """Builds the targets of the table above.

  Returns:
    (targets, num_things): num_things is the int32 count of thing instances, which callers
    compare with max_thing_id (targets only hold the first max_thing_id of them).
  """
  label = tf.cast(label[..., 0] if label.shape.rank == 3 else label, tf.int32)
  semantic = label // label_divisor
  instance = label % label_divisor
  thing_ids = tf.constant(list(thing_class_ids) or [-1], tf.int32)
  is_thing_class = tf.reduce_any(semantic[..., tf.newaxis] == thing_ids, axis=-1)
  is_crowd = tf.logical_and(is_thing_class, tf.equal(instance, 0))

  # Thing instances: every unique panoptic id of a thing class with instance > 0, numbered in
  # order of first appearance (tf.unique order), as DeepLab2 numbers them.
  unique_ids, index = tf.unique(tf.reshape(label, [-1]))
  unique_semantic = unique_ids // label_divisor
  unique_is_thing = tf.logical_and(
      tf.reduce_any(unique_semantic[:, tf.newaxis] == thing_ids, axis=-1),
      tf.logical_and(unique_ids % label_divisor > 0, unique_semantic != ignore_label))
  thing_number = tf.cumsum(tf.cast(unique_is_thing, tf.int32)) - 1
  num_things = tf.reduce_sum(tf.cast(unique_is_thing, tf.int32))
  per_unique = tf.where(unique_is_thing, thing_number, -1)
  thing_id_mask = tf.reshape(tf.gather(per_unique, index), tf.shape(label))
  # Ids past max_thing_id are dropped here; the pipeline reports or skips such examples.
  thing_id_mask = tf.where(thing_id_mask < max_thing_id, thing_id_mask, -1)

  thing_positions = tf.where(tf.logical_and(unique_is_thing, thing_number < max_thing_id))
  thing_id_class = tf.tensor_scatter_nd_update(
      -tf.ones([max_thing_id], tf.int32),
      tf.gather(thing_number, thing_positions[:, 0])[:, tf.newaxis],
      tf.gather(unique_semantic, thing_positions[:, 0]))

  weights = tf.ones(tf.shape(label), tf.float32)
  if small_instance_threshold > 0 and small_instance_weight != 1.0:
    areas = tf.math.unsorted_segment_sum(tf.ones_like(index), index, tf.size(unique_ids))
    small = tf.logical_and(unique_is_thing, areas < small_instance_threshold)
    weights = tf.where(tf.reshape(tf.gather(small, index), tf.shape(label)),
                       small_instance_weight, weights)

  targets = {
      common.GT_SEMANTIC: semantic,
      common.GT_PANOPTIC: label,
      common.GT_IS_CROWD: is_crowd,
      common.GT_THING_ID_MASK: thing_id_mask,
      common.GT_THING_ID_CLASS: thing_id_class,
      common.SEMANTIC_LOSS_WEIGHT: weights,
  }
  return targets, num_things
