"""The tf.data input pipeline: TFRecords -> checked decoding -> augmentation -> panoptic
targets -> batches.

Training (infinite): shuffled shards, interleaved reading, example shuffle, per-example seeds,
resize to range, random scale, AutoAugment, pad + random crop + flip, panoptic copy-paste,
targets (sample_generator.py), batch with drop_remainder.

Evaluation (one pass, file order): resize to range + pad bottom/right to the crop, targets at
the crop, plus the raw-size labels and sizes to undo the preprocessing:

| key            | eval only | dtype / shape                                        |
|----------------|-----------|------------------------------------------------------|
| image          |           | float32 [batch, crop_h, crop_w, 3] in [0, 255]       |
| semantic_gt... |           | see sample_generator.py                              |
| image_name     |           | string [batch]                                       |
| size_raw       | yes       | int32 [batch, 2] (height, width) of the decoded image|
| resized_size   | yes       | int32 [batch, 2] size after resize, before padding   |
| panoptic_raw   | yes       | int32 [batch, H, W] padded with ignore * divisor     |
| semantic_raw   | yes       | int32 [batch, H, W] padded with ignore               |
| is_crowd_raw   | yes       | bool [batch, H, W]                                   |

Bad input (a corrupt record, an image that is no JPEG/PNG, a label whose size differs from the
image, a panoptic id that decodes to an unknown class or an instance on a stuff class, more
things than max_thing_id) stops iteration with DataError naming the file or image and the
problem, or, with `skip_bad_examples`, the example is dropped and counted in `num_skipped`.

Randomness is stateless and keyed by (seed, example position), so `deterministic: true` gives
identical batches run after run.

Several input pipelines (one per worker under MultiWorkerMirrored) read disjoint shares: whole
files when there are at least as many files as pipelines, else every n-th record of the files
read in order. Evaluation relies on it: each worker evaluates its share once, and the
evaluator adds the shares up.
"""

import re
from typing import Iterator, Optional

from absl import logging
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.input import preprocessing
from deeplab2_kmax.data.input import sample_generator
from deeplab2_kmax.data.formats import tfrecord
from deeplab2_kmax.protos import dataset_pb2

# Marks our own checks inside TensorFlow assertion messages, so errors can be told apart.
_PROBLEM_MARKER = 'deeplab2_kmax-bad-example'
_PROBLEM_PATTERN = re.compile(_PROBLEM_MARKER + r'\]? \[?(.*?)\]?(?:\s*\[\[|$)', re.S)


class DataError(RuntimeError):
  """Bad input data; str(error) names the file or image and the problem."""


def resolve_files(patterns) -> list[str]:
  """Sorted files matching the glob patterns; DataError naming the patterns if none match."""
  files = []
  for pattern in patterns:
    files.extend(tf.io.gfile.glob(pattern))
  files = sorted(set(files))
  if not files:
    shown = ', '.join(f'"{p}"' for p in patterns) or '(no file_pattern given)'
    raise DataError(f'no TFRecord files match file_pattern {shown}; check the path (and the '
                    'environment variables it uses) or build the data first')
  return files


class InputPipeline:
  """Builds the dataset for one DatasetOptions.

  Example:
    pipeline = InputPipeline(config.train_dataset_options, is_training=True)
    for batch in pipeline.iterate():   # errors become DataError with a clear message
      ...
  """

  def __init__(self, options: dataset_pb2.DatasetOptions, is_training: bool,
               descriptor: Optional[datasets.DatasetDescriptor] = None):
    self.options = options
    self.is_training = is_training
    self.descriptor = descriptor or datasets.from_dataset_options(options)
    self.crop_size = datasets.crop_size_of(options.crop_size)
    self.decode_labels = options.decode_groundtruth_label
    self._files: Optional[list[str]] = None
    self._num_skipped: Optional[tf.Variable] = None

  @property
  def files(self) -> list[str]:
    if self._files is None:
      self._files = resolve_files(self.options.file_pattern)
    return self._files

  @property
  def num_skipped(self) -> tf.Variable:
    """Examples dropped by skip_bad_examples so far (int64 variable)."""
    if self._num_skipped is None:
      with tf.init_scope():
        self._num_skipped = tf.Variable(0, dtype=tf.int64, trainable=False,
                                        name='num_skipped_examples')
    return self._num_skipped

  # ---- Decoding and checks ----

  def _decode(self, serialized: tf.Tensor) -> dict:
    """Decodes one record and describes its first problem ('' when fine)."""
    parsed = tfrecord.parse_features(serialized)
    name = parsed[common.KEY_IMAGE_FILENAME]
    encoded = parsed[common.KEY_ENCODED_IMAGE]
    signature_ok = tfrecord.has_image_signature(encoded)
    image = tf.cond(
        signature_ok,
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
        lambda: tf.zeros([1, 1, 3], tf.uint8))
    image.set_shape([None, None, 3])
    shape = tf.shape(image, out_type=tf.int64)
    problem = tf.where(signature_ok, '',
                       'image/encoded is not a JPEG, PNG, GIF, BMP or WebP image')
    example = {common.IMAGE: image, common.IMAGE_NAME: name}
    if self.decode_labels:
      label, size_ok = tfrecord.decode_label(
          parsed[common.KEY_ENCODED_LABEL], parsed[common.KEY_LABEL_FORMAT], shape[0], shape[1])
      example[common.LABEL] = label
      problem = tf.where(
          tf.logical_or(problem != '', size_ok), problem,
          tf.strings.format('the label size does not match the image size {}x{}',
                            (shape[0], shape[1])))
      problem = tf.where(problem != '', problem, self._label_problem(label))
    example['problem'] = problem
    return example

  def _label_problem(self, label: tf.Tensor) -> tf.Tensor:
    """'' or a description of a panoptic id that cannot belong to this dataset."""
    d = self.descriptor
    semantic = label // d.panoptic_label_divisor
    instance = label % d.panoptic_label_divisor
    known = tf.logical_or(tf.logical_and(semantic >= 0, semantic < d.num_classes),
                          tf.equal(semantic, d.ignore_label))
    stuff = tf.constant([not t for t in d.class_has_instances] + [True], tf.bool)
    on_stuff = tf.logical_and(
        instance > 0,
        tf.gather(stuff, tf.clip_by_value(semantic, 0, d.num_classes)))
    on_stuff = tf.logical_and(on_stuff, tf.logical_and(known, semantic != d.ignore_label))
    bad_class = tf.reduce_min(tf.where(known, tf.reduce_max(label) + 1, label))
    bad_stuff = tf.reduce_min(tf.where(on_stuff, label, tf.reduce_max(label) + 1))
    return tf.case([
        (tf.logical_not(tf.reduce_all(known)), lambda: tf.strings.format(
            'panoptic id {} decodes to class {} with panoptic_label_divisor {}, outside the {} '
            'classes of dataset "{}" (was the data written with another label divisor, or are '
            'instance ids >= the divisor?)',
            (bad_class, bad_class // d.panoptic_label_divisor, d.panoptic_label_divisor,
             d.num_classes, d.name))),
        (tf.reduce_any(on_stuff), lambda: tf.strings.format(
            'panoptic id {} gives instance {} to stuff class {}; stuff pixels need instance 0',
            (bad_stuff, bad_stuff % d.panoptic_label_divisor,
             bad_stuff // d.panoptic_label_divisor))),
    ], default=lambda: tf.constant(''))

  def _enforce(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Stops on (strict) or drops and counts (skip_bad_examples) examples with a problem."""
    if self.options.skip_bad_examples:
      counter = self.num_skipped

      def keep(example):
        ok = tf.equal(example['problem'], '')
        counter.assign_add(tf.cast(tf.logical_not(ok), tf.int64))
        return ok
      return dataset.filter(keep)

    def check(example):
      message = tf.strings.join(['image "', example[common.IMAGE_NAME], '": ',
                                 example['problem']])
      assertion = tf.debugging.Assert(tf.equal(example['problem'], ''),
                                      [_PROBLEM_MARKER, message], summarize=1)
      with tf.control_dependencies([assertion]):
        return {k: tf.identity(v) for k, v in example.items()}
    return dataset.map(check)

  # ---- Augmentation and targets ----

  def _augment(self, example: dict, seed: tf.Tensor, scale_multiplier: float = 1.0,
               label_pad_offset: int = 0, autoaugment: bool = True) -> dict:
    """Training geometry and colour augmentation of one decoded example."""
    opts = self.options
    aug = opts.augmentations
    d = self.descriptor
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
    image = tf.cast(example[common.IMAGE], tf.float32)
    label = example[common.LABEL]
    min_size = preprocessing.resize_spec(opts.min_resize_value)
    max_size = preprocessing.resize_spec(opts.max_resize_value)
    if min_size or max_size:
      image, label = preprocessing.resize_to_range(image, label, min_size, max_size,
                                                   opts.resize_factor)
    scale = preprocessing.random_scale(seeds[0], aug.min_scale_factor * scale_multiplier,
                                       aug.max_scale_factor * scale_multiplier,
                                       aug.scale_factor_step_size * scale_multiplier)
    image, label = preprocessing.scale_image_and_label(image, label, scale)
    if autoaugment and aug.autoaugment_policy_name:
      # pylint: disable-next=g-import-not-at-top
      from deeplab2_kmax.data.input import autoaugment as autoaugment_lib
      image = tf.cast(autoaugment_lib.distort_image(
          tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
          aug.autoaugment_policy_name, seeds[1]), tf.float32)
    pad_label = d.ignore_label * d.panoptic_label_divisor + label_pad_offset
    image, label = preprocessing.pad_to_crop_with_random_offset(
        seeds[2], image, label, self.crop_size[0], self.crop_size[1], pad_label)
    image, label = preprocessing.random_crop(seeds[3], image, label, *self.crop_size)
    image, label = preprocessing.random_flip(seeds[4], image, label,
                                             aug.horizontal_flip_probability)
    image.set_shape([self.crop_size[0], self.crop_size[1], 3])
    label.set_shape([self.crop_size[0], self.crop_size[1], 1])
    return {**example, common.IMAGE: image, common.LABEL: label}

  def _targets(self, example: dict) -> dict:
    d = self.descriptor
    opts = self.options
    targets, num_things = sample_generator.panoptic_targets(
        example[common.LABEL], label_divisor=d.panoptic_label_divisor,
        ignore_label=d.ignore_label, thing_class_ids=d.thing_class_ids,
        max_thing_id=opts.max_thing_id,
        small_instance_threshold=(opts.small_instance_threshold
                                  if opts.increase_small_instance_weights else 0),
        small_instance_weight=opts.small_instance_weight)
    result = {k: v for k, v in example.items() if k != common.LABEL}
    result.update(targets)
    result['problem'] = tf.where(
        num_things <= opts.max_thing_id, '',
        tf.strings.format('{} thing instances in the crop exceed max_thing_id {}; raise '
                          'max_thing_id in the dataset options', (num_things,
                                                                  opts.max_thing_id)))
    return result

  def _eval_example(self, example: dict) -> dict:
    d = self.descriptor
    opts = self.options
    image = tf.cast(example[common.IMAGE], tf.float32)
    size_raw = tf.shape(image)[:2]
    label = example.get(common.LABEL)
    image, label_crop, resized_size = preprocessing.preprocess_for_eval(
        image, label, self.crop_size, opts.min_resize_value, opts.max_resize_value,
        opts.resize_factor, d.ignore_label * d.panoptic_label_divisor)
    result = {common.IMAGE: image, common.IMAGE_NAME: example[common.IMAGE_NAME],
              common.GT_SIZE_RAW: size_raw, common.RESIZED_SIZE: resized_size,
              'problem': example['problem']}
    if label is not None:
      raw = label[..., 0]
      semantic_raw = raw // d.panoptic_label_divisor
      thing_ids = tf.constant(list(d.thing_class_ids) or [-1], tf.int32)
      result[common.GT_PANOPTIC_RAW] = raw
      result[common.GT_SEMANTIC_RAW] = semantic_raw
      result[common.GT_IS_CROWD_RAW] = tf.logical_and(
          tf.reduce_any(semantic_raw[..., tf.newaxis] == thing_ids, axis=-1),
          tf.equal(raw % d.panoptic_label_divisor, 0))
      result[common.LABEL] = label_crop
      result = self._targets(result)
      result['problem'] = tf.where(example['problem'] != '', example['problem'],
                                   result['problem'])
    return result

  # ---- Assembly ----

  def _records(self, files: list[str], shuffle_seed: Optional[int],
               record_share: Optional[tuple[int, int]] = None) -> tf.data.Dataset:
    """The serialized examples of `files`; `record_share` (index, count) keeps every count-th
    record from the index-th on, reading the files in order (for fewer files than pipelines)."""
    opts = self.options
    if record_share is not None:
      index, count = record_share
      dataset = tf.data.TFRecordDataset(files)
      if opts.skip_bad_examples:
        dataset = dataset.ignore_errors(log_warning=True)
      dataset = dataset.shard(count, index)
      if self.is_training:
        dataset = dataset.repeat().shuffle(opts.shuffle_buffer_size, seed=shuffle_seed,
                                           reshuffle_each_iteration=True)
      return dataset
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if self.is_training:
      dataset = dataset.shuffle(len(files), seed=shuffle_seed,
                                reshuffle_each_iteration=True).repeat()
    read = (lambda f: tf.data.TFRecordDataset(f).ignore_errors(log_warning=True)
            if opts.skip_bad_examples else tf.data.TFRecordDataset(f))
    dataset = dataset.interleave(
        read, cycle_length=min(opts.cycle_length, len(files)) if self.is_training else 1,
        **({'num_parallel_calls': tf.data.AUTOTUNE,
            'deterministic': True if opts.deterministic else None}
           if self.is_training else {}))
    if self.is_training:
      dataset = dataset.shuffle(opts.shuffle_buffer_size, seed=shuffle_seed,
                                reshuffle_each_iteration=True)
    return dataset

  def _decoded(self, files, shuffle_seed, record_share=None) -> tf.data.Dataset:
    parallel = tf.data.AUTOTUNE
    deterministic = True if (self.options.deterministic or not self.is_training) else None
    dataset = self._records(files, shuffle_seed, record_share).map(
        self._decode, num_parallel_calls=parallel, deterministic=deterministic)
    if self.options.skip_bad_examples:
      # Images that pass the signature check but still fail to decode (e.g. truncated).
      dataset = dataset.ignore_errors(log_warning=True)
    return self._enforce(dataset)

  def dataset(self, input_context: Optional[tf.distribute.InputContext] = None
              ) -> tf.data.Dataset:
    """The batched dataset (per-replica batch when `input_context` is given)."""
    opts = self.options
    files = self.files
    batch_size = opts.batch_size
    record_share = None
    if input_context is not None:
      batch_size = input_context.get_per_replica_batch_size(opts.batch_size)
      index, count = input_context.input_pipeline_id, input_context.num_input_pipelines
      if count > 1 and len(files) >= count:
        files = files[index::count]
      elif count > 1:
        record_share = (index, count)
    base_seed = opts.seed if opts.deterministic else None
    if base_seed is None:
      base_seed = int(tf.random.uniform([], 0, 2**31 - 1, dtype=tf.int64).numpy())
    deterministic = True if (opts.deterministic or not self.is_training) else None
    parallel = tf.data.AUTOTUNE

    dataset = self._decoded(files, shuffle_seed=base_seed, record_share=record_share)
    if not self.is_training:
      dataset = dataset.map(self._eval_example, num_parallel_calls=parallel,
                            deterministic=True)
      dataset = self._enforce(dataset).map(_drop_problem)
      padded_shapes = {k: v.shape for k, v in dataset.element_spec.items()}
      d = self.descriptor
      padding_values = {k: tf.zeros([], v.dtype) if v.dtype != tf.string else ''
                        for k, v in dataset.element_spec.items()}
      if common.GT_PANOPTIC_RAW in padding_values:
        padding_values[common.GT_PANOPTIC_RAW] = tf.constant(
            d.ignore_label * d.panoptic_label_divisor, tf.int32)
        padding_values[common.GT_SEMANTIC_RAW] = tf.constant(d.ignore_label, tf.int32)
      dataset = dataset.padded_batch(batch_size, padded_shapes, padding_values)
      return dataset.prefetch(tf.data.AUTOTUNE)

    dataset = dataset.enumerate().map(
        lambda index, example: self._augment(example, tf.stack([tf.cast(base_seed, tf.int64),
                                                               index])),
        num_parallel_calls=parallel, deterministic=deterministic)
    paste = opts.augmentations.panoptic_copy_paste
    if paste.panoptic_copy_paste_scale > 0:
      paste_dataset = self._decoded(files, shuffle_seed=base_seed + 1).enumerate().map(
          lambda index, example: self._augment(
              example, tf.stack([tf.cast(base_seed + 1, tf.int64), index]),
              scale_multiplier=paste.panoptic_copy_paste_scale, label_pad_offset=1,
              autoaugment=False),
          num_parallel_calls=parallel, deterministic=deterministic)
      dataset = tf.data.Dataset.zip((dataset.enumerate(), paste_dataset)).map(
          lambda indexed, other: self._paste(indexed[1], other,
                                             tf.stack([tf.cast(base_seed + 2, tf.int64),
                                                       indexed[0]])),
          num_parallel_calls=parallel, deterministic=deterministic)
    dataset = dataset.map(self._targets, num_parallel_calls=parallel,
                          deterministic=deterministic)
    dataset = self._enforce(dataset).map(_drop_problem)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)

  def _paste(self, example: dict, other: dict, seed: tf.Tensor) -> dict:
    from deeplab2_kmax.data.input import copy_paste  # pylint: disable=g-import-not-at-top
    paste = self.options.augmentations.panoptic_copy_paste
    d = self.descriptor
    image, label = copy_paste.paste(
        example[common.IMAGE], example[common.LABEL], other[common.IMAGE], other[common.LABEL],
        seed=seed, thing_option=paste.panoptic_copy_paste_thing_option,
        stuff_option=paste.panoptic_copy_paste_stuff_option,
        void_option=paste.panoptic_copy_paste_void_option, ignore_label=d.ignore_label,
        label_divisor=d.panoptic_label_divisor, thing_class_ids=d.thing_class_ids)
    return {**example, common.IMAGE: image, common.LABEL: label}

  # ---- Iteration with readable errors ----

  def explain(self, error: tf.errors.OpError) -> Optional[str]:
    """A one-paragraph description of a data error raised while iterating, or None when the
    error did not come from the data."""
    return explain_error(error, self.files)

  def iterate(self, input_context=None) -> Iterator[dict]:
    """Iterates the dataset, turning data errors into DataError."""
    iterator = iter(self.dataset(input_context))
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except tf.errors.OpError as error:
        message = self.explain(error)
        if message is None:
          raise
        raise DataError(message) from None
      yield batch


def _drop_problem(example: dict) -> dict:
  return {k: v for k, v in example.items() if k != 'problem'}


def explain_error(error: tf.errors.OpError, files: list[str]) -> Optional[str]:
  """Maps a TensorFlow error from the input pipeline to a message naming the file or image."""
  text = error.message
  match = _PROBLEM_PATTERN.search(text)
  if _PROBLEM_MARKER in text and match:
    # TensorFlow quotes the assertion data; undo its escaping of quotes.
    detail = match.group(1).strip().strip('[]').strip().replace('\\"', '"')
    return f'bad example in {_files_text(files)}: {detail}'
  if isinstance(error, (tf.errors.DataLossError, tf.errors.InvalidArgumentError)):
    found = tfrecord.diagnose_files(files)
    if found:
      return found
    if isinstance(error, tf.errors.DataLossError):
      return f'corrupted data while reading {_files_text(files)}: {error.message}'
  return None


def _files_text(files: list[str]) -> str:
  return files[0] if len(files) == 1 else f'{len(files)} files ({files[0]}, ...)'


def log_skipped(pipeline: InputPipeline) -> None:
  if pipeline.options.skip_bad_examples:
    logging.info('skipped %d bad examples so far', int(pipeline.num_skipped.numpy()))
