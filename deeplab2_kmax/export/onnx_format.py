"""ONNX export of the serving_default graph (through tf2onnx), for ONNX Runtime and the
runtimes behind it (TensorRT, DirectML, OpenVINO execution providers).

The whole serving graph converts: the eval preprocessing (resize to range, pad), the model, the
post-processor and the per-segment arrays, so a client sends uint8 [batch, height, width, 3]
(`images`, any height and width) and gets the outputs of serving_module's table, by name. There
is no image decoder in ONNX: the image_bytes and tf_example signatures are SavedModel-only.

Two TF ops need our own conversion (passed to tf2onnx as custom handlers, nothing is patched):
- `Erfc` (exact GELU, as DeepLab2 computes it) has no ONNX op: it becomes `1 - Erf(x)`.
- `ResizeBilinear` / `ResizeNearestNeighbor` to a static size: tf2onnx writes their target as
  `scales = new / old` in float32, and ONNX sizes the output as floor(old * scales), which for
  3 -> 5 gives 4 (0.99999994 short of 5); the model then fails to load. We give ONNX the
  output `sizes` instead. Dynamic-size resizes keep tf2onnx's own conversion.

A note for new post-processing code: tf2onnx converts `tf.gather(x, i, axis=k, batch_dims=1)`
with k > 1 by transposing the whole of x to put axis k first, on every call (and, inside a
loop, on every step: ONNX Runtime does not hoist it). The mask-wise post-processor therefore
keeps its masks slots-first ([batch, slots, H, W]) and picks with axis=1; with the strided pick
a 641x641 kMaX-R50 call spent 10 s of 17 s in those transposes (docs/benchmarks.md).

The dataset descriptor (label space) is stored in the model's metadata_props under
METADATA_DESCRIPTOR, so a .onnx file describes its classes on its own.
"""

import os

import numpy as np
import tensorflow as tf

from deeplab2_kmax.export import serving_module as serving_lib
from deeplab2_kmax.model.layers import xla_elementwise

ONNX_FILE = 'model.onnx'
# Opset 17 (ONNX 1.12, 2022): ONNX Runtime >= 1.12, TensorRT 8.5+, OpenVINO 2022.3+.
DEFAULT_OPSET = 17
METADATA_DESCRIPTOR = 'deeplab2_kmax.dataset_descriptor'
INSTALL_HINT = 'pip install "deeplab2_kmax[onnx]" (tf2onnx, onnx and onnxruntime)'


def _convert_erfc(ctx, node, name, args):
  """tf2onnx handler: Erfc(x) -> Sub(1, Erf(x))."""
  del name, args
  from tf2onnx import utils  # pylint: disable=g-import-not-at-top
  dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
  erf = ctx.make_node('Erf', [node.input[0]])
  one = ctx.make_const(utils.make_name('erfc_one'), np.array(1, dtype))
  ctx.replace_inputs(node, [one.output[0], erf.output[0]])
  node.type = 'Sub'


def _convert_resize(ctx, node, name, args):
  """tf2onnx handler: a resize to a constant size as ONNX Resize with `sizes` (module doc)."""
  del name, args
  from tf2onnx import constants  # pylint: disable=g-import-not-at-top
  from tf2onnx import utils  # pylint: disable=g-import-not-at-top
  from tf2onnx.onnx_opset import nn  # pylint: disable=g-import-not-at-top
  if not node.inputs[1].is_const():
    return nn.Resize.version_11(ctx, node)
  new_height, new_width = (int(v) for v in node.inputs[1].get_tensor_value())
  align_corners = bool(node.get_attr_value('align_corners', 0))
  half_pixel = bool(node.get_attr_value('half_pixel_centers', 0))
  bilinear = node.type == 'ResizeBilinear'
  if align_corners:
    transformation = 'align_corners'
  elif half_pixel:
    transformation = 'half_pixel' if bilinear else 'tf_half_pixel_for_nn'
  else:
    transformation = 'asymmetric'
  const = lambda prefix, value: ctx.make_const(utils.make_name(prefix), value).output[0]
  nchw = ctx.make_node('Transpose', [node.input[0]], {'perm': constants.NHWC_TO_NCHW})
  # Batch and channels come from the input at run time, height and width are the constant.
  shape = ctx.make_node('Shape', [nchw.output[0]])
  batch_channels = ctx.make_node('Slice', [shape.output[0], const('start', np.array([0])),
                                           const('end', np.array([2]))])
  sizes = ctx.make_node('Concat', [batch_channels.output[0],
                                   const('size', np.array([new_height, new_width]))],
                        {'axis': 0})
  resize = ctx.make_node(
      'Resize', [nchw.output[0], const('roi', np.array([], np.float32)),
                 const('scales', np.array([], np.float32)), sizes.output[0]],
      attr={'mode': 'linear' if bilinear else 'nearest',
            'coordinate_transformation_mode': transformation,
            'nearest_mode': 'round_prefer_ceil' if align_corners else 'floor'})
  shapes, dtypes = node.output_shapes, node.output_dtypes
  ctx.remove_node(node.name)
  ctx.make_node('Transpose', resize.output, {'perm': constants.NCHW_TO_NHWC}, name=node.name,
                outputs=node.output, shapes=shapes, dtypes=dtypes)


_CUSTOM_HANDLERS = {'Erfc': (_convert_erfc, []),
                    'ResizeBilinear': (_convert_resize, []),
                    'ResizeNearestNeighbor': (_convert_resize, [])}


def write(module: serving_lib.ServingModule, directory: str, descriptor_text: str,
          opset: int = DEFAULT_OPSET) -> str:
  """Converts module's serving_default to `directory/model.onnx`; returns the file's path.

  Args:
    module: the ServingModule (float32 model).
    directory: output folder (created).
    descriptor_text: the DatasetDescriptorOptions textproto stored in the metadata.
    opset: ONNX opset version.
  """
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    import tf2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f'--format=onnx needs tf2onnx and onnx ({error}); {INSTALL_HINT}.') from None
  tf2onnx.logging.set_level(tf2onnx.logging.ERROR)
  spec = module.input_specs()[serving_lib.SIGNATURE_IMAGE_TENSOR]
  # Traced without XLA-compiled functions, which tf2onnx cannot read.
  with xla_elementwise.disabled():
    model_proto, _ = tf2onnx.convert.from_function(
        tf.function(module.serve_images), input_signature=[spec], opset=opset,
        custom_op_handlers=_CUSTOM_HANDLERS)
  entry = model_proto.metadata_props.add()
  entry.key, entry.value = METADATA_DESCRIPTOR, descriptor_text
  model_proto.producer_name = 'deeplab2_kmax'
  tf.io.gfile.makedirs(directory)
  path = os.path.join(directory, ONNX_FILE)
  onnx.save(model_proto, path)
  # tf2onnx logs an op it cannot convert and leaves it in the graph under its TF name; the
  # checker refuses such a graph here rather than ONNX Runtime at the user's first load.
  try:
    onnx.checker.check_model(path)
  except onnx.checker.ValidationError as error:
    first = str(error).strip().splitlines()[0][:400]
    raise ValueError(f'{path}: the converted ONNX graph is invalid ({first}); an op of the '
                     'serving graph has no ONNX conversion.') from None
  return path
