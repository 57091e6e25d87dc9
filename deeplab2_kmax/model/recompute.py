"""Activation recomputation (trainer_options.recompute): a part of the model whose inner
activations are not kept for the backward pass but computed again there (tf.recompute_grad).

    outputs = recompute.call(lambda x: stage(x, training=True), x)

`call` takes and returns any nest (dicts, tuples) of tensors. The forward pass runs the function
once without recording its inner operations; the backward pass runs it again on the same
inputs under a local tape and differentiates that. Every trainable variable read inside gets its
gradient (custom_gradient hands them to the gradient function as `variables`).

Two side effects of the second run are handled or stated:
- Batch-norm moving statistics: the recomputation runs with the moving-average updates
  switched off (normalization.moving_average_updates_off), so one step updates them once, as
  the plain step does. The recomputed forward still normalises with the batch moments.
- Random draws (drop path): the recomputation draws new masks, so with drop path on the
  gradient of a recomputed part belongs to another mask than its forward output. Exact only
  with drop path off (keep probability 1) in the recomputed parts; docs/training.md.
"""

import tensorflow as tf

from deeplab2_kmax.model.layers import normalization

ENCODER = 'encoder'
PIXEL_DECODER = 'pixel_decoder'
TRANSFORMER_DECODER = 'transformer_decoder'
# The values of trainer_options.recompute.
PARTS = (ENCODER, PIXEL_DECODER, TRANSFORMER_DECODER)


def call(fn, inputs):
  """fn(inputs) with its activations recomputed in the backward pass.

  Args:
    fn: inputs -> a nest of tensors. Must not create variables (call it once without
      recomputation first, e.g. the model's build pass).
    inputs: a nest of tensors.

  Returns:
    fn(inputs), same structure.
  """
  flat_inputs = tf.nest.flatten(inputs)
  structure = []
  runs = []

  def flat_fn(*flat):
    # The first run is the forward pass; any later one is a recomputation in a backward pass
    # (one per tape.gradient call), which must not move the moving statistics again.
    first = not runs
    runs.append(None)
    packed = tf.nest.pack_sequence_as(inputs, list(flat))
    if first:
      outputs = fn(packed)
    else:
      with normalization.moving_average_updates_off():
        outputs = fn(packed)
    if first:
      structure.append(outputs)
    return tf.nest.flatten(outputs)

  flat_outputs = tf.recompute_grad(flat_fn)(*flat_inputs)
  return tf.nest.pack_sequence_as(structure[0], list(flat_outputs))
