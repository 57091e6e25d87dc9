"""Restoring every variable of a model from a checkpoint of either layout (export, predict,
evaluation of a named checkpoint).

    restore_model(model, '--checkpoint_path value')   # our layout, or DeepLab2's converted
"""

import tensorflow as tf

from deeplab2_kmax.checkpoint import deeplab2_conversion
from deeplab2_kmax.checkpoint import layout
from deeplab2_kmax.checkpoint import paths


def restore_model(model, checkpoint_path: str) -> str:
  """Restores every model variable from checkpoint_path (any form paths.resolve_checkpoint
  takes); returns the checkpoint read, for messages.

  A checkpoint of our layout (a runner checkpoint, or `model_zoo convert`'s output) is read as
  it is; one in DeepLab2's layout (a model-zoo download) is converted in memory
  (deeplab2_conversion.py), and every variable of the model must receive a value.

  Raises:
    paths.CheckpointPathError: checkpoint_path names no checkpoint.
    layout.CheckpointMismatchError: a variable is missing or has another shape.
    deeplab2_conversion.ConversionError (a ValueError): a DeepLab2 checkpoint that does not
      fit the model.
  """
  path = paths.resolve_checkpoint(checkpoint_path)
  keys = [name for name, _ in tf.train.list_variables(path)]
  if deeplab2_conversion.is_deeplab2_layout(keys):
    report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(path), model,
                                               source=path)
    report.check()
    deeplab2_conversion.assign(model, report.values)
    return f'{path} (DeepLab2 layout, converted)'
  # Optimizer slots and the step in the file are not needed; every model variable must be found.
  layout.restore_model_weights(model, path)
  return path
