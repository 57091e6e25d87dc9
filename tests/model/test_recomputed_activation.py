"""Convolutions that recompute their BN + activation input in the backward pass (issue #19).

The traced step (where marked tensors take the recomputing path) is compared with eager
execution of the same layers (where every convolution keeps its input, as TF differentiates
it): outputs and every gradient agree to float32 rounding, and the traced backward pass keeps no
activation output, only BN inputs.
"""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.model.heads import conv_head
from deeplab2_kmax.model.layers import blocks
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import recomputed_activation
from tests.model import retained_tensors

_SHAPE = (2, 17, 17, 16)


def _residual_stages(activation):
  """Two stages (a strided one with a projection shortcut, then identity blocks) and a head
  reading the activated output, as ResNet's and the pixel decoder's stages are used."""
  first = blocks.BlockGroup(8, 3, strides=2, activation=activation, name='stage1')
  second = blocks.BlockGroup(16, 2, activation=activation, name='stage2')
  head = convolutions.Conv2DSame(4, 1, 'head', use_bias=True)

  def forward(x, training=True):
    y = second(first(x, training=training), training=training)
    y = inference_fusion.activation(y, activation, training, lambda t: t)
    return head(y, training=training)

  return forward, [first, second, head]


def _separable_heads(activation):
  """Depthwise-separable stacks, a prediction head and 1x1 Conv1Ds on a BN + activation."""
  stack = convolutions.StackedConv2DSame(2, 16, 5, 'stack', activation=activation)
  head = conv_head.ConvHead(12, 6, activation=activation, name='head')
  projection = convolutions.Conv1D(8, 'projection', use_bias=False, use_bn=True,
                                   activation=activation)
  output = convolutions.Conv1D(4, 'output', use_bias=True)

  def forward(x, training=True):
    y = tf.reshape(head(stack(x, training=training), training=training), [x.shape[0], -1, 6])
    # The head's output also reaches the result directly: through the BN alone its bias
    # would have no gradient but rounding noise.
    return tf.concat([output(projection(y, training=training), training=training),
                      y[..., :4]], axis=1)

  return forward, [stack, head, projection, output]


def _outputs_and_gradients(forward, variables, x):
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = forward(x)
    # A non-uniform upstream gradient, so that no gradient is zero by symmetry.
    value = tf.reduce_sum(y * y)
  return [y, *tape.gradient(value, [x, *variables])]


@pytest.mark.parametrize('activation', ['relu', 'gelu'])
@pytest.mark.parametrize('network', [_residual_stages, _separable_heads])
def test_recomputing_convolutions_equal_plain_differentiation(network, activation):
  tf.random.set_seed(3)
  forward, layers = network(activation)
  x = tf.random.normal(_SHAPE, seed=5)
  forward(x, training=False)  # Builds the layers.
  variables = [v for layer in layers for v in layer.trainable_variables]
  rng = np.random.RandomState(7)
  for variable in variables:   # Residual branches start with gamma = 0: no gradient inside.
    if variable.path.endswith(('gamma', 'beta')):
      low = 0.5 if variable.path.endswith('gamma') else -0.5
      variable.assign(rng.uniform(low, low + 1.0, size=variable.shape).astype(np.float32))
  plain = _outputs_and_gradients(forward, variables, x)   # Eager: no recipes are read.
  recomputing = tf.function(lambda t: _outputs_and_gradients(forward, variables, t))(x)
  assert len(plain) == 2 + len(variables)
  for expected, got in zip(plain, recomputing):
    scale = np.abs(expected.numpy()).max()
    assert scale > 0
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize('activation', ['relu', 'gelu'])
def test_residual_stages_keep_only_batch_norm_inputs(activation):
  forward, _ = _residual_stages(activation)
  forward(tf.zeros(_SHAPE), training=False)
  kept = retained_tensors.retained_for_backward(forward, tf.TensorSpec(_SHAPE, tf.float32))
  full_size = [(kind, shape) for kind, shape in kept
               if shape is not None and len(shape) == 4 and shape[0] == _SHAPE[0]
               and shape[-1] > 4]
  # Per bottleneck its three BN inputs, plus each first block's projection shortcut (16 -> 32
  # and 32 -> 64 channels): 3 * 5 + 2. Plus the first block's input activation, whose input
  # (the placeholder) has no recipe: ReLU keeps its output, GELU its input.
  assert len(full_size) == 3 * 5 + 2 + 1
  kinds = [kind for kind, _ in full_size]
  assert kinds.count('Relu' if activation == 'relu' else 'Placeholder') == 1
  assert 'Pad' not in kinds   # The strided 3x3 convolution's padded input is not kept either.


def test_marks_are_read_only_in_their_own_graph():
  layer = normalization.BatchNorm(axis=-1)
  layer.build((1, 3, 3, 2))
  eager = layer(tf.ones((1, 3, 3, 2)), training=True, then_activation='relu')
  assert recomputed_activation.recipe_of(eager) is None
  seen = []

  @tf.function
  def outer(x):
    marked = layer(x, training=True, then_activation='relu')
    seen.append(recomputed_activation.recipe_of(marked) is not None)
    seen.append(recomputed_activation.recipe_of(marked + 1.0) is not None)

    @tf.function
    def inner():
      seen.append(recomputed_activation.recipe_of(marked) is not None)
      return marked + 0.0

    return inner()

  outer(tf.ones((1, 3, 3, 2)))
  assert seen == [True, False, False]
