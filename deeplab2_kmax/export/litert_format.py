"""LiteRT (TensorFlow Lite) export of the serving_default graph, for phones and edge devices.

TF's converter turns the whole serving graph into LiteRT builtin ops (no Flex / select-TF ops, so
the stock interpreter runs it): the eval preprocessing, model, post-processor and per-segment
arrays. The input is uint8 [batch, height, width, 3] named `images` with a dynamic height and
width (the interpreter's `resize_tensor_input` sets them per image); the outputs carry
serving_module's names in the `serving_default` signature. There is no image decoder: decode
on the device (as camera frames usually are).

Weights are float32, or float16 with `weights='float16'` (half the file; the interpreter
dequantises them to float32 on the CPU, GPU delegates compute in float16).
"""

import os

import tensorflow as tf

from deeplab2_kmax.export import serving_module as serving_lib
from deeplab2_kmax.model.layers import xla_elementwise

LITERT_FILE = 'model.tflite'
WEIGHT_TYPES = ('float32', 'float16')


def write(module: serving_lib.ServingModule, directory: str, weights: str = 'float32') -> str:
  """Converts module's serving_default to `directory/model.tflite`; returns the file's path."""
  if weights not in WEIGHT_TYPES:
    raise ValueError(f'--litert_weights "{weights}" is unknown; use one of '
                     f'{", ".join(WEIGHT_TYPES)}.')
  spec = module.input_specs()[serving_lib.SIGNATURE_IMAGE_TENSOR]
  with xla_elementwise.disabled():
    function = tf.function(module.serve_images).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if weights == 'float16':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    flatbuffer = converter.convert()
  tf.io.gfile.makedirs(directory)
  path = os.path.join(directory, LITERT_FILE)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(flatbuffer)
  return path
