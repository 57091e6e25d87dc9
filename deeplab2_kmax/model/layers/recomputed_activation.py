"""Convolutions of a BN + activation output that recompute it in the backward pass.

In training every convolution keeps its input for its kernel's gradient, and every batch norm
keeps its own input. Where a convolution reads a BN + activation output (conv -> BN -> ReLU or
GELU -> conv: ResNet's bottlenecks, the decoders' and heads' blocks), both are kept, though the
first is a per-channel function of the second: ~0.9 GB of the kMaX-R50 step at 641x641, batch 2
(docs/benchmarks.md, issue #19). So the BN + activation training step
(`normalization.BatchNorm(..., then_activation=...)`) marks its output with a `Recipe`: the BN's
input and the per-channel scale and offset of its batch statistics. A convolution that reads a
marked tensor keeps the recipe instead of the tensor, and recomputes the activation, in one
element-wise pass, once the upstream gradient has arrived (the idea of InPlace-ABN and of
memory-efficient DenseNets, here without any change of values: the forward pass computes the
activation with the same function, so the recomputed tensor equals the forward one).

A residual block's input activation reads the previous block's BN output plus its shortcut;
`activate` marks it with a recipe that chains through the blocks' recipes, and recomputes its
own gradient's input from it, so no block input waits for the backward pass either.

The mark is a Python attribute on the symbolic tensor (as Keras marks masks). It is read only in
the graph that made it: any op between the BN and the convolution, a function boundary or eager
execution leaves the convolution on its plain path, which keeps its input as before.
"""

import dataclasses

import tensorflow as tf

from deeplab2_kmax.model.layers import activations

_ATTRIBUTE = '_deeplab2_kmax_recomputable_from'


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
  """How a marked tensor is recomputed from tensors the backward pass keeps anyway:
  activation(inputs * scale + offset + residual), or activation(inputs) without scale.

  Attributes:
    inputs: The BN's input [..., channels] (its own gradient keeps it), or for an exact GELU
      on its own its input (likewise).
    scale, offset: float32 [channels], the batch statistics and the BN's gamma and beta folded
      into an affine map (no gradient flows through them from the recomputation); None for an
      activation on its own.
    activation: 'relu', 'gelu' or None (a BN output, or a BN output plus a residual, before the
      activation that a residual block's successor applies).
    dtype: The marked tensor's dtype.
    residual: The Recipe of a tensor added before the activation (a residual block's shortcut:
      the block input's own recipe, or the projection's BN output), or None. A chain of
      identity blocks recomputes through the chain: at most a stage's blocks, one element-wise
      pass each.
  """
  inputs: tf.Tensor
  scale: tf.Tensor | None
  offset: tf.Tensor | None
  activation: str | None
  dtype: tf.DType
  residual: 'Recipe | None' = None

  def recompute(self):
    """The marked tensor, recomputed: [..., channels]."""
    if self.scale is None:
      return tf.cast(activations.without_gradient(self.activation, self.inputs), self.dtype)
    residual = None if self.residual is None else self.residual.recompute()
    return tf.cast(activations.affine_then_activation(
        self.activation, self.inputs, self.scale, self.offset, residual), self.dtype)


def mark(tensor, recipe):
  """Marks `tensor` (the value of `recipe.recompute()`) as recomputable; returns it."""
  setattr(tensor, _ATTRIBUTE, recipe)
  return tensor


def activate(x, name):
  """Activation `name` ('relu' or 'gelu') of x in training, marked as recomputable.

  If x is marked (a BN output plus a residual: a block's non-activated input), the gradient
  recomputes x from its recipe once the upstream gradient exists, so neither x nor the output
  waits for the backward pass. Otherwise a GELU keeps its input x for its gradient, as
  activations.get_activation('gelu') does, and its output is marked as recomputable from x; a
  ReLU is left to TF (its gradient keeps the output, which a convolution reads anyway).
  """
  recipe = recipe_of(x)
  if recipe is None or recipe.activation is not None:
    y = activations.get_activation(name)(x)
    if name == 'gelu':
      mark(y, Recipe(x, None, None, 'gelu', y.dtype))
    return y

  @tf.custom_gradient
  def run(x):
    def gradient(upstream):
      with tf.control_dependencies([upstream]):
        recomputed = recipe.recompute()
      return tf.cast(activations.backward(name, recomputed, upstream), x.dtype)

    return activations.without_gradient(name, x), gradient

  y = run(x)
  return mark(y, dataclasses.replace(recipe, activation=name, dtype=y.dtype))


def recipe_of(tensor):
  """The Recipe `tensor` was marked with in the current graph, or None."""
  recipe = getattr(tensor, _ATTRIBUTE, None)
  if recipe is None or tf.executing_eagerly():
    return None
  if recipe.inputs.graph is not tf.compat.v1.get_default_graph():
    return None
  return recipe


def convolve(recipe, inputs, kernel, convolution):
  """convolution(inputs, kernel), keeping `recipe` instead of `inputs` for the backward pass.

  Args:
    recipe: The Recipe `inputs` was marked with.
    inputs: The marked tensor, [batch, ..., in_channels].
    kernel: The convolution's kernel (a tensor, not a variable).
    convolution: A differentiable function (x, kernel) -> y whose gradient needs only x's
      value and shape and the kernel, not y (any convolution).

  Returns:
    convolution(inputs, kernel). Its gradients with respect to inputs and kernel are those of
    `convolution`; the kernel's is computed from `recipe.recompute()`, which runs only after the
    upstream gradient exists (a control dependency), so the activation does not live through
    the forward pass.
  """
  @tf.custom_gradient
  def run(x, kernel):
    def gradient(upstream):
      with tf.control_dependencies([upstream]):
        recomputed = recipe.recompute()
      with tf.GradientTape() as tape:
        tape.watch([recomputed, kernel])
        # The forward convolution traced here has no consumer, so the runtime prunes it.
        outputs = convolution(recomputed, kernel)
      return tape.gradient(outputs, [recomputed, kernel], output_gradients=upstream)

    return convolution(x, kernel), gradient

  return run(inputs, kernel)


def keras_convolution(layer, inputs, training):
  """layer(inputs) for a Keras Conv1D or Conv2D without activation, through `convolve` when
  `inputs` is marked (in training)."""
  recipe = recipe_of(inputs) if training and layer.built else None
  if recipe is None:
    return layer(inputs)
  outputs = convolve(recipe, inputs, tf.cast(layer.kernel, inputs.dtype), layer.convolution_op)
  if layer.use_bias:
    outputs = tf.nn.bias_add(outputs, tf.cast(layer.bias, outputs.dtype))
  return outputs
