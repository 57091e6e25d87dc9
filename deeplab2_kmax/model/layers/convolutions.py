"""Convolution wrappers with DeepLab2's padding, optional batch norm and activation.

Strided convolutions pad explicitly and symmetrically (pad (k_eff - 1) // 2 in front and the
rest behind), so that for crops of size k * 32 + 1 every stride-2 layer maps s to (s - 1) / 2
+ 1 with the input's corners aligned to the output's corners; Keras' 'same' padding would pad
asymmetrically and shift every feature map by half a pixel.

Sub-layer names ('conv', 'batch_norm', 'depthwise_conv', 'depthwise', 'pointwise') follow
DeepLab2, so variable paths correspond one to one with its checkpoint keys.
"""

import dataclasses

import keras
import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import inference_fusion
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import recomputed_activation


def _explicit_padding(kernel_size, atrous_rate):
  effective = kernel_size + (kernel_size - 1) * (atrous_rate - 1)
  total = effective - 1
  begin = total // 2
  return begin, total - begin


class _ConvolutionNormActivation(normalization.NormLayerSerializable, keras.layers.Layer):
  """What Conv2DSame and Conv1D share: a convolution ('conv'), an optional batch norm
  ('batch_norm') and an activation, their options and their config.

  A subclass creates `self._conv` in its __init__, then calls `self._create_batch_norm()`, in
  that order (the order Keras lists, and a checkpoint matches, the variables).
  """

  def __init__(self, output_channels, name, use_bias=True, use_bn=False, norm_layer=None,
               bn_gamma_initializer='ones', activation=None, kernel_initializer='he_normal',
               **kwargs):
    super().__init__(name=name, **kwargs)
    if use_bias and use_bn:
      raise ValueError(f'{type(self).__name__} with a batch norm takes no bias.')
    self.output_channels = int(output_channels)
    self.use_bias = bool(use_bias)
    self.use_bn = bool(use_bn)
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.bn_gamma_initializer = bn_gamma_initializer
    self.activation = activation
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self._activation_fn = activations.get_activation(activation)
    self._batch_norm = None

  def _create_batch_norm(self):
    if self.use_bn:
      self._batch_norm = self.norm_layer(axis=-1, name='batch_norm',
                                         gamma_initializer=self.bn_gamma_initializer,
                                         dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def get_config(self):
    config = super().get_config()
    config.update({
        'output_channels': self.output_channels, 'use_bias': self.use_bias,
        'use_bn': self.use_bn, 'bn_gamma_initializer': self.bn_gamma_initializer,
        'activation': self.activation,
        'kernel_initializer': keras.initializers.serialize(self.kernel_initializer),
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class Conv2DSame(_ConvolutionNormActivation):
  """Conv2D (+ BN) (+ activation) on [batch, height, width, channels].

  Args:
    output_channels: Number of output channels.
    kernel_size: Square kernel size.
    name: Layer name.
    strides: Stride; > 1 uses symmetric explicit padding.
    atrous_rate: Dilation rate.
    use_bias: Whether the convolution has a bias (not allowed together with use_bn).
    use_bn: Whether a batch norm follows the convolution.
    norm_layer: Factory of the batch-norm layer (see normalization.make_norm_layer).
    bn_gamma_initializer: Initialiser of the BN scale ('zeros' on residual branches).
    activation: Activation name applied last ('none' for none).
    kernel_initializer: Kernel initialiser (DeepLab2: he_normal).
  """

  def __init__(self, output_channels, kernel_size, name, strides=1, atrous_rate=1,
               use_bias=True, use_bn=False, norm_layer=None, bn_gamma_initializer='ones',
               activation=None, kernel_initializer='he_normal', **kwargs):
    super().__init__(output_channels, name, use_bias=use_bias, use_bn=use_bn,
                     norm_layer=norm_layer, bn_gamma_initializer=bn_gamma_initializer,
                     activation=activation, kernel_initializer=kernel_initializer, **kwargs)
    self.kernel_size = int(kernel_size)
    self.strides = int(strides)
    self.atrous_rate = int(atrous_rate)
    padding = 'same' if self.strides == 1 else 'valid'
    self._padding = None
    if self.strides > 1:
      self._padding = _explicit_padding(self.kernel_size, self.atrous_rate)
    self._conv = keras.layers.Conv2D(
        self.output_channels, self.kernel_size, strides=self.strides, padding=padding,
        dilation_rate=self.atrous_rate, use_bias=self.use_bias,
        kernel_initializer=self.kernel_initializer, name='conv', dtype=self.dtype_policy)
    self._create_batch_norm()

  def _convolve(self, x, training, kernel=None):
    """The convolution (+ bias); `kernel` (any float dtype) replaces the layer's kernel."""
    dilated = self.atrous_rate > 1 and self.strides == 1
    # Keras convolves a dilated kernel through tf.nn.convolution's space-to-batch rewrite,
    # which at the ASPP's rates (6, 12, 18 on a 21 x 21 map) computes mostly padding and is
    # 2-10x slower than TF's own dilated Conv2D. That kernel's gradient exists only with
    # oneDNN or on GPU, so training sums the kernel's in-image taps instead (faster, any
    # device) where most taps read padding, and keeps Keras' path elsewhere (a rate-2 kernel
    # on a large map: little waste, and the taps would keep 9 shifted copies of x).
    by_taps = (dilated and training and kernel is None and self._conv.built
               and _mostly_padding(x, self.kernel_size, self.atrous_rate))
    if kernel is None and not by_taps and not (dilated and not training and self._conv.built):
      return self._conv(x)
    kernel = tf.cast(self._conv.kernel if kernel is None else kernel, x.dtype)
    if by_taps:
      x = dilated_conv_by_taps(x, kernel, self.atrous_rate)
    else:
      x = tf.nn.conv2d(x, kernel, strides=self.strides,
                       padding='SAME' if self.strides == 1 else 'VALID',
                       dilations=self.atrous_rate)
    if self.use_bias:
      x = tf.nn.bias_add(x, tf.cast(self._conv.bias, x.dtype))
    return x

  def _fold_into_kernel(self, x):
    """Whether inference applies the BN to the kernel instead of the output.

    Scaling the kernel costs a float32 pass over k * k * in * out weights on every call;
    normalising the output costs a pass over the output. So fold where the kernel is less
    than half the output. The convolution then ends in a bias (and ReLU), which Grappler fuses
    into it; float32 needs no folding (Grappler fuses a float32 BN itself, not a bfloat16
    one), and a GELU is fused with the BN by inference_fusion instead. Only ReLU convolutions
    fold: Grappler's remapper (TF 2.20) fails on a whole graph, dropping every fusion in it,
    when a folded convolution without activation feeds a residual Add with several consumers.
    Under mixed precision Keras reads the kernel already rounded to bfloat16, so the folded
    kernel is rounded once more (relative 2^-9 per weight).
    """
    if x.dtype == tf.float32 or self.activation != 'relu':
      return False
    batch, height, width, channels = x.shape
    if None in (batch, height, width, channels):
      return False
    outputs = batch * (height // self.strides) * (width // self.strides) * self.output_channels
    return 2 * self.kernel_size ** 2 * channels * self.output_channels < outputs

  def _pad(self, x):
    if self._padding is not None and self._padding != (0, 0):
      begin, end = self._padding
      x = tf.pad(x, [[0, 0], [begin, end], [begin, end], [0, 0]])
    return x

  def _pad_and_convolve(self, x, kernel):
    """The undilated convolution without bias, `kernel` a tensor: what a recomputed input's
    backward pass differentiates."""
    return tf.nn.conv2d(self._pad(x), kernel, strides=self.strides,
                        padding='SAME' if self.strides == 1 else 'VALID')

  def call(self, inputs, training=None, residual=None):
    """Convolution, BN, `+ residual` (a tensor of the output's shape, if given), activation."""
    recipe = None
    if training and self.atrous_rate == 1 and self._conv.built:
      recipe = recomputed_activation.recipe_of(inputs)
    x = self._pad(inputs)
    batch_norm = self._batch_norm
    if (batch_norm is not None and not training and batch_norm.built and self._conv.built
        and residual is None and self._fold_into_kernel(x)):
      scale, offset = batch_norm.inference_scale_offset()
      y = self._convolve(x, training, kernel=self._conv.kernel * scale)
      return self._activation_fn(tf.nn.bias_add(y, tf.cast(offset, y.dtype)))
    if recipe is None:
      x = self._convolve(x, training)
    else:
      # The input is a BN + activation output: its kernel gradient recomputes it.
      x = recomputed_activation.convolve(recipe, inputs, tf.cast(self._conv.kernel, x.dtype),
                                         self._pad_and_convolve)
      if self.use_bias:
        x = tf.nn.bias_add(x, tf.cast(self._conv.bias, x.dtype))
    if batch_norm is None:
      x = x if residual is None else x + residual
    elif residual is None:
      return inference_fusion.normalize_and_activate(x, batch_norm, self.activation,
                                                     self._activation_fn, training)
    elif (batch_norm.built and inference_fusion.is_active(training)
          and self._activation_fn is activations.get_activation(None)):
      return inference_fusion.affine_add(x, *batch_norm.inference_scale_offset(), residual)
    else:
      normalized = batch_norm(x, training=training)
      x = normalized + residual
      recipes = [recomputed_activation.recipe_of(t) for t in (normalized, residual)]
      if training and None not in recipes and recipes[0].activation is None:
        # A residual block's non-activated output: the next block's input activation can
        # then recompute it (recomputed_activation.activate).
        recomputed_activation.mark(x, dataclasses.replace(recipes[0], residual=recipes[1]))
    return self._activation_fn(x)

  def get_config(self):
    config = super().get_config()
    config.update({'kernel_size': self.kernel_size, 'strides': self.strides,
                   'atrous_rate': self.atrous_rate})
    return config


def _mostly_padding(x, kernel_size, rate):
  """Whether over a quarter of a dilated 'SAME' convolution's taps fall outside x's map.

  Then training sums the in-image taps (`dilated_conv_by_taps`); otherwise the dense
  convolution costs little more. The ASPP at 641 x 641 (21 x 21 map; rates 6, 12, 18) reads
  the image with 66%, 38% and 18% of its taps; a rate-2 3x3 kernel on 161 x 161 with 98%.
  """
  height, width = x.shape[1], x.shape[2]
  if height is None or width is None:
    return False
  reach = [(i - kernel_size // 2) * rate for i in range(kernel_size)]
  inside = sum(max(height - abs(a), 0) * max(width - abs(b), 0) for a in reach for b in reach)
  return inside < 0.75 * kernel_size ** 2 * height * width


def dilated_conv_by_taps(x, kernel, rate):
  """tf.nn.conv2d(x, kernel, stride 1, 'SAME', dilations=rate) as a sum over the kernel's taps.

  Each tap (i, j) is a 1x1 convolution of the part of x that it reads inside the image,
  padded back into place; taps that read only padding are skipped. On the ASPP's 21 x 21 map
  (641 crop, stride 32) at rates 6, 12 and 18 most taps read mostly padding, which both Keras'
  space-to-batch rewrite (which convolves the padding) and a dense dilated kernel pay for.
  Forward + backward of the three ASPP branches of kMaX-R50 at batch 2, 2048 -> 256 channels:
  0.20 s, against 1.69 s through Keras' rewrite (docs/benchmarks.md, issue #19); autodiff of
  the sum is the exact gradient on any device (TF's dilated Conv2D has a CPU gradient only
  with oneDNN).

  Args:
    x: [batch, height, width, in_channels], static height and width.
    kernel: [k, k, in_channels, out_channels], k odd.
    rate: The dilation rate.

  Returns:
    [batch, height, width, out_channels].
  """
  size = kernel.shape[0]
  height, width = x.shape[1], x.shape[2]
  if height is None or width is None:
    raise ValueError(f'dilated_conv_by_taps needs a static height and width, got {x.shape}.')
  # Unstacked once and windows cut with tf.slice: their gradients are one stack and a pad,
  # where per-tap strided slices would each write a zero-filled kernel- or input-sized
  # gradient (0.4 s of the ASPP's backward pass).
  taps = tf.unstack(tf.reshape(kernel, [size * size, 1, 1, *kernel.shape[2:]]))
  terms = []
  for i in range(size):
    for j in range(size):
      row_shift, col_shift = (i - size // 2) * rate, (j - size // 2) * rate
      rows, cols = height - abs(row_shift), width - abs(col_shift)
      if rows <= 0 or cols <= 0:
        continue
      # Output pixel (r, c) reads input pixel (r + row_shift, c + col_shift).
      top, left = max(row_shift, 0), max(col_shift, 0)
      window = tf.slice(x, [0, top, left, 0], [-1, rows, cols, -1])
      term = tf.nn.conv2d(window, taps[i * size + j], 1, 'VALID')
      out_top, out_left = max(-row_shift, 0), max(-col_shift, 0)
      terms.append(tf.pad(term, [[0, 0], [out_top, height - rows - out_top],
                                 [out_left, width - cols - out_left], [0, 0]]))
  return tf.add_n(terms)


def _depthwise_same_with_fast_gradient(x, kernel):
  """tf.nn.depthwise_conv2d(x, kernel, stride 1, 'SAME') for an odd kernel, whose kernel
  gradient is computed as a depthwise convolution too.

  TF's DepthwiseConv2dNativeBackpropFilter is slow on CPU: 0.32 s for a 5x5 kernel on
  [2, 161, 161, 256] against 0.03 s for the forward convolution (docs/benchmarks.md, issue
  #19). The kernel gradient, dk[i, j, c] = sum_{b, h, w} x_pad[b, h + i, w + j, c] dy[b, h, w, c],
  is a 'VALID' depthwise convolution of the padded input, with (batch x channels) as channels,
  by the upstream gradient as a [h, w] kernel: 0.13 s. The input gradient is the depthwise
  convolution of the upstream gradient with the flipped kernel (TF's own op, as fast). Equal to
  TF's gradient to float32 rounding (tests/model/test_layers.py).

  Args:
    x: [batch, height, width, channels].
    kernel: [k, k, channels, 1], k odd.
  """
  size = kernel.shape[0]
  pad = size // 2

  @tf.custom_gradient
  def convolve(x, kernel):
    def gradient(upstream):
      shape = tf.shape(x)
      batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
      input_gradient = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
          input_sizes=shape, filter=kernel, out_backprop=upstream, strides=[1, 1, 1, 1],
          padding='SAME')
      padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
      # [1, height + 2 pad, width + 2 pad, batch * channels] by [height, width, batch * channels, 1].
      inputs = tf.reshape(tf.transpose(padded, [1, 2, 0, 3]),
                          [1, height + 2 * pad, width + 2 * pad, batch * channels])
      weights = tf.reshape(tf.transpose(upstream, [1, 2, 0, 3]),
                           [height, width, batch * channels, 1])
      per_example = tf.nn.depthwise_conv2d(inputs, weights, [1, 1, 1, 1], 'VALID')
      kernel_gradient = tf.reduce_sum(
          tf.reshape(per_example, [size, size, batch, channels]), axis=2)[..., None]
      return input_gradient, kernel_gradient

    return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'SAME'), gradient

  return convolve(x, kernel)


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class DepthwiseConv2DSame(normalization.NormLayerSerializable, keras.layers.Layer):
  """Depthwise conv + BN + activation; the kernel is [k, k, channels, 1] like DeepLab2's."""

  def __init__(self, kernel_size, name, strides=1, atrous_rate=1, norm_layer=None,
               activation=None, **kwargs):
    super().__init__(name=name, **kwargs)
    self.kernel_size = int(kernel_size)
    self.strides = int(strides)
    self.atrous_rate = int(atrous_rate)
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.activation = activation
    self._activation_fn = activations.get_activation(activation)
    self._padding = None
    if self.strides > 1:
      self._padding = _explicit_padding(self.kernel_size, self.atrous_rate)
    self._depthwise_conv = keras.layers.DepthwiseConv2D(
        self.kernel_size, strides=self.strides, padding='same' if self.strides == 1 else 'valid',
        dilation_rate=self.atrous_rate, use_bias=False,
        depthwise_initializer='he_normal', name='depthwise_conv', dtype=self.dtype_policy)
    self._batch_norm = self.norm_layer(axis=-1, name='batch_norm', dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    x = inputs
    if self._padding is not None:
      begin, end = self._padding
      x = tf.pad(x, [[0, 0], [begin, end], [begin, end], [0, 0]])
    conv = self._depthwise_conv
    if (training and conv.built and self.strides == 1 and self.atrous_rate == 1
        and self.kernel_size % 2 == 1):
      kernel = tf.cast(conv.kernel, x.dtype)
      recipe = recomputed_activation.recipe_of(inputs)
      if recipe is None:
        convolved = _depthwise_same_with_fast_gradient(x, kernel)
      else:
        convolved = recomputed_activation.convolve(recipe, x, kernel,
                                                   _depthwise_same_with_fast_gradient)
    else:
      convolved = conv(x)
    return inference_fusion.normalize_and_activate(
        convolved, self._batch_norm, self.activation, self._activation_fn, training)

  def get_config(self):
    config = super().get_config()
    config.update({'kernel_size': self.kernel_size, 'strides': self.strides,
                   'atrous_rate': self.atrous_rate, 'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class SeparableConv2DSame(normalization.NormLayerSerializable, keras.layers.Layer):
  """Depthwise (BN, act) then pointwise 1x1 (BN, act), each a separate sub-layer."""

  def __init__(self, output_channels, kernel_size, name, atrous_rate=1, norm_layer=None,
               activation=None, **kwargs):
    super().__init__(name=name, **kwargs)
    self.output_channels = int(output_channels)
    self.kernel_size = int(kernel_size)
    self.atrous_rate = int(atrous_rate)
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.activation = activation
    self._depthwise = DepthwiseConv2DSame(
        self.kernel_size, 'depthwise', atrous_rate=self.atrous_rate,
        norm_layer=self.norm_layer, activation=activation, dtype=self.dtype_policy)
    self._pointwise = Conv2DSame(
        self.output_channels, 1, 'pointwise', use_bias=False, use_bn=True,
        norm_layer=self.norm_layer, activation=activation, dtype=self.dtype_policy)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    return self._pointwise(self._depthwise(inputs, training=training), training=training)

  def get_config(self):
    config = super().get_config()
    config.update({'output_channels': self.output_channels, 'kernel_size': self.kernel_size,
                   'atrous_rate': self.atrous_rate, 'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class StackedConv2DSame(normalization.NormLayerSerializable, keras.layers.Layer):
  """`num_layers` convolutions named conv1_bn_act, conv2_bn_act, ... (DeepLab2's conv_block).

  conv_type is 'depthwise_separable_conv' or 'standard_conv'.
  """

  def __init__(self, num_layers, output_channels, kernel_size, name,
               conv_type='depthwise_separable_conv', norm_layer=None, activation=None,
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.num_layers = int(num_layers)
    self.output_channels = int(output_channels)
    self.kernel_size = int(kernel_size)
    self.conv_type = conv_type
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    self.activation = activation
    self._convs = []
    for index in range(self.num_layers):
      name_i = f'conv{index + 1}_bn_act'
      if conv_type == 'depthwise_separable_conv':
        layer = SeparableConv2DSame(self.output_channels, self.kernel_size, name_i,
                                    norm_layer=self.norm_layer, activation=activation,
                                    dtype=self.dtype_policy)
      elif conv_type == 'standard_conv':
        layer = Conv2DSame(self.output_channels, self.kernel_size, name_i, use_bias=False,
                           use_bn=True, norm_layer=self.norm_layer, activation=activation,
                           dtype=self.dtype_policy)
      else:
        raise ValueError(f'Unsupported conv_type "{conv_type}".')
      self._convs.append(layer)

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def call(self, inputs, training=None):
    x = inputs
    for layer in self._convs:
      x = layer(x, training=training)
    return x

  def get_config(self):
    config = super().get_config()
    config.update({'num_layers': self.num_layers, 'output_channels': self.output_channels,
                   'kernel_size': self.kernel_size, 'conv_type': self.conv_type,
                   'activation': self.activation,
                   'norm_layer': normalization.norm_layer_config(self.norm_layer)})
    return config


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class Conv1D(_ConvolutionNormActivation):
  """1x1 Conv1D (+ BN) (+ activation) on [batch, length, channels].

  The kernel is [1, in, out] as in DeepLab2 (a Keras Conv1D), so checkpoints map directly.
  """

  def __init__(self, output_channels, name, use_bias=True, use_bn=False, norm_layer=None,
               bn_gamma_initializer='ones', activation=None, kernel_initializer='he_normal',
               **kwargs):
    super().__init__(output_channels, name, use_bias=use_bias, use_bn=use_bn,
                     norm_layer=norm_layer, bn_gamma_initializer=bn_gamma_initializer,
                     activation=activation, kernel_initializer=kernel_initializer, **kwargs)
    self._conv = keras.layers.Conv1D(
        self.output_channels, 1, use_bias=self.use_bias,
        kernel_initializer=self.kernel_initializer, name='conv', dtype=self.dtype_policy)
    self._create_batch_norm()

  def call(self, inputs, training=None):
    x = recomputed_activation.keras_convolution(self._conv, inputs, training)
    if self._batch_norm is None:
      return self._activation_fn(x)
    return inference_fusion.normalize_and_activate(x, self._batch_norm, self.activation,
                                                   self._activation_fn, training)
