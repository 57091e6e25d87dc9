"""Inference fusion (XLA element-wise chains, BN folded into kernels) against plain formulas."""

import numpy as np
import pytest
import scipy.special
import tensorflow as tf

from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import xla_elementwise


@pytest.fixture(params=['tf_ops', 'xla'])
def path(request, monkeypatch):
  """Runs a test once with every fused chain as TF ops and once as an XLA function."""
  threshold = 0 if request.param == 'xla' else 1 << 62
  monkeypatch.setattr(xla_elementwise, 'MIN_ELEMENTS', threshold)
  return request.param


def _gelu(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def _randomise_norms(layer, rng):
  for sublayer in layer._flatten_layers(include_self=True):  # pylint: disable=protected-access
    if isinstance(sublayer, normalization.BatchNorm):
      for variable, low, high in ((sublayer.gamma, 0.5, 1.5), (sublayer.beta, -0.3, 0.3),
                                  (sublayer.moving_mean, -0.3, 0.3),
                                  (sublayer.moving_variance, 0.5, 1.5)):
        variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))


def test_fused_chains_equal_their_formulas(path):
  del path
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
  residual = rng.normal(size=x.shape).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, 8).astype(np.float32)
  offset = rng.normal(size=8).astype(np.float32)
  affine = x * scale + offset
  np.testing.assert_allclose(inference_fusion.affine_gelu(x, scale, offset), _gelu(affine),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(inference_fusion.gelu(x), _gelu(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(inference_fusion.affine_add(x, scale, offset, residual),
                             affine + residual, rtol=1e-6, atol=1e-6)
  norm = np.sqrt((affine ** 2).sum(-1, keepdims=True))
  np.testing.assert_allclose(inference_fusion.affine_l2_normalize(x, scale, offset),
                             affine / norm, rtol=1e-5, atol=1e-6)
  # A one-channel BN's affine broadcasts over every logit.
  logits = tf.cast(x, tf.bfloat16)
  fused = inference_fusion.affine_to_float32(logits, np.float32([1.7]), np.float32([-0.2]))
  assert fused.dtype == tf.float32
  np.testing.assert_allclose(fused, tf.cast(logits, tf.float32).numpy() * 1.7 - 0.2, rtol=1e-6)
  # bfloat16 in, bfloat16 out, computed in float32 (one rounding at the end).
  y = inference_fusion.affine_gelu(tf.cast(x, tf.bfloat16), scale, offset)
  assert y.dtype == tf.bfloat16
  np.testing.assert_allclose(tf.cast(y, tf.float32), _gelu(
      tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy() * scale + offset), rtol=8e-3,
                             atol=1e-3)


@pytest.mark.parametrize('activation, kernel_size, rate, strides, with_residual', [
    ('gelu', 3, 1, 1, False),
    ('relu', 1, 1, 1, False),
    (None, 1, 1, 1, True),
    ('gelu', 3, 3, 1, False),
    (None, 3, 1, 2, False),
])
def test_conv2d_same_inference_equals_conv_then_batch_norm(path, activation, kernel_size, rate,
                                                           strides, with_residual):
  del path
  rng = np.random.RandomState(2)
  layer = convolutions.Conv2DSame(8, kernel_size, 'conv', strides=strides, atrous_rate=rate,
                                  use_bias=False, use_bn=True, activation=activation)
  x = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
  layer(x, training=True)
  _randomise_norms(layer, rng)
  padding = 'SAME'
  inputs = x
  if strides > 1:
    inputs = np.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    padding = 'VALID'
  # tf.nn.convolution is Keras' (space-to-batch for dilations): an independent path.
  conv = tf.nn.convolution(inputs, layer._conv.kernel.numpy(), strides, padding,  # pylint: disable=protected-access
                           dilations=rate).numpy()
  scale, offset = (t.numpy() for t in layer._batch_norm.inference_scale_offset())  # pylint: disable=protected-access
  expected = conv * scale + offset
  residual = None
  if with_residual:
    residual = rng.normal(size=expected.shape).astype(np.float32)
    expected = expected + residual
  expected = {'gelu': _gelu, 'relu': lambda v: np.maximum(v, 0), None: lambda v: v}[activation](
      expected)
  call = tf.function(lambda x, r: layer(x, training=False, residual=r))
  np.testing.assert_allclose(call(x, residual), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_relu_conv_folds_its_batch_norm_into_the_kernel():
  rng = np.random.RandomState(3)
  layer = convolutions.Conv2DSame(8, 1, 'conv', use_bias=False, use_bn=True, activation='relu',
                                  dtype='mixed_bfloat16')
  x = rng.normal(size=(1, 9, 9, 4)).astype(np.float32)
  layer(tf.cast(x, tf.bfloat16), training=True)
  _randomise_norms(layer, rng)
  # 1 x 1 x 4 x 8 weights against 9 x 9 x 8 outputs: scaling the kernel is cheaper.
  assert layer._fold_into_kernel(tf.cast(x, tf.bfloat16))  # pylint: disable=protected-access
  assert not layer._fold_into_kernel(tf.constant(x))  # pylint: disable=protected-access
  scale, offset = (t.numpy() for t in layer._batch_norm.inference_scale_offset())  # pylint: disable=protected-access
  expected = np.maximum(np.einsum('bhwc,cd->bhwd', x, layer._conv.kernel.numpy()[0, 0])  # pylint: disable=protected-access
                        * scale + offset, 0)
  folded = layer(tf.cast(x, tf.bfloat16), training=False)
  assert folded.dtype == tf.bfloat16
  np.testing.assert_allclose(tf.cast(folded, tf.float32), expected, rtol=3e-2, atol=3e-2)


def _xla_compiled_functions(concrete):
  """Names of the functions called from concrete's graph (nested too) that XLA must compile."""
  names = []
  library = concrete.graph.as_graph_def().library
  for function in library.function:
    attr = function.attr.get('_XlaMustCompile')
    if attr is not None and attr.b:
      names.append(function.signature.name)
  return names


def test_model_inference_fused_equals_unfused_and_disabled_traces_no_xla(tiny_options,
                                                                         monkeypatch):
  import keras  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(4)
  model = builder.build_model(tiny_options, crop_size=(65, 65))
  rng = np.random.RandomState(4)
  image = rng.uniform(0, 255, (1, 65, 65, 3)).astype(np.float32)
  model(image, training=True)
  _randomise_norms(model, rng)
  # The tiny model's maps are all below the XLA threshold: lift it, so every chain is XLA.
  monkeypatch.setattr(xla_elementwise, 'MIN_ELEMENTS', 0)
  spec = tf.TensorSpec([1, 65, 65, 3], tf.float32)
  fused = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
  with xla_elementwise.disabled():
    plain = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
  assert not _xla_compiled_functions(plain)
  assert _xla_compiled_functions(fused)
  fused_outputs, plain_outputs = fused(image), plain(image)
  assert fused_outputs.keys() == plain_outputs.keys()
  for key, value in plain_outputs.items():
    # Relative to the output's scale: a logit near 0 next to logits of ~200 carries the same
    # absolute float32 rounding as they do (oneDNN's kernels differ between CPUs, e.g. AMX).
    value = np.asarray(value)
    difference = np.max(np.abs(np.asarray(fused_outputs[key]) - value))
    assert difference <= 1e-5 * np.max(np.abs(value)) + 1e-6, (key, difference)
