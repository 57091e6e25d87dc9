"""TF Serving warm-up requests written with every SavedModel export.

TF Serving runs the requests of `<version>/assets.extra/tf_serving_warmup_requests` when it
loads a version (flag --enable_model_warmup, on by default), before the version serves, so the
first client request does not pay for TensorFlow's lazy initialisation (graph optimisation,
kernel creation, memory pools). The file is a TFRecord file of serialized
`tensorflow_serving.apis.prediction_log_pb2.PredictionLog` records, each holding a
`predict_log.request` (a PredictRequest with model_spec.signature_name and the signature's
inputs); TF Serving reads at most MAX_RECORDS of them.

Two requests per written signature (image_shapes): one image of the eval crop's aspect ratio and
one half as high (another aspect ratio, which also exercises the resize back to the image's
size), at most MAX_IMAGE_SIDE pixels a side (the graph resizes every image to the crop).
Each request holds the export's fixed batch size of images (1 for a dynamic batch). Images are
deterministic gradients: no randomness, so an export is reproducible byte for byte. The
image_bytes signature gets PNG bytes, tf_example a serialized tf.Example with DeepLab2's keys.
"""

import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.formats import tfrecord
from deeplab2_kmax.export import serving_module as serving_lib

# TF Serving's names: the folder of a version's extra files, and the warm-up file in it.
ASSETS_EXTRA = 'assets.extra'
WARMUP_FILE = 'tf_serving_warmup_requests'
# TF Serving reads no more records than this (saved_model_warmup.md).
MAX_RECORDS = 1000


# Longest side of a warm-up image. Every image is resized to the eval crop in the graph, so the
# model runs at the crop whatever the request's size; small images keep the file small (raw
# uint8 at a 1025x2049 crop and batch 8 would be ~50 MB per record).
MAX_IMAGE_SIDE = 128


def image_shapes(crop_size: Sequence[int]) -> list[tuple[int, int]]:
  """(height, width) of the warm-up images: the eval crop's aspect ratio, and half as high,
  scaled down to at most MAX_IMAGE_SIDE."""
  height, width = int(crop_size[0]), int(crop_size[1])
  scale = min(1.0, MAX_IMAGE_SIDE / max(height, width))
  height, width = max(1, round(height * scale)), max(1, round(width * scale))
  return [(height, width), (max(1, height // 2), width)]


def gradient_images(height: int, width: int, batch_size: int = 1) -> np.ndarray:
  """uint8 [batch_size, height, width, 3]: red rises left to right, green top to bottom, blue
  along the diagonal, each image of the batch shifted in blue (deterministic)."""
  rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
  cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
  red = np.broadcast_to(cols, (height, width))
  green = np.broadcast_to(rows, (height, width))
  images = []
  for index in range(batch_size):
    blue = np.mod((rows + cols) / 2 + 40 * index, 256)
    images.append(np.stack([red, green, blue], axis=-1))
  return np.round(np.stack(images)).astype(np.uint8)


def signature_input(signature: str, images: np.ndarray) -> np.ndarray:
  """The input of `signature` for uint8 images [batch, h, w, 3]."""
  if signature == serving_lib.SIGNATURE_IMAGE_TENSOR:
    return images
  encoded = [png_encoding.encode_png(image) for image in images]
  if signature == serving_lib.SIGNATURE_IMAGE_BYTES:
    return np.array(encoded, dtype=object)
  if signature == serving_lib.SIGNATURE_TF_EXAMPLE:
    height, width = images.shape[1:3]
    # Re-serialized deterministically: the features map's order is otherwise arbitrary.
    return np.array([tf.train.Example.FromString(
        tfrecord.encode_example(data, 'png', f'warmup_{i}', height, width)).SerializeToString(
            deterministic=True) for i, data in enumerate(encoded)], dtype=object)
  raise ValueError(f'signature "{signature}" is unknown; use one of '
                   f'{", ".join(serving_lib.INPUT_NAMES)}.')


def build_requests(signatures: Sequence[str], crop_size: Sequence[int],
                   batch_size: Optional[int] = None, model_name: str = '') -> list:
  """PredictRequests: for each signature, one per image_shapes(crop_size).

  Args:
    signatures: signature names (serving_module.INPUT_NAMES keys).
    crop_size: the eval crop (height, width).
    batch_size: the export's fixed batch size, or None (dynamic: batches of one image).
    model_name: model_spec.name; TF Serving ignores it in warm-up (the model being loaded).
  """
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
  requests = []
  for signature in signatures:
    for height, width in image_shapes(crop_size):
      value = signature_input(signature, gradient_images(height, width, batch_size or 1))
      request = predict_pb2.PredictRequest()
      if model_name:
        request.model_spec.name = model_name
      request.model_spec.signature_name = signature
      request.inputs[serving_lib.INPUT_NAMES[signature]].CopyFrom(tf.make_tensor_proto(value))
      requests.append(request)
  return requests


def module_requests(module: serving_lib.ServingModule, signatures: Sequence[str]) -> list:
  """build_requests for a ServingModule (its eval crop and batch size)."""
  return build_requests(signatures, module.preprocess_options.crop_size, module.batch_size)


def warmup_path(directory: str) -> str:
  """`directory/assets.extra/tf_serving_warmup_requests` of a SavedModel version folder."""
  return os.path.join(directory, ASSETS_EXTRA, WARMUP_FILE)


def write(directory: str, requests: Sequence) -> str:
  """Writes requests as PredictionLog records into the version folder `directory`; returns
  the file's path."""
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  if not requests:
    raise ValueError('no warm-up requests to write.')
  if len(requests) > MAX_RECORDS:
    raise ValueError(f'{len(requests)} warm-up requests; TF Serving reads at most '
                     f'{MAX_RECORDS}.')
  path = warmup_path(directory)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for request in requests:
      log = prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())
  return path


def read(path: str) -> list:
  """The PredictionLog records of a warm-up file (for checks and tests)."""
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(path)]
