"""Ground-truth preparation for the mask-transformer losses (reference §4.2).

The per-pixel labels of a batch become K = max_thing_id + num_stuff_classes binary ground-truth
masks at the model output resolution: one per thing id (thing_id_mask_gt), then one per stuff
class (taken from semantic_gt), in that fixed order so the tensors have static shapes. A mask
with no pixel at the output resolution (a padded thing id, an absent stuff class, or a tiny
thing lost by the downsampling) is void: class -1, no matching, no loss.

Class indices: the class head predicts `len(thing_class_ids) + len(stuff_class_ids)` real
classes plus void (last channel), where channel j stands for dataset class
`thing_stuff_class_ids[j]` = (thing ids..., stuff ids...).

Pixels of the ignore label are void pixels. Crowd pixels (a thing class without a thing id) are
valid pixels that belong to no mask, as in DeepLab2.
"""

from typing import NamedTuple, Sequence

import tensorflow as tf

from deeplab2_kmax.model.loss import downsample


class MaskTargets(NamedTuple):
  """Ground truth at the output resolution; P = output_height * output_width pixels.

  Attributes:
    pixel_mask_one_hot: float32 [batch, P, K], 1 where the pixel belongs to mask k.
    pixel_mask_index: int32 [batch, P], the mask k of each pixel, K for pixels in none (void
      and crowd pixels); the same information as pixel_mask_one_hot, for gathers.
    pixel_non_void: float32 [batch, P], 1 for pixels not labelled ignore.
    pixel_thing: float32 [batch, P], 1 for pixels of a (non-crowd) thing mask.
    mask_class: int32 [batch, K], dataset class id of each mask, -1 for void masks.
    mask_class_index: int32 [batch, K], class-head channel (thing-stuff order), -1 for void.
    mask_non_void: float32 [batch, K], 1 for masks with a class and at least one pixel.
    mask_area: float32 [batch, K], pixel count of each mask at the output resolution.
    inverse_pixel_mask_area: float32 [batch, P], P / max(area of the pixel's mask, 1).
  """
  pixel_mask_one_hot: tf.Tensor
  pixel_mask_index: tf.Tensor
  pixel_non_void: tf.Tensor
  pixel_thing: tf.Tensor
  mask_class: tf.Tensor
  mask_class_index: tf.Tensor
  mask_non_void: tf.Tensor
  mask_area: tf.Tensor
  inverse_pixel_mask_area: tf.Tensor


def prepare_mask_targets(semantic_gt: tf.Tensor, thing_id_mask_gt: tf.Tensor,
                         thing_id_class_gt: tf.Tensor, output_size: Sequence[int], *,
                         thing_class_ids: Sequence[int], stuff_class_ids: Sequence[int],
                         ignore_label: int) -> MaskTargets:
  """Builds the K padded ground-truth masks of a batch at the output resolution.

  Args:
    semantic_gt: int [batch, height, width] train ids (ignore_label for void).
    thing_id_mask_gt: int [batch, height, width], 0..max_thing_id-1 per thing, -1 elsewhere.
    thing_id_class_gt: int [batch, max_thing_id], class of each thing id, -1 for padding.
    output_size: (output_height, output_width) of the mask logits; the labels are strided-
      downsampled to it.
    thing_class_ids: dataset ids of the thing classes (descriptor.thing_class_ids).
    stuff_class_ids: dataset ids of the stuff classes, ignore label excluded.
    ignore_label: the void train id.

  Returns:
    MaskTargets with K = max_thing_id + len(stuff_class_ids).
  """
  max_thing_id = thing_id_class_gt.shape[-1]
  if max_thing_id is None:
    raise ValueError('thing_id_class_gt needs a static last dimension (max_thing_id), got '
                     f'{thing_id_class_gt.shape}.')
  thing_stuff = list(thing_class_ids) + list(stuff_class_ids)
  if len(set(thing_stuff)) != len(thing_stuff) or ignore_label in thing_stuff:
    raise ValueError(f'thing_class_ids {list(thing_class_ids)} and stuff_class_ids '
                     f'{list(stuff_class_ids)} must be disjoint and exclude the ignore label '
                     f'{ignore_label}.')
  output_height, output_width = int(output_size[0]), int(output_size[1])
  num_pixels = output_height * output_width
  batch = tf.shape(semantic_gt)[0]

  semantic = tf.reshape(
      downsample.strided_downsample(tf.cast(semantic_gt, tf.int32), output_size),
      [batch, num_pixels])
  thing_id = tf.reshape(
      downsample.strided_downsample(tf.cast(thing_id_mask_gt, tf.int32), output_size),
      [batch, num_pixels])
  pixel_non_void = tf.cast(tf.not_equal(semantic, ignore_label), tf.float32)
  pixel_thing = tf.cast(thing_id >= 0, tf.float32)

  stuff_ids = tf.constant(list(stuff_class_ids), tf.int32, shape=[len(stuff_class_ids)])
  num_masks = max_thing_id + len(stuff_class_ids)
  # Each pixel belongs to at most one mask: its thing id's, else its stuff class's.
  stuff_position = tf.scatter_nd(
      tf.constant([[c] for c in stuff_class_ids], tf.int32, shape=[len(stuff_class_ids), 1]),
      tf.range(1, len(stuff_class_ids) + 1, dtype=tf.int32),
      [max(list(stuff_class_ids) + [0]) + 1]) - 1
  in_stuff_range = tf.logical_and(semantic >= 0, semantic < tf.shape(stuff_position)[0])
  stuff_index = tf.where(
      in_stuff_range,
      tf.gather(stuff_position, tf.clip_by_value(semantic, 0, tf.shape(stuff_position)[0] - 1)),
      -1)
  pixel_mask_index = tf.where(
      tf.logical_and(thing_id >= 0, thing_id < max_thing_id), thing_id,
      tf.where(stuff_index >= 0, max_thing_id + stuff_index, num_masks))
  pixel_mask_one_hot = tf.one_hot(pixel_mask_index, num_masks, dtype=tf.float32)  # K -> zeros.

  mask_area = tf.reduce_sum(pixel_mask_one_hot, axis=1)  # [batch, K]
  mask_class = tf.concat([
      tf.cast(thing_id_class_gt, tf.int32),
      tf.tile(stuff_ids[None, :], [batch, 1])], axis=-1)
  present = tf.logical_and(mask_area > 0.5, mask_class >= 0)
  mask_class = tf.where(present, mask_class, -1)

  # Dataset class id -> class-head channel; unknown ids (not a thing or stuff class) are void.
  lookup_size = max(thing_stuff + [0]) + 1
  lookup = tf.scatter_nd(
      tf.constant([[c] for c in thing_stuff], tf.int32, shape=[len(thing_stuff), 1]),
      tf.range(1, len(thing_stuff) + 1, dtype=tf.int32), [lookup_size]) - 1
  in_range = tf.logical_and(mask_class >= 0, mask_class < lookup_size)
  mask_class_index = tf.where(
      in_range, tf.gather(lookup, tf.clip_by_value(mask_class, 0, lookup_size - 1)), -1)
  mask_class = tf.where(mask_class_index >= 0, mask_class, -1)
  mask_non_void = tf.cast(mask_class_index >= 0, tf.float32)

  # Pixels in no mask (index K) read the appended 0.
  pixel_mask_area = tf.gather(tf.pad(mask_area, [[0, 0], [0, 1]]), pixel_mask_index,
                              batch_dims=1)
  inverse_pixel_mask_area = float(num_pixels) / tf.maximum(pixel_mask_area, 1.0)
  return MaskTargets(pixel_mask_one_hot=pixel_mask_one_hot, pixel_mask_index=pixel_mask_index,
                     pixel_non_void=pixel_non_void,
                     pixel_thing=pixel_thing, mask_class=mask_class,
                     mask_class_index=mask_class_index, mask_non_void=mask_non_void,
                     mask_area=mask_area, inverse_pixel_mask_area=inverse_pixel_mask_area)
