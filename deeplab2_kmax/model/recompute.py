"""Activation recomputation (trainer_options.recompute): a part of the model whose inner
activations are not kept for the backward pass but computed again there (tf.recompute_grad).

    outputs = recompute.call(lambda x: stage(x, training=True), x)

`call` takes and returns any nest (dicts, tuples) of tensors. The forward pass runs the function
once without recording its inner operations; the backward pass runs it again on the same
inputs under a local tape and differentiates that. Every trainable variable read inside gets its
gradient (custom_gradient hands them to the gradient function as `variables`).

Two side effects of the second run are handled:
- Batch-norm moving statistics: the recomputation runs with the moving-average updates
  switched off (normalization.moving_average_updates_off), so one step updates them once, as
  the plain step does. The recomputed forward still normalises with the batch moments.
- Random draws (drop path): the forward run records its drop-path masks and the
  recomputation reuses them (drop_path.recorded_masks / replayed_masks), so the gradient
  belongs to the masks of the forward output. The masks are [batch, 1, ..., 1] tensors of the
  same graph. Other random ops inside a recomputed part would draw again; there are none (the
  ASPP's dropout is in the semantic decoder, which is never recomputed).
"""

import tensorflow as tf

from deeplab2_kmax.model.layers import drop_path
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
  masks = []

  def flat_fn(*flat):
    # The first run is the forward pass; any later one is a recomputation in a backward pass
    # (one per tape.gradient call), which must not move the moving statistics again and must
    # use the forward pass's drop-path masks.
    first = not runs
    runs.append(None)
    packed = tf.nest.pack_sequence_as(inputs, list(flat))
    if first:
      with drop_path.recorded_masks(masks):
        outputs = fn(packed)
    else:
      with normalization.moving_average_updates_off(), drop_path.replayed_masks(masks):
        outputs = fn(packed)
    if first:
      structure.append(outputs)
    return tf.nest.flatten(outputs)

  flat_outputs = tf.recompute_grad(flat_fn)(*flat_inputs)
  return tf.nest.pack_sequence_as(structure[0], list(flat_outputs))
