"""Batch normalisation over one or several axes, synchronised across replicas.

Keras 3's BatchNormalization keeps statistics for a single axis. DeepLab2's attention layers
normalise with per-(term, head[, channel]) statistics, e.g. axis=[0, 2] on a stacked
[terms, batch, heads, length, length] tensor. `BatchNorm` keeps its statistics with the
broadcast shape DeepLab2's Keras-2 layer stored (1 in every reduced dimension, e.g.
[3, 1, 8, 1, 1]); with a single axis the variables are plain vectors [channels]. So the
variables of both have the same shapes and a checkpoint converts without reshapes.

Statistics are always computed in float32, whatever the compute dtype, because variances of
bfloat16 activations lose most of their precision.

Inside `moving_average_updates_off()` a training-mode call normalises with the batch moments as
usual but leaves the moving averages alone: the recomputation of an activation-recomputed part
in the backward pass (model/recompute.py) runs under it, so a step updates them once.
"""

import contextlib
import functools
import threading

import keras
import tensorflow as tf

from deeplab2_kmax.model.layers import activations
from deeplab2_kmax.model.layers import recomputed_activation
from deeplab2_kmax.model.layers import xla_elementwise


_STATE = threading.local()


@contextlib.contextmanager
def moving_average_updates_off():
  """Training-mode BatchNorm calls (traced or run) inside do not update moving statistics."""
  previous = getattr(_STATE, 'updates_off', False)
  _STATE.updates_off = True
  try:
    yield
  finally:
    _STATE.updates_off = previous


def moving_average_updates_are_off() -> bool:
  return getattr(_STATE, 'updates_off', False)


def _replica_context():
  """The replica context when running inside a multi-replica strategy, else None."""
  if not tf.distribute.has_strategy():
    return None
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync <= 1:
    return None
  return context


def _fused_kernel_input(inputs):
  """`inputs` in a dtype TF's fused BN kernels read (float32, float16, bfloat16)."""
  if inputs.dtype in (tf.float32, tf.float16, tf.bfloat16):
    return inputs
  return tf.cast(inputs, tf.float32)


def _biased_variance(unbiased_variance, x):
  """The fused kernel returns the unbiased batch variance; BN normalises with the biased one."""
  count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
  return unbiased_variance * ((count - 1.0) / tf.maximum(count, 1.0))


def _scale_and_offset(gamma, beta, mean, variance, epsilon):
  """Batch normalisation as the affine map x * scale + offset: (scale, offset)."""
  scale = gamma * tf.math.rsqrt(variance + epsilon)
  return scale, beta - mean * scale


def _batch_normalize_of(x, gamma, beta, reduce_axes, epsilon):
  x = tf.cast(x, tf.float32)
  mean, variance = tf.nn.moments(x, axes=reduce_axes, keepdims=True)
  scale, offset = _scale_and_offset(gamma, beta, mean, variance, epsilon)
  return x * scale + offset, mean, variance


def _batch_normalize_gradient_of(x, gamma, upstream, reduce_axes, epsilon):
  x = tf.cast(x, tf.float32)
  mean, variance = tf.nn.moments(x, axes=reduce_axes, keepdims=True)
  inverse_std = tf.math.rsqrt(variance + epsilon)
  normalized = (x - mean) * inverse_std
  upstream = tf.cast(upstream, tf.float32)
  upstream_mean = tf.reduce_mean(upstream, axis=reduce_axes, keepdims=True)
  projection = tf.reduce_mean(upstream * normalized, axis=reduce_axes, keepdims=True)
  x_gradient = gamma * inverse_std * (upstream - upstream_mean - normalized * projection)
  count = tf.cast(tf.size(x) // tf.size(mean), tf.float32)
  return x_gradient, projection * count, upstream_mean * count


_batch_normalize = xla_elementwise.fused(_batch_normalize_of)
_batch_normalize_gradient = xla_elementwise.fused(_batch_normalize_gradient_of)


def _normalize_with_batch_moments(inputs, gamma, beta, reduce_axes, epsilon):
  """Training BN with statistics over `reduce_axes` (one replica): (float32 output, mean,
  variance), the last two in the broadcast shape of gamma and beta.

  For the attention layers' BNs over several axes (axis=[0, 2] on [3, batch, heads, length,
  length], ...), which TF's fused kernels do not cover. Forward and gradient are one XLA
  kernel each on large tensors, and the backward pass keeps only the input; op by op, the
  moments, the normalisation and their gradients are a dozen passes, ~2.5x slower on the
  pixel decoder's stride-16 axial attention (docs/benchmarks.md, issue #19):
    dx = gamma r (g - mean(g) - x_hat mean(g x_hat)),  d gamma = sum(g x_hat),  d beta = sum(g),
  means and sums over `reduce_axes`, r = 1 / sqrt(var + epsilon). Equal to the op-by-op
  gradient to float32 rounding (tests/model/test_layers.py).
  """
  @tf.custom_gradient
  def normalize(x, gamma, beta):
    outputs, mean, variance = _batch_normalize(x, gamma, beta, reduce_axes, epsilon)

    def gradient(upstream, *unused_statistics_upstream):
      x_gradient, gamma_gradient, beta_gradient = _batch_normalize_gradient(
          x, gamma, upstream, reduce_axes, epsilon)
      return tf.cast(x_gradient, x.dtype), gamma_gradient, beta_gradient

    return (outputs, mean, variance), gradient

  return normalize(inputs, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class BatchNorm(keras.layers.Layer):
  """Batch normalisation that keeps one statistic per index of `axis`.

  Call on any tensor whose rank matches the build shape; the statistics are reduced over every
  dimension not in `axis`. In training mode the batch moments are used (summed across replicas
  when `synchronized` and the current strategy has several), and the moving averages updated
  with `moving = momentum * moving + (1 - momentum) * batch`.

  Args:
    axis: An int or a list of ints, the axes that keep separate statistics.
    momentum: Moving-average momentum (DeepLab2: 0.99).
    epsilon: Added to the variance (DeepLab2: 1e-3).
    gamma_initializer: Initialiser of the scale (DeepLab2 zero-initialises the last BN of
      every residual branch, and uses 0.1 for the mask-logit BN).
    synchronized: Whether to all-reduce the moments across replicas.
  """

  def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, gamma_initializer='ones',
               synchronized=False, **kwargs):
    super().__init__(**kwargs)
    self.axis = [int(a) for a in axis] if isinstance(axis, (list, tuple)) else int(axis)
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.gamma_initializer = keras.initializers.get(gamma_initializer)
    self.synchronized = bool(synchronized)

  def _axes(self, rank):
    axes = self.axis if isinstance(self.axis, list) else [self.axis]
    return sorted(a % rank for a in axes)

  def build(self, input_shape):
    rank = len(input_shape)
    axes = self._axes(rank)
    if len(axes) == 1:
      param_shape = (int(input_shape[axes[0]]),)
    else:
      param_shape = tuple(int(input_shape[d]) if d in axes else 1 for d in range(rank))
    self._param_shape = param_shape
    self.gamma = self.add_weight(name='gamma', shape=param_shape,
                                 initializer=self.gamma_initializer, dtype='float32',
                                 autocast=False)
    self.beta = self.add_weight(name='beta', shape=param_shape, initializer='zeros',
                                dtype='float32', autocast=False)
    # Unsynchronised, each replica's batch moves its own copy of the averages, and with Keras's
    # default aggregation ('none') the copies drift apart: on several workers each one saves
    # different statistics in its checkpoint, on several GPUs evaluation in memory normalises
    # each replica's images differently. 'mean' makes an update in a replica context an
    # all-reduce mean (one small all-reduce per variable and step), so every copy holds the
    # average of the replicas' updates. Synchronised moments are equal on every replica already.
    aggregation = 'none' if self.synchronized else 'mean'
    self.moving_mean = self.add_weight(name='moving_mean', shape=param_shape,
                                       initializer='zeros', trainable=False, dtype='float32',
                                       autocast=False, aggregation=aggregation)
    self.moving_variance = self.add_weight(name='moving_variance', shape=param_shape,
                                           initializer='ones', trainable=False,
                                           dtype='float32', autocast=False,
                                           aggregation=aggregation)

  def _broadcast_shape(self, rank):
    axes = self._axes(rank)
    shape = [1] * rank
    if len(axes) == 1:
      shape[axes[0]] = self._param_shape[0]
    else:
      shape = list(self._param_shape)
    return shape

  def _moments(self, x, reduce_axes):
    context = _replica_context() if self.synchronized else None
    if context is None:
      mean, variance = tf.nn.moments(x, axes=reduce_axes, keepdims=True)
      return mean, variance
    local_sum = tf.reduce_sum(x, axis=reduce_axes, keepdims=True)
    local_squared_sum = tf.reduce_sum(tf.square(x), axis=reduce_axes, keepdims=True)
    local_count = tf.cast(tf.size(x), tf.float32) / tf.cast(tf.size(local_sum), tf.float32)
    total_sum, total_squared_sum, total_count = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [local_sum, local_squared_sum, local_count])
    mean = total_sum / total_count
    variance = tf.maximum(total_squared_sum / total_count - tf.square(mean), 0.0)
    return mean, variance

  def inference_scale_offset(self):
    """(scale, offset) in the variables' shape: inference computes x * scale + offset.

    Lets a caller fold the normalisation into a neighbouring linear op at inference.
    """
    return _scale_and_offset(self.gamma, self.beta, self.moving_mean, self.moving_variance,
                             self.epsilon)

  def _fused_inference(self, inputs):
    """Inference on [batch, height, width, channels] with TF's fused kernel.

    Grappler fuses FusedBatchNorm with the preceding convolution (and activation) on CPU and
    GPU; the fused kernel also keeps its arithmetic in float32 for bfloat16/float16 inputs.
    """
    x = _fused_kernel_input(inputs)
    outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
        epsilon=self.epsilon, is_training=False)
    return tf.cast(outputs, self.compute_dtype)

  def _fused_training(self, inputs):
    """Training on [batch, height, width, channels] with TF's fused kernel (one replica).

    The fused forward and gradient kernels are several times faster on CPU than the moments
    built from generic reductions, and they read bfloat16/float16 inputs without a float32
    copy. Same arithmetic as the generic path: normalise with the biased batch variance, and
    move the averages towards it (the kernel returns the unbiased variance, so it is rescaled).
    """
    x = _fused_kernel_input(inputs)
    outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        x, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
    variance = _biased_variance(unbiased_variance, x)
    self._update_moving_averages(mean, variance)
    return tf.cast(outputs, self.compute_dtype), *self._batch_scale_offset(mean, variance)

  def _batch_scale_offset(self, mean, variance):
    """The training normalisation as x * scale + offset (no gradient): a recipe's affine map."""
    return tuple(tf.stop_gradient(t) for t in _scale_and_offset(
        self.gamma, self.beta, mean, variance, self.epsilon))

  def _fused_training_activation(self, inputs, activation):
    """(activation(BN(inputs)), scale, offset) in training, keeping only `inputs` for the
    backward pass; `activation` is 'gelu' or 'relu', and the output is that of
    activation(inputs * scale + offset) with the batch statistics' per-channel affine map.

    Differentiating BN and the activation one after the other keeps the normalised tensor (the
    activation's input) besides `inputs` (BN's) until the backward pass: one more full-size
    tensor per BN + GELU, ~0.5 GB of the kMaX-R50 step at 641x641, batch 2 (docs/benchmarks.md,
    issue #19). Here the backward pass renormalises `inputs` inside the activation gradient's
    XLA kernel (activations.backward) and calls TF's fused BN gradient with the forward's
    reserve spaces, as TF's own gradient does; the result equals the op-by-op gradient to
    float32 rounding (tests/model/test_layers.py). The output is computed from `inputs` with the
    same function a consumer convolution recomputes it with (recomputed_activation.py).
    """
    x = _fused_kernel_input(inputs)
    epsilon = self.epsilon

    @tf.custom_gradient
    def normalize_and_activate(x, gamma, beta):
      _, mean, unbiased_variance, reserve_1, reserve_2, reserve_3 = (
          tf.raw_ops.FusedBatchNormV3(
              x=x, scale=gamma, offset=beta, mean=tf.constant([], tf.float32),
              variance=tf.constant([], tf.float32), epsilon=epsilon, is_training=True))
      variance = _biased_variance(unbiased_variance, x)
      scale, offset = _scale_and_offset(gamma, beta, mean, variance, epsilon)
      outputs = activations.affine_then_activation(activation, x, scale, offset)

      def gradient(upstream, *unused_statistics_upstream):
        normalized_upstream = activations.backward(activation, x, upstream, scale=scale,
                                                   offset=offset)
        x_grad, gamma_grad, beta_grad, _, _ = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=normalized_upstream, x=x, scale=gamma, reserve_space_1=reserve_1,
            reserve_space_2=reserve_2, reserve_space_3=reserve_3, epsilon=epsilon,
            is_training=True)
        return x_grad, gamma_grad, beta_grad

      return (outputs, mean, variance, scale, offset), gradient

    outputs, mean, variance, scale, offset = normalize_and_activate(
        x, tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta))
    self._update_moving_averages(tf.stop_gradient(mean), tf.stop_gradient(variance))
    return tf.cast(outputs, self.compute_dtype), tf.stop_gradient(scale), tf.stop_gradient(offset)

  def _update_moving_averages(self, mean, variance):
    if moving_average_updates_are_off():
      return
    self.moving_mean.assign(
        self.momentum * self.moving_mean
        + (1.0 - self.momentum) * tf.reshape(mean, self._param_shape))
    self.moving_variance.assign(
        self.momentum * self.moving_variance
        + (1.0 - self.momentum) * tf.reshape(variance, self._param_shape))

  def call(self, inputs, training=None, then_activation=None):
    """Normalises `inputs`; with `then_activation` ('gelu' or 'relu'), returns that activation
    of the result (in training as one step whose backward pass keeps only `inputs`, and whose
    output a following convolution can recompute: recomputed_activation.py)."""
    rank = len(inputs.shape)
    axes = self._axes(rank)
    activation = activations.get_activation(then_activation)
    # Statistics per channel of a channels-last tensor map onto TF's fused kernels (any other
    # rank through a [1, 1, elements, channels] view), except when the moments must be summed
    # across replicas first.
    fused = axes == [rank - 1] and (
        not training or not self.synchronized or _replica_context() is None)
    if fused and training and (then_activation is None
                               or activations.has_input_gradient(then_activation)):
      # Marked with how it is recomputed from `inputs`, which the gradient keeps anyway.
      name = None if then_activation is None else then_activation.lower()
      flat = inputs if rank == 4 else tf.reshape(inputs, [1, 1, -1, inputs.shape[-1]])
      if name is None:
        outputs, scale, offset = self._fused_training(flat)
      else:
        outputs, scale, offset = self._fused_training_activation(flat, name)
      if rank != 4:
        outputs = tf.reshape(outputs, tf.shape(inputs))
      return recomputed_activation.mark(outputs, recomputed_activation.Recipe(
          _fused_kernel_input(inputs), scale, offset, name, outputs.dtype))
    if fused:
      if rank == 4:
        outputs = self._fused_inference(inputs)
      else:
        flat = tf.reshape(inputs, [1, 1, -1, inputs.shape[-1]])
        outputs = tf.reshape(self._fused_inference(flat), tf.shape(inputs))
    else:
      x = tf.cast(inputs, tf.float32)
      shape = self._broadcast_shape(rank)
      gamma = tf.reshape(self.gamma, shape)
      beta = tf.reshape(self.beta, shape)
      reduce_axes = [d for d in range(rank) if d not in axes]
      if training and (not self.synchronized or _replica_context() is None):
        outputs, mean, variance = _normalize_with_batch_moments(
            inputs, gamma, beta, reduce_axes, self.epsilon)
        self._update_moving_averages(tf.stop_gradient(mean), tf.stop_gradient(variance))
        return activation(tf.cast(outputs, self.compute_dtype))
      if training:
        mean, variance = self._moments(x, reduce_axes)
        self._update_moving_averages(mean, variance)
      else:
        mean = tf.reshape(self.moving_mean, shape)
        variance = tf.reshape(self.moving_variance, shape)
      scale, offset = _scale_and_offset(gamma, beta, mean, variance, self.epsilon)
      outputs = tf.cast(x * scale + offset, self.compute_dtype)
    return activation(outputs)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update({
        'axis': self.axis,
        'momentum': self.momentum,
        'epsilon': self.epsilon,
        'gamma_initializer': keras.initializers.serialize(self.gamma_initializer),
        'synchronized': self.synchronized,
    })
    return config


def make_norm_layer(momentum=0.99, epsilon=1e-3, synchronized=False):
  """A factory `norm_layer(axis=..., name=..., gamma_initializer=...)` with fixed solver options.

  Sub-networks take such a factory (DeepLab2's `bn_layer`), so the solver's momentum, epsilon
  and sync choice reach every BN without each layer knowing about them.
  """
  return functools.partial(BatchNorm, momentum=momentum, epsilon=epsilon,
                           synchronized=synchronized)


def norm_layer_config(norm_layer):
  """The keyword arguments of a `make_norm_layer` factory, for `get_config`."""
  keywords = getattr(norm_layer, 'keywords', {}) or {}
  return {'momentum': keywords.get('momentum', 0.99), 'epsilon': keywords.get('epsilon', 1e-3),
          'synchronized': keywords.get('synchronized', False)}


def norm_layer_from_config(config):
  """Inverse of `norm_layer_config`."""
  if config is None:
    return make_norm_layer()
  return make_norm_layer(**config)


class NormLayerSerializable:
  """Mixin for layers whose `norm_layer` argument is a factory (serialised by
  norm_layer_config): from_config rebuilds the factory before calling the constructor.

  List it before the Keras base class: class Block(NormLayerSerializable, keras.layers.Layer).
  """

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config['norm_layer'] = norm_layer_from_config(config.get('norm_layer'))
    return cls(**config)

