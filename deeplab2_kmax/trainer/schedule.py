"""Learning-rate schedule: linear warm-up, then poly or cosine decay on the global step.

    schedule = LearningRateSchedule.from_solver(solver_options, multiplier=1.0)
    lr = schedule(step)     # float32 scalar

As in DeepLab2, the decay is evaluated on the global step itself (it is not shifted by the
warm-up): during warm-up lr = base * step / warmup_steps, afterwards lr = decay(step); so the
rate drops slightly from base to decay(warmup_steps) when warm-up ends, as DeepLab2's does.
"""

import math

import tensorflow as tf

POLICY_POLY = 'poly'
POLICY_COSINE = 'cosine'


class LearningRateSchedule:
  """lr(step) for one parameter group (the backbone multiplier is folded into the rates)."""

  def __init__(self, base_learning_rate: float, total_steps: int, policy: str = POLICY_POLY,
               warmup_steps: int = 0, poly_power: float = 0.9, poly_end: float = 0.0,
               cosine_end_fraction: float = 0.0):
    if policy not in (POLICY_POLY, POLICY_COSINE):
      raise ValueError(f'solver_options.learning_policy must be "{POLICY_POLY}" or '
                       f'"{POLICY_COSINE}", got "{policy}".')
    if total_steps <= 0:
      raise ValueError(f'solver_options.training_number_of_steps must be > 0, got '
                       f'{total_steps}.')
    self.base = float(base_learning_rate)
    self.total_steps = int(total_steps)
    self.policy = policy
    self.warmup_steps = int(warmup_steps)
    self.poly_power = float(poly_power)
    self.poly_end = float(poly_end)
    self.cosine_end_fraction = float(cosine_end_fraction)

  @classmethod
  def from_solver(cls, solver_options, multiplier: float = 1.0) -> 'LearningRateSchedule':
    """From a SolverOptions proto; `multiplier` scales the base and end rates."""
    return cls(solver_options.base_learning_rate * multiplier,
               solver_options.training_number_of_steps,
               policy=solver_options.learning_policy,
               warmup_steps=solver_options.warmup_steps,
               poly_power=solver_options.poly_learning_power,
               poly_end=solver_options.poly_end_learning_rate * multiplier,
               cosine_end_fraction=solver_options.cosine_end_learning_rate_fraction)

  def _decay(self, step: tf.Tensor) -> tf.Tensor:
    progress = tf.minimum(step, float(self.total_steps)) / float(self.total_steps)
    if self.policy == POLICY_POLY:
      return (self.base - self.poly_end) * (1.0 - progress) ** self.poly_power + self.poly_end
    end = self.base * self.cosine_end_fraction
    return end + (self.base - end) * 0.5 * (1.0 + tf.cos(math.pi * progress))

  def __call__(self, step) -> tf.Tensor:
    step = tf.cast(step, tf.float32)
    decayed = self._decay(step)
    if self.warmup_steps <= 0:
      return decayed
    warm = self.base * step / float(self.warmup_steps)
    return tf.where(step < self.warmup_steps, warm, decayed)
