"""Dynamic loss scaling of mixed_float16 training (Keras LossScaleOptimizer's rule).

    scale = DynamicLossScale()          # inside strategy.scope()
    objective * scale.value  ->  gradients / scale.value
    stop = scale.update(overflow)       # replica context, overflow all-reduced

The loss is multiplied by the scale before the backward pass so that small float16 gradients
do not underflow, and the gradients are divided by it afterwards. A step whose (scaled)
gradients overflow halves the scale (never below 1) and is skipped by the trainer;
GROWTH_STEPS finite steps in a row double it. Both variables are part of the training
checkpoint (checkpoint/layout.py), so a resumed run goes on with the scale it had.
"""

import tensorflow as tf

# Keras LossScaleOptimizer's defaults.
INITIAL_LOSS_SCALE = 2.0 ** 15
GROWTH_STEPS = 2000


class DynamicLossScale:
  """The current loss scale and the finite-gradient steps since it last changed."""

  def __init__(self):
    # Every replica computes the same update from all-reduced flags: keep the first one's.
    first = tf.VariableAggregation.ONLY_FIRST_REPLICA
    self.value = tf.Variable(INITIAL_LOSS_SCALE, trainable=False, name='loss_scale',
                             aggregation=first)
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name='loss_scale_good_steps', aggregation=first)

  def checkpoint_items(self) -> dict:
    """{name: variable} as saved in the training checkpoint."""
    return {'scale': self.value, 'good_steps': self.good_steps}

  def update(self, overflow: tf.Tensor) -> tf.Tensor:
    """Halves the scale after an overflow, doubles it after GROWTH_STEPS good steps.

    Args:
      overflow: float32 scalar, > 0 when some replica's gradients were not finite.

    Returns:
      bool scalar: the overflow happened at a scale of 1 already, so scaling cannot help.
    """
    overflowed = overflow > 0
    at_floor = self.value <= 1.0
    grow = tf.logical_and(tf.logical_not(overflowed), self.good_steps + 1 >= GROWTH_STEPS)
    self.value.assign(tf.where(overflowed, tf.maximum(self.value / 2.0, 1.0),
                               tf.where(grow, self.value * 2.0, self.value)))
    self.good_steps.assign(tf.where(tf.logical_or(overflowed, grow),
                                    tf.constant(0, tf.int64), self.good_steps + 1))
    return tf.logical_and(overflowed, at_floor)
