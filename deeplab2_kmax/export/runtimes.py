"""Runs an export in any of its formats behind one call: uint8 images in, numpy outputs out.

    runtime = runtimes.load('exports/kmax')            # SavedModel base path or version folder
    runtime = runtimes.load('exports/kmax/1/model.onnx')     # ONNX Runtime
    runtime = runtimes.load('exports/kmax/1/model.tflite')   # LiteRT interpreter
    outputs = runtime(images)   # uint8 [batch, height, width, 3] -> {name: numpy array}

Another dtype or shape is refused with a ValueError before the runtime runs (check_images).

Every format takes the serving_default input and returns serving_module's outputs, by name. The
label space comes from `assets.extra/dataset_descriptor.textproto` in the version folder (all
formats are written there), or, for a lone .onnx file, from its metadata.
"""

import os
from typing import Optional

from google.protobuf import text_format
import numpy as np
import tensorflow as tf

from deeplab2_kmax.data import datasets
from deeplab2_kmax.export import litert_format
from deeplab2_kmax.export import onnx_format
from deeplab2_kmax.export import saved_model as saved_model_lib
from deeplab2_kmax.export import serving_module as serving_lib
from deeplab2_kmax.protos import dataset_pb2

FORMATS = ('saved_model', 'onnx', 'litert')
_SUFFIXES = {'.onnx': 'onnx', '.tflite': 'litert'}
_INPUT = serving_lib.INPUT_NAMES[serving_lib.SIGNATURE_IMAGE_TENSOR]


def format_of(path: str) -> str:
  """'saved_model', 'onnx' or 'litert' from a path, or ValueError naming what it is."""
  suffix = os.path.splitext(path.rstrip('/'))[1].lower()
  if suffix in _SUFFIXES:
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'--model {path} does not exist.')
    return _SUFFIXES[suffix]
  if tf.io.gfile.isdir(path):
    saved_model_lib.latest_version_dir(path)  # raises with a message if it is not an export
    return 'saved_model'
  what = 'does not exist' if not tf.io.gfile.exists(path) else 'is a file of an unknown kind'
  raise ValueError(f'--model {path} {what}; give a SavedModel (the --output_path of '
                   'deeplab2_kmax.export or a version folder), a .onnx file or a .tflite file.')


def check_images(images) -> np.ndarray:
  """images as the uint8 [batch, height, width, 3] numpy array every format takes, or
  ValueError naming serving_default's input and what arrived.

  Checked here, in Python, because nothing downstream refuses a wrong dtype: TensorFlow's
  binding converts a numpy array to the signature's dtype (float images in [0, 1] would become
  zeros), and ONNX Runtime and LiteRT fail in their own terms, if at all.
  """
  array = images.numpy() if isinstance(images, tf.Tensor) else np.asarray(images)
  expected = (f'{serving_lib.SIGNATURE_IMAGE_TENSOR} input `{_INPUT}` must be '
              f'{serving_lib.IMAGES_SPEC_TEXT}')
  got = f'got {array.dtype} {list(array.shape)}'
  if array.dtype != np.uint8:
    values = ''
    if np.issubdtype(array.dtype, np.floating) and array.size and \
        0 <= np.min(array) and np.max(array) <= 1:
      values = ' in [0, 1]'
    raise ValueError(f'{expected}; {got}{values}: scale to 0..255 and convert with '
                     '.astype(np.uint8).')
  if array.ndim != 4 or array.shape[-1] != 3:
    hint = ' (one image: add the batch axis with x[np.newaxis])' if array.ndim == 3 and \
        array.shape[-1] == 3 else ''
    if array.ndim == 4 and array.shape[-1] in (1, 4):
      hint = ' (RGB only: drop alpha with x[..., :3], or repeat a grey channel 3 times)'
    raise ValueError(f'{expected}; {got}{hint}.')
  return array


def _descriptor_beside(path: str):
  """The DatasetDescriptor in assets.extra of the folder holding path, or None."""
  folder = os.path.dirname(os.path.abspath(path))
  if not tf.io.gfile.exists(saved_model_lib.descriptor_path(folder)):
    return None
  return saved_model_lib.load_descriptor(folder)


def _descriptor_from_text(text: str):
  return datasets.from_inline_options(
      text_format.Parse(text, dataset_pb2.DatasetDescriptorOptions()))


class SavedModelRuntime:
  """The serving_default signature of a loaded SavedModel."""

  format = 'saved_model'

  def __init__(self, path: str):
    self.path = saved_model_lib.latest_version_dir(path)
    self.loaded = tf.saved_model.load(self.path)
    self.signatures = self.loaded.signatures
    self._signature = self.signatures[serving_lib.SIGNATURE_IMAGE_TENSOR]
    self.descriptor = saved_model_lib.load_descriptor(self.path)

  def __call__(self, images: np.ndarray) -> dict:
    images = tf.constant(check_images(images))
    return {k: v.numpy() for k, v in self._signature(**{_INPUT: images}).items()}


class OnnxRuntime:
  """An ONNX Runtime InferenceSession (CPU provider unless providers are given)."""

  format = 'onnx'

  def __init__(self, path: str, providers: Optional[list] = None,
               num_threads: Optional[int] = None):
    try:
      import onnxruntime  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'running {path} needs onnxruntime; {onnx_format.INSTALL_HINT}.') from None
    options = onnxruntime.SessionOptions()
    if num_threads:
      options.intra_op_num_threads = num_threads
    self.path = path
    self.session = onnxruntime.InferenceSession(
        path, options, providers=providers or ['CPUExecutionProvider'])
    self._names = [output.name for output in self.session.get_outputs()]
    metadata = self.session.get_modelmeta().custom_metadata_map
    if onnx_format.METADATA_DESCRIPTOR in metadata:
      self.descriptor = _descriptor_from_text(metadata[onnx_format.METADATA_DESCRIPTOR])
    else:
      self.descriptor = _descriptor_beside(path)

  def __call__(self, images: np.ndarray) -> dict:
    values = self.session.run(self._names, {_INPUT: check_images(images)})
    return dict(zip(self._names, values))


class LiteRTRuntime:
  """The LiteRT interpreter (ai-edge-litert, else TF's own) with its default delegate (XNNPACK
  on CPUs); threads default to the machine's cores."""

  format = 'litert'

  def __init__(self, path: str, num_threads: Optional[int] = None):
    try:
      # pylint: disable-next=g-import-not-at-top
      from ai_edge_litert import interpreter as interpreter_lib
    except ImportError:  # TF's copy, deprecated but present in TF 2.20
      interpreter_lib = tf.lite
    self.path = path
    self.interpreter = interpreter_lib.Interpreter(model_path=path,
                                                   num_threads=num_threads or os.cpu_count())
    self._runner = self.interpreter.get_signature_runner(serving_lib.SIGNATURE_IMAGE_TENSOR)
    self.descriptor = _descriptor_beside(path)

  def __call__(self, images: np.ndarray) -> dict:
    # The signature runner resizes the dynamic input to each call's shape.
    return dict(self._runner(**{_INPUT: check_images(images)}))


def load(path: str, num_threads: Optional[int] = None):
  """The runtime of an export, chosen by format_of(path)."""
  kind = format_of(path)
  if kind == 'onnx':
    return OnnxRuntime(path, num_threads=num_threads)
  if kind == 'litert':
    return LiteRTRuntime(path, num_threads=num_threads)
  return SavedModelRuntime(path)
