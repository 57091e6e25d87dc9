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


def make_optimizer(solver_options, learning_rate: Callable[[], tf.Tensor],
                   variables: Sequence) -> keras.optimizers.Optimizer:
  """The configured Keras optimizer, weight-decay exclusions set, not yet built."""
  name = solver_options.optimizer
  if name == 'adam':
    return keras.optimizers.Adam(learning_rate, beta_1=solver_options.adam_beta_1,
                                 beta_2=solver_options.adam_beta_2,
                                 epsilon=solver_options.adam_epsilon)
  if name == 'adamw':
    optimizer = keras.optimizers.AdamW(
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
