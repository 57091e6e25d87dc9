"""Merging slot maps into panoptic, semantic and instance maps, with area limits (§5.3).

A pixel's semantic class is the dataset class of its slot's predicted channel; slots of thing
channels are instances (instance id = slot + 1), the others stuff (instance id 0). Thing
instances with fewer than `thing_area_limit` pixels and stuff classes with fewer than
`stuff_area_limit` pixels in the image become void. Void pixels get the ignore label:
panoptic = ignore_label * label_divisor.
"""

from typing import NamedTuple, Sequence

import tensorflow as tf


class PanopticMaps(NamedTuple):
  """Attributes (int32 [batch, H, W]): panoptic = semantic * label_divisor + instance id;
  semantic (ignore label where void); instance (slot + 1 of every kept pixel, 0 where void)."""
  panoptic: tf.Tensor
  semantic: tf.Tensor
  instance: tf.Tensor


def _region_size(region_ids: tf.Tensor, num_regions: int) -> tf.Tensor:
  """Pixel count of each pixel's region; region_ids int32 [batch, H, W] in [0, num_regions)."""
  batch = tf.shape(region_ids)[0]
  flat = tf.reshape(region_ids, [batch, -1])
  # One segment sum over the batch, each image's regions offset by num_regions: a constant
  # number of segments per image, which XLA compiles (tf.math.bincount sizes its output from
  # the data), and an op that ONNX and LiteRT's builtins have (DenseBincount is neither).
  # Rank-1 segment ids: tf2onnx converts segment sums of rank-1 ids only.
  segment_ids = tf.reshape(flat + tf.range(batch)[:, tf.newaxis] * num_regions, [-1])
  counts = tf.math.unsorted_segment_sum(tf.ones_like(segment_ids), segment_ids,
                                        batch * num_regions)
  counts = tf.reshape(counts, [batch, num_regions])
  return tf.reshape(tf.gather(counts, flat, batch_dims=1), tf.shape(region_ids))


def merge_panoptic(mask_id: tf.Tensor, class_index: tf.Tensor,
                   thing_stuff_class_ids: Sequence[int], num_thing_classes: int,
                   ignore_label: int, label_divisor: int, thing_area_limit: int = 0,
                   stuff_area_limit: int = 0) -> PanopticMaps:
  """Builds the panoptic maps.

  Args:
    mask_id: int32 [batch, H, W], the slot of each pixel or -1 for void.
    class_index: int32 [batch, N], class-head channel of each slot.
    thing_stuff_class_ids: dataset class of each channel (thing ids, then stuff ids).
    num_thing_classes: channels below this are things.
    ignore_label: the dataset's void train id.
    label_divisor: panoptic = semantic * label_divisor + instance; must exceed N.
    thing_area_limit: thing instances smaller than this (pixels) become void.
    stuff_area_limit: stuff classes covering fewer pixels than this become void.

  Returns:
    PanopticMaps.
  """
  num_slots = class_index.shape[-1]
  if num_slots is not None and label_divisor <= num_slots:
    raise ValueError(f'label_divisor {label_divisor} must exceed the number of slots '
                     f'{num_slots}, since instance ids are slot + 1.')
  class_ids = tf.constant(list(thing_stuff_class_ids), tf.int32)
  valid = mask_id >= 0
  slot = tf.maximum(mask_id, 0)
  channel = tf.gather(class_index, slot, batch_dims=1)
  is_thing = tf.logical_and(valid, channel < num_thing_classes)
  is_stuff = tf.logical_and(valid, tf.logical_not(is_thing))
  semantic = tf.gather(class_ids, channel)
  if thing_area_limit > 0:
    thing_region = tf.where(is_thing, slot + 1, 0)
    is_thing = tf.logical_and(is_thing,
                              _region_size(thing_region, num_slots + 1) >= thing_area_limit)
  if stuff_area_limit > 0:
    stuff_region = tf.where(is_stuff, channel + 1, 0)
    is_stuff = tf.logical_and(
        is_stuff, _region_size(stuff_region, len(thing_stuff_class_ids) + 1) >= stuff_area_limit)
  kept = tf.logical_or(is_thing, is_stuff)
  semantic = tf.where(kept, semantic, ignore_label)
  instance = tf.where(kept, slot + 1, 0)
  panoptic = semantic * label_divisor + tf.where(is_thing, slot + 1, 0)
  return PanopticMaps(panoptic=panoptic, semantic=semantic, instance=instance)
