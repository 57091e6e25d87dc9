"""SavedModel writer and reader helpers: TF Serving's versioned layout, the label space in
assets.extra, and the newest version of a base path.

`write` puts `<output_path>/<version>/` with the tag `serve`, the signatures of
serving_module.ServingModule and, in `assets.extra/`:
- `dataset_descriptor.textproto`: class names, colours, label divisor (for clients such as
  deeplab2_kmax.predict; TF Serving ignores it);
- `tf_serving_warmup_requests`: TF Serving's warm-up file (serving_warmup.py), a TFRecord file
  of PredictionLog records, two PredictRequests per written signature at the export's batch
  size, which TF Serving runs when it loads the version so the first client request is not
  slowed by TensorFlow's lazy initialisation.
"""

import os
from typing import Sequence

from google.protobuf import text_format
import tensorflow as tf

from deeplab2_kmax.data import datasets
from deeplab2_kmax.export import serving_module as serving_lib
from deeplab2_kmax.export import serving_warmup
from deeplab2_kmax.model.layers import xla_elementwise
from deeplab2_kmax.protos import dataset_pb2

TAG_SERVE = 'serve'
ASSETS_EXTRA = serving_warmup.ASSETS_EXTRA
DESCRIPTOR_FILE = 'dataset_descriptor.textproto'


def write(module: serving_lib.ServingModule, output_path: str, version: int = 1,
          input_types: Sequence[str] = tuple(serving_lib.INPUT_TYPES)) -> str:
  """Writes module as `output_path/<version>/`; returns that directory."""
  input_types = list(input_types) or list(serving_lib.INPUT_TYPES)
  if 'image_tensor' not in input_types:
    # TF Serving answers requests without a signature name with serving_default.
    raise ValueError('export_options.input_type must include "image_tensor" (serving_default).')
  directory = os.path.join(output_path, str(version))
  if tf.io.gfile.exists(directory):
    tf.io.gfile.rmtree(directory)
  # Traced without XLA functions: TF Serving's XLA:CPU JIT is off by default.
  with xla_elementwise.disabled():
    tf.saved_model.save(module, directory, signatures=module.signatures(input_types))
  write_descriptor(directory, module.descriptor)
  write_warmup(directory, module, [serving_lib.INPUT_TYPES[t] for t in input_types])
  return directory


def write_warmup(directory: str, module: serving_lib.ServingModule,
                 signatures: Sequence[str]) -> str:
  """Writes TF Serving's warm-up requests for signatures into directory/assets.extra."""
  return serving_warmup.write(directory, serving_warmup.module_requests(module, signatures))


def warmup_path(directory: str) -> str:
  return serving_warmup.warmup_path(directory)


def descriptor_text(descriptor) -> str:
  """A DatasetDescriptor as DatasetDescriptorOptions textproto (what load_descriptor reads)."""
  return text_format.MessageToString(datasets.to_inline_options(descriptor))


def write_descriptor(directory: str, descriptor) -> str:
  """Writes the label space (class names, colours, divisor) for clients such as
  deeplab2_kmax.predict into directory/assets.extra (TF Serving ignores that folder)."""
  tf.io.gfile.makedirs(os.path.join(directory, ASSETS_EXTRA))
  path = descriptor_path(directory)
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(descriptor_text(descriptor))
  return path


def descriptor_path(directory: str) -> str:
  return os.path.join(directory, ASSETS_EXTRA, DESCRIPTOR_FILE)


def load_descriptor(directory: str):
  """The DatasetDescriptor written next to an exported SavedModel."""
  path = descriptor_path(directory)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'{path} is missing; it is written by deeplab2_kmax.export (export '
                            'again, or predict with --config_file and --checkpoint_path).')
  with tf.io.gfile.GFile(path) as f:
    options = text_format.Parse(f.read(), dataset_pb2.DatasetDescriptorOptions())
  return datasets.from_inline_options(options)


def latest_version_dir(saved_model: str) -> str:
  """A SavedModel folder, or the newest numeric version inside a TF Serving base path."""
  if tf.io.gfile.exists(os.path.join(saved_model, 'saved_model.pb')):
    return saved_model
  versions = [int(name.rstrip('/')) for name in tf.io.gfile.listdir(saved_model)
              if name.rstrip('/').isdigit()] if tf.io.gfile.isdir(saved_model) else []
  if not versions:
    raise FileNotFoundError(f'{saved_model} is neither a SavedModel (no saved_model.pb) nor a '
                            'base path with numeric version folders; pass the --output_path '
                            'of deeplab2_kmax.export or one of its version folders.')
  return os.path.join(saved_model, str(max(versions)))
