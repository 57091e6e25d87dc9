"""The serving graph every export format is traced from: eval preprocessing, model,
post-processor and per-segment arrays in one tf.Module.

Signatures (the SavedModel writes all that export_options.input_type names; ONNX and LiteRT take
serving_default only, since they have no image decoder):

| signature       | input                                           | name          |
|-----------------|-------------------------------------------------|---------------|
| serving_default | uint8 [batch, height, width, 3] (any h, w > 0)  | `images`      |
| image_bytes     | string [batch], JPEG or PNG bytes (any sizes)   | `image_bytes` |
| tf_example      | string [batch], serialized tf.Example with      | `examples`    |
|                 | DeepLab2's keys (image/encoded, ...)            |               |

Each image goes through the evaluation preprocessing (resize to range, pad bottom/right to the
eval crop), the model and the post-processor; the predictions are cropped back and resized to
the image's own size. Outputs, for a batch whose largest image is H x W (smaller images are
padded: void label, instance 0, score 0):

| output           | dtype / shape                 | meaning                                  |
|------------------|-------------------------------|------------------------------------------|
| panoptic_pred    | int32 [batch, H, W]           | semantic * label_divisor + instance      |
| semantic_pred    | int32 [batch, H, W]           | class of each pixel's best mask          |
| instance_pred    | int32 [batch, H, W]           | mask slot + 1 of kept pixels, 0 elsewhere |
| instance_scores  | float32 [batch, H, W]         | confidence of each pixel's instance      |
| semantic_scores  | float32 [batch, H, W]         | confidence of each pixel's class         |
| image_size       | int32 [batch, 2]              | (height, width) of each image            |
| num_segments     | int32 [batch]                 | segments (non-void panoptic ids) found   |
| segment_ids      | int32 [batch, S]              | panoptic id of each segment, ascending;  |
|                  |                               | -1 padding (S = the model's mask slots)  |
| segment_classes  | int32 [batch, S]              | class of each segment; -1 padding        |
| segment_scores   | float32 [batch, S]            | mean instance score over its pixels      |
| segment_areas    | int32 [batch, S]              | pixels of each segment; 0 padding        |

`assets.extra/dataset_descriptor.textproto` holds the label space (class names, colours,
label divisor) for clients.

With export_options.include_raw_outputs the model's raw outputs at the eval crop are added
(`pixel_space_mask_logits`, `transformer_class_logits`, `semantic_logits`, ...).

Bad inputs fail the request with an InvalidArgumentError naming the problem and the batch
index: a zero-size image, empty or undecodable bytes, and, for serving_default, a tensor that is
not [batch, height, width, 3] (checked in the graph: the signature's shape is not enforced on
every path; a rank-3 tf.Tensor passed to the loaded signature in Python reaches the graph). A
tf.Tensor or TensorProto of another dtype is refused before the graph runs. From Python,
`loaded.signatures[...]` converts a numpy array to the signature's dtype itself (a float image
in [0, 1] becomes zeros and ones): runtimes.py refuses it instead.
`error_message` extracts the reason from TensorFlow's "Graph execution error" text.
`build_serving_module` only needs a Keras model returning `pixel_space_mask_logits` and
`transformer_class_logits` and a post-processor, so every meta-architecture exports this way.
"""

import re
from typing import Mapping, Optional, Sequence

import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import precision as precision_lib
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.input import preprocessing
from deeplab2_kmax.data.formats import tfrecord
from deeplab2_kmax.model import builder
from deeplab2_kmax.model.post_processing import post_processor as post_processor_lib

SIGNATURE_IMAGE_TENSOR = 'serving_default'
SIGNATURE_IMAGE_BYTES = 'image_bytes'
SIGNATURE_TF_EXAMPLE = 'tf_example'
# export_options.input_type values and the signature each one writes.
INPUT_TYPES = {'image_tensor': SIGNATURE_IMAGE_TENSOR, 'image_bytes': SIGNATURE_IMAGE_BYTES,
               'tf_example': SIGNATURE_TF_EXAMPLE}
# Input tensor name of each signature.
INPUT_NAMES = {SIGNATURE_IMAGE_TENSOR: 'images', SIGNATURE_IMAGE_BYTES: 'image_bytes',
               SIGNATURE_TF_EXAMPLE: 'examples'}

IMAGE_SIZE = common.PRED_IMAGE_SIZE
NUM_SEGMENTS = common.PRED_NUM_SEGMENTS
SEGMENT_IDS = common.PRED_SEGMENT_IDS
SEGMENT_CLASSES = common.PRED_SEGMENT_CLASSES
SEGMENT_SCORES = common.PRED_SEGMENT_SCORES
SEGMENT_AREAS = common.PRED_SEGMENT_AREAS
PREDICTION_KEYS = (common.PRED_PANOPTIC, common.PRED_SEMANTIC, common.PRED_INSTANCE,
                   common.PRED_INSTANCE_SCORES, common.PRED_SEMANTIC_SCORES)
SEGMENT_KEYS = (NUM_SEGMENTS, SEGMENT_IDS, SEGMENT_CLASSES, SEGMENT_SCORES, SEGMENT_AREAS)
RAW_OUTPUT_KEYS = (common.PRED_PIXEL_SPACE_MASK_LOGITS, common.PRED_TRANSFORMER_CLASS_LOGITS,
                   common.PRED_SEMANTIC_LOGITS, common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE)


class PreprocessOptions:
  """The evaluation preprocessing of eval_dataset_options (crop, resize range and factor)."""

  def __init__(self, crop_size: Sequence[int], min_resize_value: Sequence[int] = (),
               max_resize_value: Sequence[int] = (), resize_factor: int = 0):
    self.crop_size = (int(crop_size[0]), int(crop_size[1]))
    self.min_resize_value = tuple(min_resize_value)
    self.max_resize_value = tuple(max_resize_value)
    self.resize_factor = int(resize_factor)

  @classmethod
  def from_dataset_options(cls, options) -> 'PreprocessOptions':
    return cls(datasets.crop_size_of(options.crop_size), options.min_resize_value,
               options.max_resize_value, options.resize_factor)

  def preprocess(self, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8/float [height, width, 3] -> (float32 [crop_h, crop_w, 3], resized_size int32 [2]).

    Exactly the eval pipeline's preprocessing (data/input/pipeline.py `_eval_example`).
    """
    image, _, resized_size = preprocessing.preprocess_for_eval(
        tf.cast(image, tf.float32), None, self.crop_size, self.min_resize_value,
        self.max_resize_value, self.resize_factor, 0)
    return image, tf.cast(resized_size, tf.int32)


IMAGES_SPEC_TEXT = 'uint8 [batch, height, width, 3]'


def error_message(error: tf.errors.OpError) -> str:
  """The reason of a failed request in one line, without TensorFlow's framing.

  A signature call fails with "Graph execution error:", the node, "<stack traces unavailable>",
  then the reason: an Assert's data (`assertion failed: [a] [b]`, returned as "a b") or the
  op's own message (e.g. "Invalid PNG data, size 60"); an eager op appends " [Op:Name]".
  E.g. "serving_default: `images` must be uint8 [batch, height, width, 3]; got shape [30 40 3]".
  """
  lines = [line.strip() for line in error.message.splitlines()]
  framing = ('Graph execution error', 'Detected at node', '<stack traces unavailable>',
             '[[{{node')
  reasons = [line for line in lines if line and not line.startswith(framing)]
  reason = reasons[0] if reasons else (lines[0] if lines else type(error).__name__)
  reason = reason.split(' [Op:', 1)[0]
  prefix = 'assertion failed: '
  if reason.startswith(prefix):
    # Assert prints each datum as [datum]; they were written to read as one sentence.
    reason = reason[len(prefix):]
    if reason.startswith('[') and reason.endswith(']'):
      reason = reason[1:-1]
    items = reason.split('] [')
    # A tensor of several values (a shape) keeps its brackets; text and scalars read bare.
    items = [f'[{item}]' if ' ' in item and re.fullmatch(r'[-0-9. ]+', item) else item
             for item in items]
    reason = ' '.join(items)
  return reason


def check_images(images: tf.Tensor) -> tf.Tensor:
  """images, once an in-graph check found them [batch, height, width, 3].

  The signature's TensorSpec says so, but it is not enforced on every path (a rank-3 tf.Tensor
  given to the loaded signature in Python reaches the graph), and the resize would then fail
  with "input must be 4-dimensional", 4 channels deep inside map_fn.
  The rank is counted from the shape's values: tf.size(tf.shape(images)) would be folded to the
  static rank 4 by Grappler and never see the tensor that arrives.
  """
  shape = tf.shape(images, out_type=tf.int32)
  rank = tf.reduce_sum(tf.minimum(shape + 1, 1))
  channels_ok = tf.equal(tf.reduce_sum(tf.cast(tf.equal(shape[-1:], 3), tf.int32)), 1)
  check = tf.debugging.Assert(
      tf.logical_and(tf.equal(rank, 4), channels_ok),
      [f'{SIGNATURE_IMAGE_TENSOR}: `{INPUT_NAMES[SIGNATURE_IMAGE_TENSOR]}` must be '
       f'{IMAGES_SPEC_TEXT}; got shape', shape], summarize=8)
  with tf.control_dependencies([check]):
    return tf.identity(images)


def preprocess_batch(images, preprocess_options: PreprocessOptions) -> dict[str, tf.Tensor]:
  """Preprocesses a batch of images one by one (each may have its own size).

  Args:
    images: uint8 [batch, height, width, 3], or `(image_of, inputs)`: a callable
      `i -> uint8 [h_i, w_i, 3]` and the [batch] tensor it reads (for encoded images of
      different sizes).
    preprocess_options: PreprocessOptions.

  Returns:
    {image: float32 [batch, crop_h, crop_w, 3], resized_size: int32 [batch, 2],
     size_raw: int32 [batch, 2]}.
  """
  if isinstance(images, tuple):
    image_of, inputs = images
  else:
    image_of, inputs = (lambda i: images[i]), images
  crop_h, crop_w = preprocess_options.crop_size

  def one(i):
    image = image_of(i)
    size = tf.shape(image, out_type=tf.int32)[:2]
    check = tf.debugging.Assert(tf.reduce_min(size) > 0,
                                ['every image must have height and width > 0; the image at '
                                 'batch index', i, 'has (height, width)', size])
    # Explicitly first: the resize would otherwise fail with its own, vaguer message.
    with tf.control_dependencies([check]):
      image = tf.identity(image)
    image, resized_size = preprocess_options.preprocess(image)
    return image, resized_size, size

  image, resized_size, size_raw = tf.map_fn(
      one, tf.range(tf.shape(inputs)[0]),
      fn_output_signature=(tf.TensorSpec([crop_h, crop_w, 3], tf.float32),
                           tf.TensorSpec([2], tf.int32), tf.TensorSpec([2], tf.int32)))
  # A fixed batch size stays static (tf.range hides it from map_fn).
  for tensor in (image, resized_size, size_raw):
    tensor.set_shape(inputs.shape[:1].concatenate(tensor.shape[1:]))
  return {common.IMAGE: image, common.RESIZED_SIZE: resized_size, common.GT_SIZE_RAW: size_raw}


def segments_of(panoptic: tf.Tensor, instance_scores: tf.Tensor, image_size: tf.Tensor,
                label_divisor: int, ignore_label: int, max_segments: int) -> dict[str, tf.Tensor]:
  """Per-segment arrays of a batch of panoptic maps (see the module docstring's table).

  Args:
    panoptic: int32 [batch, H, W] panoptic ids, each image valid in its top-left image_size.
    instance_scores: float32 [batch, H, W].
    image_size: int32 [batch, 2].
    label_divisor: the dataset's panoptic label divisor.
    ignore_label: the void class; its ids are not segments.
    max_segments: S, the length of the padded arrays (the number of mask slots bounds the
      number of segments).
  """
  def one(args):
    labels, scores, size = args
    labels = tf.reshape(labels[:size[0], :size[1]], [-1])
    scores = tf.reshape(scores[:size[0], :size[1]], [-1])
    ids, index = tf.unique(labels)
    count = tf.size(ids)
    areas = tf.math.unsorted_segment_sum(tf.ones_like(index), index, count)
    sums = tf.math.unsorted_segment_sum(scores, index, count)
    keep = tf.not_equal(ids // label_divisor, ignore_label)
    ids, areas, sums = (tf.boolean_mask(x, keep) for x in (ids, areas, sums))
    order = tf.argsort(ids)[:max_segments]
    ids, areas, sums = (tf.gather(x, order) for x in (ids, areas, sums))
    found = tf.size(ids)
    pad = [[0, max_segments - found]]
    return (found, tf.pad(ids, pad, constant_values=-1),
            tf.pad(ids // label_divisor, pad, constant_values=-1),
            tf.pad(sums / tf.cast(areas, tf.float32), pad), tf.pad(areas, pad))

  outputs = tf.map_fn(
      one, (panoptic, instance_scores, image_size),
      fn_output_signature=(tf.TensorSpec([], tf.int32),
                           tf.TensorSpec([max_segments], tf.int32),
                           tf.TensorSpec([max_segments], tf.int32),
                           tf.TensorSpec([max_segments], tf.float32),
                           tf.TensorSpec([max_segments], tf.int32)))
  return dict(zip(SEGMENT_KEYS, outputs))


def _decode_image_bytes(encoded: tf.Tensor, what: str, index: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG (GIF, BMP, WebP) bytes -> uint8 [height, width, 3], or InvalidArgumentError.

  Args:
    encoded: scalar string.
    what: the input's name in messages, e.g. 'image_bytes'.
    index: the position of encoded in the batch (named in messages).
  """
  empty = tf.debugging.Assert(tf.strings.length(encoded) > 0,
                              [f'{what}: the image at batch index', index,
                               'is empty; send JPEG or PNG bytes'])
  with tf.control_dependencies([empty]):
    known = tf.debugging.Assert(tfrecord.has_image_signature(encoded),
                                [f'{what}: the image at batch index', index,
                                 'is not a JPEG, PNG, GIF, BMP or WebP image; its first bytes '
                                 'are', tf.strings.substr(encoded, 0, 8)])
  # Explicitly before decoding, whose own messages do not name the input.
  with tf.control_dependencies([known]):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


class _Untracked:
  """Holds objects outside the SavedModel's object graph (tf.Module tracks only trackables)."""

  def __init__(self, **values):
    self.__dict__.update(values)


class ServingModule(tf.Module):
  """The exported module: a model, its post-processor and the eval preprocessing in one graph.

  Args:
    model: Keras model, images float [batch, h, w, 3] in [0, 255] -> dict with
      pixel_space_mask_logits and transformer_class_logits (DeepLab2's keys).
    post_processor: callable(model_outputs, eval_batch) -> predictions at each image's size
      (model/post_processing/post_processor.py).
    preprocess_options: PreprocessOptions of the evaluation.
    descriptor: the dataset's DatasetDescriptor.
    batch_size: fixed batch size of the signatures, or None for a dynamic one.
    include_raw_outputs: also return the model's raw outputs at the crop.
  """

  def __init__(self, model, post_processor, preprocess_options: PreprocessOptions, descriptor,
               batch_size: Optional[int] = None, include_raw_outputs: bool = False):
    super().__init__(name='deeplab2_kmax_serving')
    # The Keras model stays out of the SavedModel's object graph (saving it there would trace
    # every layer again, and the serving graph needs only its variables); Keras 3 also keeps
    # sub-layers in its own lists, which that graph does not follow. Listing every variable
    # makes each one a saved, restorable dependency. The list holds the tf.Variable inside
    # each Keras variable, the one the traced graphs read: a Keras variable exports as a copy
    # that TF1-style loaders (the C API, TF Serving) restore while the graph reads the
    # uninitialised original ("Could not find variable ...").
    self._untracked = _Untracked(model=model, post_processor=post_processor,
                                 descriptor=descriptor)
    self.model_variables = [variable.value for variable in model.variables]
    self.preprocess_options = preprocess_options
    self._label_divisor = int(descriptor.panoptic_label_divisor)
    self._ignore_label = int(descriptor.ignore_label)
    self._batch_size = batch_size
    self._include_raw_outputs = include_raw_outputs
    crop_h, crop_w = preprocess_options.crop_size
    # One traced graph of model + post-processing that every signature calls.
    self._untracked.predict_function = tf.function(self.predict, input_signature=[{
        common.IMAGE: tf.TensorSpec([batch_size, crop_h, crop_w, 3], tf.float32),
        common.RESIZED_SIZE: tf.TensorSpec([batch_size, 2], tf.int32),
        common.GT_SIZE_RAW: tf.TensorSpec([batch_size, 2], tf.int32)}])

  @property
  def model(self):
    return self._untracked.model

  @property
  def post_processor(self):
    return self._untracked.post_processor

  @property
  def descriptor(self):
    return self._untracked.descriptor

  @property
  def batch_size(self) -> Optional[int]:
    """The signatures' fixed batch size, or None for a dynamic one."""
    return self._batch_size

  def predict(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Model + post-processing + segments of a preprocessed batch (preprocess_batch's dict)."""
    check = tf.debugging.assert_positive(tf.shape(batch[common.IMAGE])[0],
                                         message='the batch holds no image')
    # Every input through the check: ops that read only the sizes (the post-processor's
    # resize back) would otherwise race it and fail first with their own message.
    with tf.control_dependencies([check]):
      batch = {key: tf.identity(value) for key, value in batch.items()}
    outputs = self.model(batch[common.IMAGE], training=False)
    # Under a bfloat16 policy the post-processor and clients still get float32.
    outputs = {key: tf.cast(value, tf.float32) if value.dtype.is_floating else value
               for key, value in outputs.items()}
    predictions = self.post_processor(outputs, batch)
    result = {key: predictions[key] for key in PREDICTION_KEYS}
    result[IMAGE_SIZE] = batch[common.GT_SIZE_RAW]
    max_segments = outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].shape[-1]
    result.update(segments_of(result[common.PRED_PANOPTIC],
                              result[common.PRED_INSTANCE_SCORES], batch[common.GT_SIZE_RAW],
                              self._label_divisor, self._ignore_label, max_segments))
    if self._include_raw_outputs:
      result.update({key: outputs[key] for key in RAW_OUTPUT_KEYS if key in outputs})
    return result

  def serve_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
    return self._untracked.predict_function(
        preprocess_batch(check_images(images), self.preprocess_options))

  def serve_image_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
    image_of = lambda i: _decode_image_bytes(image_bytes[i], 'image_bytes', i)
    return self._untracked.predict_function(
        preprocess_batch((image_of, image_bytes), self.preprocess_options))

  def serve_examples(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
    def image_of(i):
      encoded = tfrecord.parse_features(examples[i])[common.KEY_ENCODED_IMAGE]
      return _decode_image_bytes(encoded, f'examples ({common.KEY_ENCODED_IMAGE})', i)
    return self._untracked.predict_function(
        preprocess_batch((image_of, examples), self.preprocess_options))

  def input_specs(self) -> dict[str, tf.TensorSpec]:
    """{signature name: its input TensorSpec (named as in INPUT_NAMES)}."""
    batch = self._batch_size
    shapes = {SIGNATURE_IMAGE_TENSOR: ([batch, None, None, 3], tf.uint8),
              SIGNATURE_IMAGE_BYTES: ([batch], tf.string),
              SIGNATURE_TF_EXAMPLE: ([batch], tf.string)}
    return {name: tf.TensorSpec(shape, dtype, name=INPUT_NAMES[name])
            for name, (shape, dtype) in shapes.items()}

  def signatures(self, input_types: Sequence[str] = tuple(INPUT_TYPES)) -> dict:
    """{signature name: concrete function} for the given export_options.input_type values."""
    methods = {SIGNATURE_IMAGE_TENSOR: self.serve_images,
               SIGNATURE_IMAGE_BYTES: self.serve_image_bytes,
               SIGNATURE_TF_EXAMPLE: self.serve_examples}
    specs = self.input_specs()
    result = {}
    for input_type in input_types:
      if input_type not in INPUT_TYPES:
        raise ValueError(f'export_options.input_type "{input_type}" is unknown; use '
                         f'{", ".join(INPUT_TYPES)}.')
      name = INPUT_TYPES[input_type]
      function = tf.function(methods[name], input_signature=[specs[name]])
      result[name] = function.get_concrete_function()
    return result


def parse_batch_size(text: Optional[str], default: int) -> Optional[int]:
  """The signatures' batch size for build_serving_module, from `--batch_size` text.

  Here and not in cli.py because the convention is the library's: export_options.batch_size
  and the flag both say 0 (or "dynamic") for a dynamic batch, which build_serving_module takes
  as None.

  Args:
    text: The flag's value: None (unset: `default` applies), "dynamic", or an integer >= 0.
    default: export_options.batch_size (0 = dynamic).

  Returns:
    A positive batch size, or None for a dynamic one.

  Raises:
    ValueError: naming the value, when it is negative or neither an integer nor "dynamic".
  """
  if text is None:
    value = default
  elif text.strip().lower() == 'dynamic':
    value = 0
  else:
    try:
      value = int(text)
    except ValueError:
      raise ValueError(f'--batch_size must be a positive integer or "dynamic", got '
                       f'"{text}".') from None
  if value < 0:
    raise ValueError(f'--batch_size must be a positive integer or "dynamic", got {value}.')
  return value or None


def build_serving_module(config, model=None, batch_size: Optional[int] = None,
                         include_raw_outputs: Optional[bool] = None,
                         precision: str = 'float32') -> ServingModule:
  """The ServingModule of an ExperimentOptions (model built with fresh weights unless given).

  The model is built on the eval crop, the crop every exported request is preprocessed to.

  Args:
    config: ExperimentOptions.
    model: a built model, or None to build one.
    batch_size: fixed batch size of the signatures, or None for a dynamic one.
    include_raw_outputs: default export_options.include_raw_outputs.
    precision: 'float32' or 'bfloat16' (precision.resolve's result): the compute precision of
      the model built here. A mixed-precision training policy is a training choice and does
      not carry over.
  """
  descriptor = datasets.from_dataset_options(config.eval_dataset_options)
  preprocess_options = PreprocessOptions.from_dataset_options(config.eval_dataset_options)
  if model is None:
    if precision not in precision_lib.KERAS_POLICIES:
      raise ValueError(f'precision "{precision}" must be resolved to one of '
                       f'{", ".join(precision_lib.KERAS_POLICIES)} (precision.resolve).')
    model = builder.build_model(config, crop_size=preprocess_options.crop_size,
                                descriptor=descriptor,
                                dtype=precision_lib.KERAS_POLICIES[precision])
  if include_raw_outputs is None:
    include_raw_outputs = config.export_options.include_raw_outputs
  return ServingModule(model, post_processor_lib.build_post_processor(config, descriptor),
                       preprocess_options, descriptor, batch_size=batch_size,
                       include_raw_outputs=include_raw_outputs)

