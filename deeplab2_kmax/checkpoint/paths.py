"""What a checkpoint path names: a prefix, a folder of checkpoints or a model-zoo name.

    path = resolve_checkpoint(flag_value, '--checkpoint_path')   # a ckpt-N prefix

Every flag and config field that asks for a checkpoint (export, predict and `train
--mode=eval`'s --checkpoint_path, model_options.initial_checkpoint, pretrained_weights,
`model_zoo convert --from`) goes through resolve_checkpoint, so they accept the same forms and
fail with the same messages.
"""

import os

import tensorflow as tf

from deeplab2_kmax.checkpoint import layout
from deeplab2_kmax.model_zoo import download
from deeplab2_kmax.model_zoo import registry


class CheckpointPathError(layout.CheckpointMismatchError):
  """A checkpoint path (flag or config field) names no checkpoint; str(error) names it and
  what would be right."""


_CHECKPOINT_FORMS = ('a checkpoint prefix such as runs/x/ckpt-1000 (the files ckpt-1000.index '
                     'and ckpt-1000.data-*), a folder of checkpoints (the newest is used), or a '
                     'model-zoo name (`python -m deeplab2_kmax.model_zoo list`)')


def resolve_checkpoint(checkpoint_path: str, flag: str = '--checkpoint_path',
                       allow_backbones: bool = False) -> str:
  """The checkpoint prefix that checkpoint_path names, checked before any model is built.

  Args:
    checkpoint_path: a ckpt-N prefix; a folder (a run directory: its newest checkpoint; a
      folder holding one checkpoint, such as a `model_zoo convert` output or an extracted
      archive); or a model-zoo name (downloaded into the cache unless it is there already,
      model_zoo/download.py).
    flag: the command-line flag or config field it came from, for messages.
    allow_backbones: whether an ImageNet-backbone zoo name is accepted (an initial
      checkpoint); a whole-model restore refuses it, naming the config it starts.

  Raises:
    CheckpointPathError: naming the path and the accepted forms.
  """
  path = checkpoint_path
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest
    try:
      return download.find_checkpoint_prefix(path)
    except download.DownloadError:
      raise CheckpointPathError(f'no checkpoint in {path} ({flag}); train first, or give '
                                f'{_CHECKPOINT_FORMS}.') from None
  if tf.io.gfile.exists(path + '.index'):
    return path
  if tf.io.gfile.exists(path):
    for suffix in ('.index', '.data-'):
      if suffix in os.path.basename(path):
        prefix = path[:path.rindex(suffix)]
        raise CheckpointPathError(f'{flag} {path} is one file of a checkpoint; pass its '
                                  f'prefix {prefix}.')
    raise CheckpointPathError(f'{flag} {path} is a file, not a checkpoint; give '
                              f'{_CHECKPOINT_FORMS}.')
  entries = registry.load_registry()
  if path in entries:
    if entries[path].kind == registry.KIND_BACKBONE and not allow_backbones:
      raise CheckpointPathError(
          f'{flag} "{path}" is an ImageNet backbone ({entries[path].backbone}), not a '
          'segmentation model; give a kmax_* or max_deeplab_* name, or a checkpoint trained '
          f'from it (its config is {entries[path].config}).')
    try:
      return download.fetch_checkpoint(path, entries)
    except (download.DownloadError, download.UnsafeArchiveError) as error:
      raise CheckpointPathError(f'{flag} "{path}" is a model-zoo name but cannot be fetched: '
                                f'{error}') from None
  close = [name for name in entries if '/' not in path and (path in name or name in path)]
  hint = f' (model-zoo names close to it: {", ".join(close[:5])})' if close else ''
  raise CheckpointPathError(f'{flag} {path} does not exist{hint}; give {_CHECKPOINT_FORMS}.')
