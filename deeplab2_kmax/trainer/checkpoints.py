"""The checkpoints of a run: where they are written, and resuming after a kill.

What a checkpoint holds is checkpoint/layout.py (make_checkpoint, restore); this module is the
trainer's use of tf.train.CheckpointManager on it.

tf.train.CheckpointManager writes `ckpt-<step>.{index,data-*}` and then, atomically, the
`checkpoint` state file; a kill at any moment therefore leaves the previous complete
checkpoint as the latest one. TensorFlow writes a checkpoint's shards into `ckpt-<step>_temp/`
first and merges them into the final files; a kill during that write leaves the folder behind,
and remove_unfinished_writes deletes such folders when the next run starts.

A checkpoint is numbered by the global step it holds (`ckpt-4` holds step 4).
"""

import os
import re
from typing import Callable, Optional

from absl import logging
import tensorflow as tf

from deeplab2_kmax.checkpoint import layout
from deeplab2_kmax.trainer import loss_scale as loss_scale_lib
from deeplab2_kmax.trainer import strategy as strategy_lib

CHECKPOINT_PREFIX = 'ckpt'


def non_finite_variables(variables: dict) -> list[str]:
  """Names (keys of `variables`) of the floating-point variables holding a NaN or an Inf."""
  found = []
  for name, variable in variables.items():
    # Keras variables name their dtype as a string.
    if tf.as_dtype(variable.dtype).is_floating and not bool(
        tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(variable)))):
      found.append(name)
  return found


# TensorFlow's temporary folder of a checkpoint being written (functional_saver.py).
_UNFINISHED_WRITE = re.compile(rf'^{CHECKPOINT_PREFIX}-\d+_temp$')


def remove_unfinished_writes(directory: str) -> list[str]:
  """Deletes the `ckpt-<N>_temp` folders in `directory` (left by a process killed while it
  wrote a checkpoint) and returns their names. Call it only where no other process writes
  checkpoints into `directory` (the trainer, before its first save)."""
  if not tf.io.gfile.isdir(directory):
    return []
  removed = []
  for name in sorted(tf.io.gfile.listdir(directory)):
    name = name.rstrip('/')
    if _UNFINISHED_WRITE.match(name):
      tf.io.gfile.rmtree(os.path.join(directory, name))
      removed.append(name)
  return removed


def make_manager(checkpoint: tf.train.Checkpoint, model_dir: str, global_step: tf.Variable,
                 trainer_options, strategy: Optional[tf.distribute.Strategy] = None,
                 init_fn=None) -> tf.train.CheckpointManager:
  """A manager in model_dir (a per-worker scratch folder on non-chief workers, which must
  still write so that the collective save completes)."""
  directory = model_dir
  if strategy is not None and not strategy_lib.is_chief(strategy):
    directory = os.path.join(model_dir, f'worker_{strategy.cluster_resolver.task_id}_tmp')
  return tf.train.CheckpointManager(
      checkpoint, directory, max_to_keep=trainer_options.num_checkpoints_to_keep,
      step_counter=global_step, checkpoint_interval=trainer_options.save_checkpoints_steps,
      checkpoint_name=CHECKPOINT_PREFIX, init_fn=init_fn)


def restore_latest(manager: tf.train.CheckpointManager,
                   log_fn: Callable[[str], None] = logging.info) -> Optional[str]:
  """Restores the newest checkpoint (model, optimizer state, step, loss scale); returns its
  path or None. Says through `log_fn` when the file has no loss scale for a loss-scaled run."""
  path = manager.latest_checkpoint
  if path:
    absent = layout.restore(manager.checkpoint, path)
    if layout.LOSS_SCALE_ITEM in absent:
      log_fn(f'[train] {path} has no dynamic loss scale (written before the scale was '
             f'checkpointed); the mixed_float16 loss scale starts afresh at '
             f'{loss_scale_lib.INITIAL_LOSS_SCALE:g}.')
  return path
