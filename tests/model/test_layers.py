"""Unit tests of the building blocks at tiny shapes, against hand-computed values."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import axial_attention
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.model.layers import layer_norm
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resize
from deeplab2_kmax.model.layers import xla_elementwise
from tests.model import retained_tensors


def test_gelu_is_exact_erf_form():
  x = np.linspace(-3, 3, 13).astype(np.float32)
  expected = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]
  np.testing.assert_allclose(activations.get_activation('gelu')(x), expected, atol=1e-6)
  # The tanh approximation differs visibly at x = -3 (the case Keras 3 defaults to).
  approx = activations.get_activation('approximated_gelu')(x)
  assert abs(float(approx[0]) - expected[0]) > 1e-4


def assert_same_outputs_and_gradients(ours, reference, inputs, variables, upstream, rtol,
                                      atol):
  """ours(*inputs) and reference(*inputs) agree, and so do the gradients of
  sum(output * upstream) with respect to the inputs and `variables`."""
  results = []
  for function in (ours, reference):
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      y = function(*inputs)
      value = tf.reduce_sum(y * upstream)
    results.append([y, *tape.gradient(value, [*inputs, *variables])])
  for value, expected in zip(*results):
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol)


def test_multi_axis_batch_norm_statistics_and_shapes():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(3, 2, 4, 5, 5)).astype(np.float32) * 3 + 1
  bn = normalization.BatchNorm(axis=[0, 2], momentum=0.9, epsilon=1e-3)
  y = bn(x, training=True).numpy()
  assert tuple(bn.gamma.shape) == (3, 1, 4, 1, 1)
  assert tuple(bn.moving_mean.shape) == (3, 1, 4, 1, 1)
  mean = x.mean(axis=(1, 3, 4), keepdims=True)
  var = x.var(axis=(1, 3, 4), keepdims=True)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), atol=1e-4)
  np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, atol=1e-5)
  np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var, atol=1e-4)
  # Inference uses the moving statistics.
  y_eval = bn(x, training=False).numpy()
  expected = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-3)
  np.testing.assert_allclose(y_eval, expected, atol=1e-4)


@pytest.mark.parametrize('xla', [False, True])
@pytest.mark.parametrize('axis,shape', [([0, 2], (3, 2, 4, 5, 5)), ([0, 2, 4], (2, 3, 4, 5, 6)),
                                        (1, (2, 3, 4, 5))])
def test_multi_axis_batch_norm_gradient_equals_op_by_op_and_keeps_only_input(
    axis, shape, xla, monkeypatch):
  # The training BN over several axes (issue #19: one XLA kernel each way on large tensors, a
  # hand-written gradient) against TF's differentiation of the formula: output and gradients
  # of x, gamma and beta; the backward pass keeps no full-size tensor but the input.
  monkeypatch.setattr(xla_elementwise, 'MIN_ELEMENTS', 0 if xla else 1 << 62)
  rng = np.random.RandomState(len(shape))
  x = tf.constant(rng.normal(size=shape) * 3 + 1, tf.float32)
  upstream = tf.constant(rng.normal(size=shape), tf.float32)
  bn = normalization.BatchNorm(axis=axis, epsilon=1e-3)
  bn.build(shape)
  bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32))
  bn.beta.assign(rng.normal(size=bn.beta.shape).astype(np.float32))
  axes = axis if isinstance(axis, list) else [axis]
  reduce_axes = [d for d in range(len(shape)) if d not in axes]

  broadcast = [s if d in axes else 1 for d, s in enumerate(shape)]

  def reference(t):
    mean, variance = tf.nn.moments(t, axes=reduce_axes, keepdims=True)
    return ((t - mean) * tf.math.rsqrt(variance + 1e-3) * tf.reshape(bn.gamma, broadcast)
            + tf.reshape(bn.beta, broadcast))

  assert_same_outputs_and_gradients(lambda t: bn(t, training=True), reference, [x],
                                    [bn.gamma, bn.beta], upstream, rtol=1e-4, atol=1e-4)
  kept = retained_tensors.retained_for_backward(lambda t: bn(t, training=True),
                                                tf.TensorSpec(shape, tf.float32))
  assert [kind for kind, kept_shape in kept if kept_shape == shape] == ['Placeholder'], kept


def test_single_axis_batch_norm_has_vector_variables():
  bn = normalization.BatchNorm(axis=-1)
  bn(np.zeros((2, 3, 7), np.float32))
  assert [tuple(w.shape) for w in bn.weights] == [(7,)] * 4
  assert [w.trainable for w in bn.weights] == [True, True, False, False]


_SYNC_SCRIPT = """
import numpy as np
import tensorflow as tf
cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from deeplab2_kmax.model.layers import normalization
strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
with strategy.scope():
  bn = normalization.BatchNorm(axis=-1, momentum=0.0, synchronized={sync})
  bn.build((None, 1))
data = tf.constant([[0.0], [2.0], [4.0], [6.0]])
dataset = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices(data).batch(4))
outputs = strategy.run(lambda x: bn(x, training=True), args=(next(iter(dataset)),))
values = np.concatenate([v.numpy() for v in strategy.experimental_local_results(outputs)])
print('RESULT', float(bn.moving_mean.numpy()[0]), ' '.join(f'{{v:.4f}}' for v in values[:, 0]))
"""


def test_batch_norm_synchronizes_across_replicas():
  # Two logical CPUs need a fresh TF runtime, hence a subprocess. Each replica holds two of
  # the four values; synchronised statistics are those of all four (mean 3, variance 5).
  result = subprocess.run([sys.executable, '-c', _SYNC_SCRIPT.format(sync=True)],
                          capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0].split()
  assert float(line[1]) == pytest.approx(3.0)
  expected = (np.array([0.0, 2.0, 4.0, 6.0]) - 3.0) / np.sqrt(5.0 + 1e-3)
  np.testing.assert_allclose([float(v) for v in line[2:]], expected, atol=1e-3)


def test_conv2d_same_pads_symmetrically_for_strided_convs():
  conv = convolutions.Conv2DSame(1, 3, 'conv', strides=2, use_bias=False,
                                 kernel_initializer='ones')
  y = conv(np.ones((1, 4, 4, 1), np.float32))[0, :, :, 0].numpy()
  # Windows centred on input rows/cols 0 and 2 (pad 1 in front and behind); Keras 'same'
  # would centre them on 1 and 3 and give [[9, 6], [6, 4]].
  np.testing.assert_allclose(y, [[4, 6], [6, 9]])
  assert convolutions.Conv2DSame(2, 7, 'stem', strides=2)(
      np.zeros((1, 65, 65, 3), np.float32)).shape == (1, 33, 33, 2)


def test_conv1d_kernel_layout_matches_deeplab2():
  layer = convolutions.Conv1D(5, 'proj', use_bias=False, use_bn=True)
  layer(np.zeros((2, 4, 3), np.float32))
  assert tuple(layer._conv.kernel.shape) == (1, 3, 5)


def test_resize_align_corners_interpolates_between_corners():
  x = np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1) * np.ones((1, 3, 3, 1), np.float32)
  y = resize.resize_align_corners(tf.constant(x), (5, 5))[0, :, 0, 0].numpy()
  np.testing.assert_allclose(y, [0, 0.5, 1, 1.5, 2])


def test_relative_distance_matrix():
  d = axial_attention.relative_distance_matrix(3, 3)
  np.testing.assert_array_equal(d, [[254, 255, 256], [253, 254, 255], [252, 253, 254]])
  big = axial_attention.relative_distance_matrix(300, 300)
  assert big.min() == 0 and big.max() == 2 * axial_attention.MAX_SPAN - 2


def test_axial_attention_shapes_and_limit():
  layer = axial_attention.AxialAttention2D(16, num_heads=8)
  y = layer(np.random.RandomState(0).normal(size=(2, 5, 7, 12)).astype(np.float32))
  assert y.shape == (2, 5, 7, 32)
  shapes = {w.path.split('/', 1)[1]: tuple(w.shape) for w in layer.weights}
  assert shapes['height_axis/qkv_kernel'] == (12, 64)
  assert shapes['height_axis/query_rpe/embeddings'] == (509, 2)
  assert shapes['height_axis/value_rpe/embeddings'] == (509, 4)
  assert shapes['height_axis/batch_norm_similarity/gamma'] == (3, 1, 8, 1, 1)
  assert shapes['height_axis/batch_norm_retrieved_output/gamma'] == (2, 1, 8, 1, 4)
  with pytest.raises(NotImplementedError):
    axial_attention.AxialAttention(8, 16, query_shape=129)(np.zeros((1, 130, 4), np.float32))


def test_axial_attention_is_position_aware():
  # Relative positional encodings break permutation equivariance: shifting a constant-free
  # input along the axis must not simply shift the output unless the RPE cancels.
  layer = axial_attention.AxialAttention(8, 16, num_heads=2)
  x = np.random.RandomState(1).normal(size=(1, 6, 4)).astype(np.float32)
  y = layer(x).numpy()
  y_perm = layer(x[:, ::-1]).numpy()[:, ::-1]
  assert not np.allclose(y, y_perm, atol=1e-4)


def test_drop_path_mask_values():
  x = tf.ones((1000, 2, 3))
  mask = drop_path.generate_drop_path_mask(x, 0.8).numpy()
  assert mask.shape == (1000, 1, 1)
  assert set(np.unique(mask).round(5)) <= {0.0, 1.25}
  assert 0.7 < (mask > 0).mean() < 0.9
  assert drop_path.linear_keep_prob(0.8, 3) == pytest.approx(0.85)
  layer = drop_path.DropPath(0.5)
  np.testing.assert_array_equal(layer(x, training=False), x)


def test_fused_inference_path_equals_reference_formula():
  rng = np.random.RandomState(2)
  bn = normalization.BatchNorm(axis=-1, epsilon=1e-3)
  x = rng.normal(size=(2, 5, 5, 6)).astype(np.float32)
  bn(x, training=True)  # moves the statistics away from (0, 1)
  bn.gamma.assign(rng.uniform(0.5, 2, 6).astype(np.float32))
  bn.beta.assign(rng.normal(size=6).astype(np.float32))
  expected = ((x - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-3)
              * bn.gamma.numpy() + bn.beta.numpy())
  np.testing.assert_allclose(bn(x, training=False), expected, atol=1e-5)
  # A rank-3 input takes the generic path; same statistics, same result.
  np.testing.assert_allclose(bn(x.reshape(2, 25, 6), training=False),
                             expected.reshape(2, 25, 6), atol=1e-5)


def test_fused_training_path_matches_batch_moments_and_their_gradients():
  # Channels-last statistics train through TF's fused kernel; outputs, moving averages (with
  # the biased variance) and gradients must equal the batch-moments formula.
  rng = np.random.RandomState(3)
  x = rng.normal(size=(2, 5, 7, 6)).astype(np.float32) * 2 + 0.5
  gamma = tf.constant(rng.uniform(0.5, 2, 6).astype(np.float32))
  beta = tf.constant(rng.normal(size=6).astype(np.float32))
  weights = tf.constant(rng.normal(size=x.shape).astype(np.float32))
  for shape in (x.shape, (2, 35, 6)):
    bn = normalization.BatchNorm(axis=-1, momentum=0.9, epsilon=1e-3)
    bn.build(shape)
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    inputs = tf.constant(x.reshape(shape))
    with tf.GradientTape(persistent=True) as tape:
      tape.watch([inputs, gamma, beta])
      y = bn(inputs, training=True)
      objective = tf.reduce_sum(tf.reshape(y, x.shape) * weights)
      flat = tf.reshape(inputs, [-1, 6])
      mean, var = tf.nn.moments(flat, axes=[0])
      reference = tf.reshape((flat - mean) / tf.sqrt(var + 1e-3) * gamma + beta, x.shape)
      reference_objective = tf.reduce_sum(reference * weights)
    np.testing.assert_allclose(tf.reshape(y, x.shape), reference, atol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * x.reshape(-1, 6).mean(0),
                               atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * x.reshape(-1, 6).var(0),
                               rtol=1e-5)
    for got, want in zip(tape.gradient(objective, [inputs, bn.gamma, bn.beta]),
                         tape.gradient(reference_objective, [inputs, gamma, beta])):
      np.testing.assert_allclose(tf.reshape(got, [-1]), tf.reshape(want, [-1]), atol=1e-4)


def test_axial_attention_folded_inference_equals_batch_norm_formula():
  rng = np.random.RandomState(3)
  layer = axial_attention.AxialAttention(8, 16, num_heads=2)
  x = rng.normal(size=(3, 7, 6)).astype(np.float32)
  layer(x, training=True)
  for bn in (layer._batch_norm_similarity, layer._batch_norm_retrieved_output,
             layer._batch_norm_qkv):
    for variable, low, high in ((bn.gamma, 0.5, 1.5), (bn.beta, -0.3, 0.3),
                                (bn.moving_mean, -0.3, 0.3), (bn.moving_variance, 0.5, 1.5)):
      variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))
  folded = layer(x, training=False).numpy()
  # The unfolded formula: stacked terms through the BN layers in inference mode.
  qkv = layer._batch_norm_qkv(np.einsum('nlc,cd->nld', x, layer.qkv_kernel.numpy()))
  q, k, v = np.split(np.asarray(qkv), [8, 16], axis=-1)
  q = q.reshape(3, 7, 2, 4).transpose(0, 2, 1, 3)
  k = k.reshape(3, 7, 2, 4).transpose(0, 2, 1, 3)
  v = v.reshape(3, 7, 2, 8)
  index = axial_attention.relative_distance_matrix(7, 7)
  rq = layer._query_rpe.embeddings.numpy()[index]
  rk = layer._key_rpe.embeddings.numpy()[index]
  rv = layer._value_rpe.embeddings.numpy()[index]
  sim = np.stack([np.einsum('bhld,bhmd->bhlm', q, k), np.einsum('bhld,lmd->bhlm', q, rq),
                  np.einsum('bhmd,lmd->bhlm', k, rk)])
  sim = np.asarray(layer._batch_norm_similarity(sim, training=False)).sum(0)
  weights = np.exp(sim - sim.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.stack([np.einsum('bhlm,bmhd->bhld', weights, v),
                  np.einsum('bhlm,lmd->bhld', weights, rv)])
  out = np.asarray(layer._batch_norm_retrieved_output(out, training=False)).sum(0)
  expected = out.transpose(0, 2, 1, 3).reshape(3, 7, 16)
  np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-4)


def test_gelu_under_bfloat16_matches_float32():
  x = tf.constant(np.linspace(-4, 4, 33), tf.float32)
  y = activations.get_activation('gelu')(tf.cast(x, tf.bfloat16))
  assert y.dtype == tf.bfloat16
  np.testing.assert_allclose(tf.cast(y, tf.float32), tf.nn.gelu(x, approximate=False),
                             rtol=1e-2, atol=1e-2)


def test_gelu_gradient_equals_op_by_op_gradient():
  # The hand-written gradient (Phi(x) + x phi(x)) against TF's differentiation of the erfc
  # formula, over the range where either term dominates, in float32 and bfloat16.
  x = tf.constant(np.concatenate([np.linspace(-9, 9, 181), [0.0, -30.0, 30.0]]), tf.float32)
  upstream = tf.constant(np.random.RandomState(3).normal(size=x.shape), tf.float32)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    ours = activations.get_activation('gelu')(x) * upstream
    reference = tf.nn.gelu(x, approximate=False) * upstream
  np.testing.assert_allclose(tape.gradient(ours, x), tape.gradient(reference, x),
                             rtol=1e-6, atol=1e-7)
  expected = [0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2)
              / math.sqrt(2 * math.pi) for v in np.linspace(-3, 3, 7)]
  with tf.GradientTape() as tape:
    points = tf.constant(np.linspace(-3, 3, 7), tf.float32)
    tape.watch(points)
    total = tf.reduce_sum(activations.get_activation('gelu')(points))
  np.testing.assert_allclose(tape.gradient(total, points), expected, rtol=1e-6)
  x16 = tf.cast(x, tf.bfloat16)
  with tf.GradientTape() as tape:
    tape.watch(x16)
    y16 = activations.get_activation('gelu')(x16)
  gradient16 = tape.gradient(y16, x16)
  assert gradient16.dtype == tf.bfloat16
  np.testing.assert_allclose(tf.cast(gradient16, tf.float32),
                             tape_free_gelu_derivative(tf.cast(x16, tf.float32)),
                             rtol=1e-2, atol=1e-2)


def tape_free_gelu_derivative(x):
  return np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2)
                   / math.sqrt(2 * math.pi) for v in np.asarray(x, np.float64)])


def test_gelu_backward_keeps_only_its_input():
  # The memory property issue #19 needs: of a GELU's forward tensors, only x (here the
  # placeholder) waits for the backward pass; TF's op-by-op gradient keeps erfc and two products.
  spec = tf.TensorSpec([4, 8, 8, 16], tf.float32)
  ours = retained_tensors.retained_for_backward(activations.get_activation('gelu'), spec)
  reference = retained_tensors.retained_for_backward(lambda t: tf.nn.gelu(t, approximate=False), spec)
  full = (4, 8, 8, 16)
  assert [kind for kind, shape in ours if shape == full] == ['Placeholder']
  assert len([kind for kind, shape in reference if shape == full]) >= 3


def test_batched_segment_sum_equals_one_hot_product_and_drops_outside_ids():
  from deeplab2_kmax.model.layers import segment_sum  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(5)
  values = rng.normal(size=(3, 40, 2, 5)).astype(np.float32)
  ids = rng.randint(-1, 7, size=(3, 40)).astype(np.int32)  # -1 and 6 fall outside K = 6.
  one_hot = (ids[..., None] == np.arange(6)).astype(np.float32)
  expected = np.einsum('bpk,bpij->bkij', one_hot, values)
  got = segment_sum.batched_segment_sum(tf.constant(values), tf.constant(ids), 6)
  assert got.shape == (3, 6, 2, 5)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('activation,reference_activation', [
    ('gelu', lambda t: tf.nn.gelu(t, approximate=False)), ('relu', tf.nn.relu)])
@pytest.mark.parametrize('shape', [(2, 5, 6, 8), (3, 7, 8)])
def test_batch_norm_then_activation_equals_op_by_op_in_training(shape, activation,
                                                               reference_activation):
  # The one-step BN + GELU or ReLU (issue #19's memory cut) against the two layers' own ops:
  # outputs, gradients of the input, gamma and beta, and the moving averages.
  rng = np.random.RandomState(11)
  x = tf.constant(rng.normal(1.0, 2.0, size=shape), tf.float32)
  upstream = tf.constant(rng.normal(size=shape), tf.float32)
  layers = []
  for _ in range(2):
    layer = normalization.BatchNorm(axis=-1, momentum=0.9)
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32))
    layer.beta.assign(rng.normal(size=shape[-1]).astype(np.float32))
    layers.append(layer)
  layers[1].gamma.assign(layers[0].gamma)
  layers[1].beta.assign(layers[0].beta)
  results = []
  for layer, fused in zip(layers, (True, False)):
    with tf.GradientTape() as tape:
      tape.watch(x)
      if fused:
        y = layer(x, training=True, then_activation=activation)
      else:
        y = reference_activation(layer(x, training=True))
      value = tf.reduce_sum(y * upstream)
    gradients = tape.gradient(value, [x, layer.gamma, layer.beta])
    results.append([y, *gradients, layer.moving_mean, layer.moving_variance])
  for ours, reference in zip(*results):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=2e-5, atol=2e-6)
  assert np.abs(np.asarray(results[0][2])).max() > 0


@pytest.mark.parametrize('activation', ['gelu', 'relu'])
def test_batch_norm_then_activation_backward_keeps_only_its_input(activation):
  layer = normalization.BatchNorm(axis=-1)
  layer.build((4, 8, 8, 16))
  full = (4, 8, 8, 16)
  ours = retained_tensors.retained_for_backward(
      lambda t: layer(t, training=True, then_activation=activation),
      tf.TensorSpec(full, tf.float32))
  reference = retained_tensors.retained_for_backward(
      lambda t: activations.get_activation(activation)(layer(t, training=True)),
      tf.TensorSpec(full, tf.float32))
  assert [kind for kind, shape in ours if shape == full] == ['Placeholder']
  assert len([kind for kind, shape in reference if shape == full]) == 2


@pytest.mark.parametrize('kernel_size,shape', [(5, (2, 9, 7, 6)), (3, (1, 4, 5, 3)),
                                               (5, (3, 3, 3, 2))])
def test_depthwise_fast_kernel_gradient_equals_tf(kernel_size, shape):
  # The kernel gradient computed as a depthwise convolution (issue #19's step-time change)
  # against TF's DepthwiseConv2dNativeBackpropFilter, incl. maps smaller than the kernel.
  rng = np.random.RandomState(kernel_size + shape[1])
  x = tf.constant(rng.normal(size=shape), tf.float32)
  kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, shape[-1], 1)), tf.float32)
  upstream = tf.constant(rng.normal(size=shape), tf.float32)
  assert_same_outputs_and_gradients(
      convolutions._depthwise_same_with_fast_gradient,  # pylint: disable=protected-access
      lambda a, k: tf.nn.depthwise_conv2d(a, k, [1, 1, 1, 1], 'SAME'), [x, kernel], [],
      upstream, rtol=1e-5, atol=1e-5)


def test_depthwise_layer_uses_fast_gradient_in_training_only():
  # Training graphs route the stride-1 depthwise convolution through the custom gradient (an
  # IdentityN op); inference graphs keep TF's plain op (exports are unchanged).
  layer = convolutions.DepthwiseConv2DSame(5, 'depthwise', activation='gelu')
  x = tf.constant(np.random.RandomState(2).normal(size=(2, 8, 8, 4)), tf.float32)
  layer(x, training=False)

  def custom_gradient_ops(training):
    graph = tf.function(lambda t: layer(t, training=training)).get_concrete_function(
        tf.TensorSpec(x.shape)).graph
    return [op.name for op in graph.get_operations()
            if op.type == 'IdentityN' and 'depthwise' in op.name]

  assert custom_gradient_ops(True)
  assert not custom_gradient_ops(False)
  with tf.GradientTape() as tape:
    y = layer(x, training=True)
  gradient = tape.gradient(y, layer._depthwise_conv.kernel)  # pylint: disable=protected-access
  assert gradient is not None and np.abs(np.asarray(gradient)).max() > 0


@pytest.mark.parametrize('kernel_size,rate,shape', [(3, 6, (2, 21, 21, 5)), (3, 18, (1, 21, 17, 4)),
                                                    (3, 25, (1, 21, 21, 3)), (5, 2, (2, 9, 11, 3))])
def test_dilated_conv_by_taps_equals_tf(kernel_size, rate, shape):
  # The training path of a dilated stride-1 convolution (issue #19) against TF's
  # tf.nn.convolution (its space-to-batch rewrite): values and both gradients, incl. a rate
  # larger than the map (only the centre tap reads the image).
  rng = np.random.RandomState(rate + shape[2])
  x = tf.constant(rng.normal(size=shape), tf.float32)
  kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, shape[-1], 6)), tf.float32)
  upstream = tf.constant(rng.normal(size=shape[:3] + (6,)), tf.float32)
  assert_same_outputs_and_gradients(
      lambda a, k: convolutions.dilated_conv_by_taps(a, k, rate),
      lambda a, k: tf.nn.convolution(a, k, padding='SAME', dilations=rate), [x, kernel], [],
      upstream, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size,by_taps', [(13, True), (41, False)])
def test_dilated_conv_layer_trains_through_taps_where_most_read_padding(size, by_taps):
  # Rate 6 on 13 x 13: 48% of the taps read the image -> taps. On 41 x 41: 81% -> Keras'
  # space-to-batch path (taps would keep 9 shifted copies of the input for little gain).
  layer = convolutions.Conv2DSame(4, 3, 'conv', atrous_rate=6, use_bias=True)
  x = tf.constant(np.random.RandomState(3).normal(size=(2, size, size, 3)), tf.float32)
  inference = layer(x, training=False)
  graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(
      tf.TensorSpec(x.shape)).graph
  types = {op.type for op in graph.get_operations()}
  assert ('SpaceToBatchND' not in types and 'AddN' in types) == by_taps
  assert ('SpaceToBatchND' in types) != by_taps
  np.testing.assert_allclose(layer(x, training=True), inference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('xla', [False, True])
def test_layer_norm_equals_keras_and_keeps_only_its_input(xla, monkeypatch):
  # layer_norm.layer_norm (issue #19) against the formula (inference) and Keras' own layer
  # (training: outputs, and gradients of x, gamma and beta); its backward pass keeps no
  # full-size tensor but the input (Keras' keeps two more).
  monkeypatch.setattr(xla_elementwise, 'MIN_ELEMENTS', 0 if xla else 1 << 62)
  rng = np.random.RandomState(1)
  layer = keras.layers.LayerNormalization(epsilon=1e-6)
  x = tf.constant((rng.normal(size=(2, 4, 5, 8)) * 3 + 1).astype(np.float32))
  layer.build(x.shape)
  layer.gamma.assign(rng.uniform(0.5, 1.5, 8).astype(np.float32))
  layer.beta.assign(rng.normal(size=8).astype(np.float32))
  mean = x.numpy().mean(-1, keepdims=True)
  expected = (x.numpy() - mean) / np.sqrt(x.numpy().var(-1, keepdims=True) + 1e-6) * (
      layer.gamma.numpy()) + layer.beta.numpy()
  np.testing.assert_allclose(layer_norm.layer_norm(layer, x, training=False), expected,
                             rtol=1e-4, atol=1e-5)
  upstream = tf.constant(rng.normal(size=x.shape), tf.float32)
  assert_same_outputs_and_gradients(
      lambda t: layer_norm.layer_norm(layer, t, training=True), lambda t: layer(t, training=True),
      [x], [layer.gamma, layer.beta], upstream, rtol=1e-5, atol=1e-5)
  spec = tf.TensorSpec(x.shape, tf.float32)
  ours = retained_tensors.retained_for_backward(
      lambda t: layer_norm.layer_norm(layer, t, training=True), spec)
  keras_kept = retained_tensors.retained_for_backward(lambda t: layer(t, training=True), spec)
  assert len([kind for kind, shape in ours if shape == tuple(x.shape)]) == 1, ours
  assert len([kind for kind, shape in keras_kept if shape == tuple(x.shape)]) >= 2, keras_kept
