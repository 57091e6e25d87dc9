"""Optimizers of a training run: Adam, AdamW (decoupled decay on kernels only) or SGD, with a
separate optimizer for the pixel encoder when its learning-rate multiplier is not 1.

    groups = build_optimizers(solver_options, model, global_step)
    for group in groups: group.optimizer.apply(grads_of(group.variables), group.variables)

Both optimizers read their rate from the shared global step (not from their own iteration
counters), so a skipped update or a restored checkpoint cannot shift the schedule.
"""

import dataclasses
from typing import Callable, Sequence

import keras
import tensorflow as tf

from deeplab2_kmax.trainer import schedule as schedule_lib

# Variables whose last name component is one of these get weight decay; everything else
# (norm gammas/betas, biases, positional embeddings, cluster centers, layer scales) does not.
DECAYED_VARIABLE_NAMES = ('kernel', 'depthwise_kernel', 'pointwise_kernel')


@dataclasses.dataclass
class OptimizerGroup:
  """One optimizer and the variables it updates."""
  name: str                                   # 'backbone' or 'main'
  optimizer: keras.optimizers.Optimizer
  variables: list
  schedule: schedule_lib.LearningRateSchedule
  learning_rate: Callable[[], tf.Tensor]      # the rate at the current global step


def is_decayed(variable) -> bool:
  """True for convolution / dense kernels (the only weights AdamW decays)."""
  return variable.name.split('/')[-1].split(':')[0] in DECAYED_VARIABLE_NAMES


class _FusedAdamUpdate:
  """Keras' Adam / AdamW update (TF backend) as one fused op per variable.

  Keras runs Adam's update as ~12 element-wise ops per variable, and AdamW's decay evaluates
  the learning-rate schedule once more per decayed variable (its `learning_rate` property calls
  the schedule each time): ~10,000 small ops for kMaX-R50's 718 variables, 0.8 s of op time
  per step on a 2-core CPU (docs/benchmarks.md, issue #19). Here the step's scalars (rate,
  decay, bias corrections) are computed once, each decayed kernel is scaled by 1 - rate x decay,
  and TF's ResourceApplyAdam (the kernel Keras 2's Adam ran; the same formula as Keras 3's)
  updates the variable and both moments in one pass. Equal to Keras' update to float32 rounding
  (tests/trainer/test_optimizer.py). Relies on two hooks of Keras' TF-backend optimizer
  (`_apply_weight_decay`, `_backend_update_step`); the tests fail if they change.
  """

  def _apply_weight_decay(self, variables):
    # Applied per variable in _fused_updates, with the rate computed once.
    del variables

  def _backend_update_step(self, grads, trainable_variables, learning_rate):
    """Keras' TF-backend update (replica context), with the step's scalars computed once."""
    if self.amsgrad:
      super()._apply_weight_decay(trainable_variables)
      super()._backend_update_step(grads, trainable_variables, learning_rate)
      return
    rate = tf.cast(learning_rate, tf.float32)
    local_step = tf.cast(self.iterations + 1, tf.float32)
    decay = getattr(self, 'weight_decay', None)
    scalars = (rate, tf.pow(tf.constant(self.beta_1, tf.float32), local_step),
               tf.pow(tf.constant(self.beta_2, tf.float32), local_step),
               1.0 - rate * tf.cast(0.0 if decay is None else decay, tf.float32))
    variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
    grads_and_vars = self._all_reduce_sum_gradients(list(zip(grads, variables)))
    tf.__internal__.distribute.interim.maybe_merge_call(
        self._fused_updates, self._distribution_strategy, grads_and_vars, scalars)

  def _fused_updates(self, distribution, grads_and_vars, scalars):
    """Cross-replica context: `scalars` are per replica; update picks each device's."""
    decays = getattr(self, 'weight_decay', None) is not None

    def update(variable, gradient, rate, beta_1_power, beta_2_power, keep):
      index = self._get_variable_index(variable)
      dtype = variable.dtype
      if decays and self._use_weight_decay(variable):
        # Keras: variable - variable * decay * rate.
        variable.assign(variable * tf.cast(keep, dtype))
      return tf.raw_ops.ResourceApplyAdam(
          var=variable.handle, m=self._momentums[index].value.handle,
          v=self._velocities[index].value.handle, beta1_power=tf.cast(beta_1_power, dtype),
          beta2_power=tf.cast(beta_2_power, dtype), lr=tf.cast(rate, dtype),
          beta1=tf.constant(self.beta_1, dtype), beta2=tf.constant(self.beta_2, dtype),
          epsilon=tf.constant(self.epsilon, dtype),
          grad=tf.cast(tf.convert_to_tensor(gradient), dtype))

    for gradient, variable in grads_and_vars:
      distribution.extended.update(variable, update, args=(gradient, *scalars), group=False)


class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
  """keras.optimizers.Adam with one fused update op per variable."""

  def __init__(self, *args, name='adam', **kwargs):
    super().__init__(*args, name=name, **kwargs)


class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
  """keras.optimizers.AdamW with one fused update op per variable."""

  def __init__(self, *args, name='adamw', **kwargs):
    super().__init__(*args, name=name, **kwargs)


def make_optimizer(solver_options, learning_rate: Callable[[], tf.Tensor],
                   variables: Sequence) -> keras.optimizers.Optimizer:
  """The configured Keras optimizer, weight-decay exclusions set, not yet built."""
  name = solver_options.optimizer
  if name == 'adam':
    return FusedAdam(learning_rate, beta_1=solver_options.adam_beta_1,
                     beta_2=solver_options.adam_beta_2, epsilon=solver_options.adam_epsilon)
  if name == 'adamw':
    optimizer = FusedAdamW(
        learning_rate, weight_decay=solver_options.adamw_weight_decay,
        beta_1=solver_options.adam_beta_1, beta_2=solver_options.adam_beta_2,
        epsilon=solver_options.adam_epsilon)
    excluded = [v for v in variables if not is_decayed(v)]
    if excluded:
      optimizer.exclude_from_weight_decay(var_list=excluded)
    return optimizer
  if name == 'sgd':
    return keras.optimizers.SGD(learning_rate, momentum=solver_options.sgd_momentum)
  raise ValueError(f'solver_options.optimizer must be "adam", "adamw" or "sgd", got "{name}".')


def build_optimizers(solver_options, model, global_step: tf.Variable) -> list[OptimizerGroup]:
  """Builds (eagerly, so call inside strategy.scope()) one or two optimizer groups.

  With backbone_learning_rate_multiplier != 1 the backbone's variables
  (model.backbone_trainable_variables(): kMaX's encoder; MaX-DeepLab's encoder less its
  transformer, extra and memory variables) get their own optimizer whose rates (and hence AdamW decay) are scaled by the multiplier.
  """
  trainable = list(model.trainable_variables)
  multiplier = solver_options.backbone_learning_rate_multiplier
  groups = []
  if multiplier != 1.0:
    backbone_ids = {id(v) for v in model.backbone_trainable_variables()}
    parts = [('backbone', [v for v in trainable if id(v) in backbone_ids], multiplier),
             ('main', [v for v in trainable if id(v) not in backbone_ids], 1.0)]
  else:
    parts = [('main', trainable, 1.0)]
  for name, variables, scale in parts:
    schedule = schedule_lib.LearningRateSchedule.from_solver(solver_options, scale)
    rate = lambda schedule=schedule: schedule(global_step)  # pylint: disable=g-long-lambda
    optimizer = make_optimizer(solver_options, rate, variables)
    optimizer.build(variables)
    groups.append(OptimizerGroup(name, optimizer, variables, schedule, rate))
  return groups


def clip_gradients(solver_options, gradients: list) -> tuple[list, tf.Tensor]:
  """Global-norm clipping when use_gradient_clipping; returns (gradients, global norm)."""
  norm = tf.linalg.global_norm([g for g in gradients if g is not None])
  if solver_options.use_gradient_clipping:
    gradients, _ = tf.clip_by_global_norm(gradients, solver_options.clip_gradient_norm,
                                          use_norm=norm)
  return gradients, norm
