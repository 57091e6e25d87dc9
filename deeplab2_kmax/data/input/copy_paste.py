"""Panoptic copy-paste (kMaX-DeepLab, ECCV 2022) as stateless TensorFlow ops.

A second, already preprocessed training sample is pasted onto the first: a random subset of
its segments (whole panoptic segments, never parts) replaces the base image's pixels and
labels. Which kinds of segments may be pasted is set per kind by an option:

- 'random': a thing / stuff / void segment is pasted if the random subset picked it;
- 'all': every segment of that kind is pasted;
- 'none': no segment of that kind is pasted.

The random subset follows DeepLab2: the number of segments to keep is uniform in
[0, number of distinct ids in the pasted label] (the padding id counts), and which ones is a
uniform random choice of that many. Padding, which the pipeline fills with
`ignore_label * label_divisor + 1` in the pasted sample, is never pasted.

Pasted instance ids are renumbered to `label_divisor - 1 - instance` (0, i.e. stuff, void and
crowd, stays 0). With every instance id below `label_divisor // 2` in both samples, pasted
instances then count down from the top of the id range while the base image's count up from
1, so they cannot collide; `paste` checks that precondition at run time.

All randomness comes from stateless ops driven by `seed`, so the same seed gives the same
result bit for bit, eagerly and inside `tf.data.Dataset.map`.
"""

import numpy as np
import tensorflow as tf

OPTION_RANDOM = 'random'
OPTION_NONE = 'none'
OPTION_ALL = 'all'
OPTIONS = (OPTION_RANDOM, OPTION_NONE, OPTION_ALL)


def _check_option(kind, option):
  if option not in OPTIONS:
    raise ValueError(f'panoptic copy-paste {kind}_option "{option}" is not one of '
                     f'{", ".join(OPTIONS)}')


def thing_class_ids_tensor(thing_class_ids, dtype=tf.int32):
  """The thing class ids as a 1-D tensor of `dtype`.

  Args:
    thing_class_ids: a Python sequence of ints (possibly empty), a 1-D numpy array, or a 1-D
      integer tensor.
    dtype: integer dtype of the result (that of the labels).

  Raises:
    ValueError: if the ids are not one-dimensional or not integers.
  """
  if isinstance(thing_class_ids, (tf.Tensor, tf.Variable)):
    ids = tf.convert_to_tensor(thing_class_ids)
    if not ids.dtype.is_integer:
      raise ValueError(f'thing_class_ids must be integers, got a {ids.dtype.name} tensor')
    if ids.shape.rank is not None and ids.shape.rank != 1:
      raise ValueError(f'thing_class_ids must be one-dimensional, got shape {ids.shape}')
    return tf.reshape(tf.cast(ids, dtype), [-1])
  ids = np.asarray(thing_class_ids)
  if ids.size == 0:
    # np.asarray(()) is float64; an empty sequence simply means "no thing classes".
    ids = ids.astype(np.int64)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'thing_class_ids must be a 1-D sequence of ints, got {thing_class_ids!r}')
  return tf.constant(ids, dtype=dtype)


def _is_in(values, candidates):
  """Bool [N]: whether each of values [N] occurs in candidates [M] (False when M = 0)."""
  return tf.reduce_any(tf.equal(values[:, tf.newaxis], candidates[tf.newaxis, :]), axis=1)


def _apply_option(keep, members, option):
  if option == OPTION_NONE:
    return keep & ~members
  if option == OPTION_ALL:
    return keep | members
  return keep  # 'random': the random choice stands.


def sample_kept_segments(segment_count, seed):
  """The random choice of segments before the per-kind options.

  Args:
    segment_count: int32 scalar, the number of distinct ids in the pasted label.
    seed: int32 or int64 [2].

  Returns:
    bool [segment_count]: a uniformly random subset whose size is uniform in
    [0, segment_count].
  """
  count_seed, shuffle_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  num_keep = tf.random.stateless_uniform([], count_seed, minval=0, maxval=segment_count + 1,
                                         dtype=tf.int32)
  first_ones = tf.range(segment_count) < num_keep
  return tf.random.experimental.stateless_shuffle(first_ones, shuffle_seed)


def _max_instance_assert(panoptic, which, label_divisor):
  """An assert that every instance id in `panoptic` is < label_divisor // 2."""
  flat = tf.reshape(panoptic, [-1])
  instances = flat % label_divisor
  worst = tf.argmax(instances)
  limit = label_divisor // 2
  return tf.debugging.Assert(
      tf.reduce_max(instances) < tf.cast(limit, instances.dtype),
      [f'panoptic copy-paste needs every instance id < label_divisor // 2 = {limit} (pasted '
       f'ids become label_divisor - 1 - id and must not collide with base instance ids); the '
       f'{which} label has instance id', instances[worst], 'in panoptic id', flat[worst]],
      summarize=1)


def paste(image, label, paste_image, paste_label, *, seed, thing_option: str,
          stuff_option: str, void_option: str, ignore_label: int, label_divisor: int,
          thing_class_ids):
  """Pastes a random subset of the segments of one sample onto another.

  Args:
    image: float32 [height, width, 3], the base image.
    label: int32 [height, width, 1], its panoptic ids (semantic * label_divisor + instance).
    paste_image: float32 [height, width, 3], the image to paste from (same size).
    paste_label: int32 [height, width, 1], its panoptic ids; padding pixels hold
      ignore_label * label_divisor + 1.
    seed: int32 or int64 [2], the stateless seed.
    thing_option: 'random', 'none' or 'all', for segments of thing classes.
    stuff_option: likewise for segments of other classes except ignore_label.
    void_option: likewise for the void segment ignore_label * label_divisor.
    ignore_label: the semantic id of void pixels.
    label_divisor: panoptic = semantic * label_divisor + instance.
    thing_class_ids: the semantic ids of thing classes, a Python sequence or 1-D int tensor.

  Returns:
    (image, label) with the shapes and dtypes of the inputs: pasted pixels take the pasted
    sample's image values and its labels, with instance ids renumbered to
    label_divisor - 1 - instance.

  Raises:
    ValueError: for an option not in OPTIONS, mismatched dtypes or known mismatched shapes.
    tf.errors.InvalidArgumentError (when run): if an instance id in `label` or `paste_label`
      is >= label_divisor // 2.
  """
  _check_option('thing', thing_option)
  _check_option('stuff', stuff_option)
  _check_option('void', void_option)
  if label_divisor <= 1:
    raise ValueError(f'label_divisor must be > 1, got {label_divisor}')
  image = tf.convert_to_tensor(image)
  paste_image = tf.convert_to_tensor(paste_image)
  label = tf.convert_to_tensor(label)
  paste_label = tf.convert_to_tensor(paste_label)
  if image.dtype != paste_image.dtype:
    raise ValueError(f'image ({image.dtype.name}) and paste_image ({paste_image.dtype.name}) '
                     'must have the same dtype')
  if label.dtype != paste_label.dtype or not label.dtype.is_integer:
    raise ValueError(f'label ({label.dtype.name}) and paste_label ({paste_label.dtype.name}) '
                     'must have the same integer dtype')
  for name, tensor, channels in (('image', image, 3), ('paste_image', paste_image, 3),
                                 ('label', label, 1), ('paste_label', paste_label, 1)):
    if not tensor.shape.is_compatible_with([None, None, channels]):
      raise ValueError(f'{name} must have shape [height, width, {channels}], got '
                       f'{tensor.shape}')
  if not (image.shape[:2].is_compatible_with(label.shape[:2]) and
          image.shape[:2].is_compatible_with(paste_image.shape[:2]) and
          image.shape[:2].is_compatible_with(paste_label.shape[:2])):
    raise ValueError('image, label, paste_image and paste_label must share [height, width], '
                     f'got {image.shape}, {label.shape}, {paste_image.shape}, '
                     f'{paste_label.shape}')

  dtype = label.dtype
  void_id = ignore_label * label_divisor
  padding_id = void_id + 1
  things = thing_class_ids_tensor(thing_class_ids, dtype)

  # Decide per distinct id of the pasted label, then spread the decision to its pixels.
  segment_ids, pixel_segment = tf.unique(tf.reshape(paste_label, [-1]))
  keep = sample_kept_segments(tf.size(segment_ids, out_type=tf.int32), seed)
  semantic = segment_ids // label_divisor
  is_padding = tf.equal(segment_ids, padding_id)
  is_void = tf.equal(segment_ids, void_id)
  is_thing = _is_in(semantic, things)
  # Stuff: any other class than the things and ignore_label (which covers void and padding).
  is_stuff = ~is_thing & tf.not_equal(semantic, ignore_label)
  keep &= ~is_padding
  keep = _apply_option(keep, is_thing, thing_option)
  keep = _apply_option(keep, is_stuff, stuff_option)
  keep = _apply_option(keep, is_void, void_option)
  # Padding is no thing, stuff or void, so no option above can bring it back.
  pasted = tf.reshape(tf.gather(keep, pixel_segment), tf.shape(paste_label))

  checks = [_max_instance_assert(label, 'base', label_divisor),
            _max_instance_assert(paste_label, 'pasted', label_divisor)]
  with tf.control_dependencies([c for c in checks if c is not None]):
    paste_instance = paste_label % label_divisor
    renumbered = tf.where(tf.equal(paste_instance, 0), paste_instance,
                          label_divisor - 1 - paste_instance)
    paste_panoptic = (paste_label // label_divisor) * label_divisor + renumbered
    new_label = tf.where(pasted, paste_panoptic, label)
    # [height, width, 1] broadcasts over the 3 image channels.
    new_image = tf.where(pasted, paste_image, image)
  return new_image, new_label
