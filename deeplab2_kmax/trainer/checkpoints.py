"""Checkpoints of a run: what is saved, where, and resuming after a kill.

The checkpoint holds the global step, each model component under DeepLab2's item names
(`encoder`, `pixel_decoder`, `transformer_decoder`, `predictor`, ...) and the optimizer(s)
(`optimizer`, plus `backbone_optimizer` with a backbone learning-rate multiplier). Each item
is a dict of its variables keyed by their Keras path below the item, '/' written '.'
(`encoder/stage2.block1.conv1_bn_act.conv.kernel`): Keras 3 keeps sub-layers in its own list
wrappers, which tf.train.Checkpoint's object graph does not follow, so handing it the layers
would silently save only the variables outside lists. Optimizer variables are keyed by their
position (see make_checkpoint). Under mixed_float16 the item `loss_scale` holds the dynamic
loss scale (`scale`, `good_steps`); a checkpoint written before it was saved still restores,
the scale then starting afresh (restore returns the absent OPTIONAL_ITEMS).
tf.train.CheckpointManager writes `ckpt-<step>.{index,data-*}` and then, atomically, the
`checkpoint` state file; a kill at any moment therefore leaves the previous complete
checkpoint as the latest one. TensorFlow writes a checkpoint's shards into `ckpt-<step>_temp/`
first and merges them into the final files; a kill during that write leaves the folder behind,
and remove_unfinished_writes deletes such folders when the next run starts.

A checkpoint is numbered by the global step it holds (`ckpt-4` holds step 4).
"""

import collections.abc
import os
import re
import tempfile
from typing import Callable, Optional

from absl import logging
import tensorflow as tf

from deeplab2_kmax.model_zoo import download
from deeplab2_kmax.model_zoo import registry
from deeplab2_kmax.trainer import loss_scale as loss_scale_lib
from deeplab2_kmax.trainer import strategy as strategy_lib

CHECKPOINT_PREFIX = 'ckpt'
LOSS_SCALE_ITEM = 'loss_scale'
# Items added after checkpoints were first written: a checkpoint without them still restores.
OPTIONAL_ITEMS = (LOSS_SCALE_ITEM,)


def variables_by_path(variables, strip_components: int = 0) -> dict:
  """{path below the first `strip_components` path components, '/' -> '.': variable}."""
  result = {}
  for variable in variables:
    key = '.'.join(variable.path.split('/')[strip_components:])
    if key in result:
      raise ValueError(f'two variables share the checkpoint key "{key}" ({variable.path}); '
                       'give the layers distinct names.')
    result[key] = variable
  return result


def model_items(model) -> dict:
  """{component name: {variable path: variable}}: the model's part of our checkpoint layout."""
  # Paths are '<model name>/<component>/...': key by what follows the component.
  return {name: variables_by_path(component.weights, strip_components=2)
          for name, component in model.components().items()}


def restore_model_weights(model, path: str) -> None:
  """Restores the model's variables from a checkpoint of our layout, whatever else it holds:
  a runner checkpoint (step, optimizer slots) or a converted one (model_zoo convert, which has
  no step or save counter). Every model variable must be found.

  Raises:
    CheckpointMismatchError: naming the checkpoint, when a variable is missing or has another
      shape.
  """
  mismatch = CheckpointMismatchError.compare(
      model_items(model), path, 'use the config it was trained (or converted) with.')
  if mismatch:
    raise mismatch
  # read(), unlike restore(), neither needs nor creates the save counter.
  try:
    status = tf.train.Checkpoint(**model_items(model)).read(path).expect_partial()
    status.assert_existing_objects_matched()
  except (ValueError, AssertionError) as error:
    detail = str(error).splitlines()[0][:300]
    raise CheckpointMismatchError(
        f'checkpoint {path} does not fit the configured model ({detail}); use the config it was '
        'trained (or converted) with.') from None


def make_checkpoint(model, optimizer_groups, global_step: tf.Variable,
                    loss_scale=None) -> tf.train.Checkpoint:
  """The training checkpoint; `loss_scale`: the run's DynamicLossScale (mixed_float16)."""
  items = model_items(model)
  items['global_step'] = global_step
  for group in optimizer_groups:
    name = 'optimizer' if group.name == 'main' else f'{group.name}_optimizer'
    # Optimizer variable names embed the (uniquified) optimizer and model names, which differ
    # between two runs in one process; their order (step counter, then slots in variable
    # order) does not.
    items[name] = {f'{index:05d}': variable
                   for index, variable in enumerate(group.optimizer.variables)}
  if loss_scale is not None:
    items[LOSS_SCALE_ITEM] = loss_scale.checkpoint_items()
  return tf.train.Checkpoint(**items)


def _absent_optional_items(checkpoint: tf.train.Checkpoint, path: str) -> dict:
  """{name: object} of the OPTIONAL_ITEMS that `checkpoint` has and the file at `path` lacks."""
  children = tf.train.TrackableView(checkpoint).children(checkpoint)
  wanted = {name: children[name] for name in OPTIONAL_ITEMS if name in children}
  if not wanted:
    return {}
  # Saved variables are keyed '<item>/<key>/.ATTRIBUTES/VARIABLE_VALUE'.
  saved_items = {name.split('/')[0] for name, _ in tf.train.list_variables(path)}
  return {name: child for name, child in wanted.items() if name not in saved_items}


def named_variables(checkpoint: tf.train.Checkpoint) -> dict:
  """{'<item>/<key>': variable} of every variable `checkpoint` saves (but its save counter), in
  item order: the model components, global_step, the optimizer(s), the loss scale."""
  result = {}
  children = tf.train.TrackableView(checkpoint).children(checkpoint)
  for name, child in children.items():
    if name == 'save_counter':
      continue
    if isinstance(child, collections.abc.Mapping):
      for key, variable in child.items():
        result[f'{name}/{key}'] = variable
    else:
      result[name] = child
  return result


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


class CheckpointMismatchError(RuntimeError):
  """A checkpoint in the model directory does not fit the configured model."""

  @classmethod
  def compare(cls, items: dict, path: str, fix: str) -> Optional['CheckpointMismatchError']:
    """The error for a checkpoint of our layout that lacks a variable of `items` ({component:
    {key: variable}}, model_items) or holds one of another shape, else None (also when the
    file cannot be read: the restore that follows says why).

    Its message counts the variables that match, are missing, are unexpected (in the file's
    components but not the model's: not an error by themselves) and have another shape, lists
    the first few and names a text file with all of them. Comparing before restoring spares
    TensorFlow's warning per unrestored value (thousands for another architecture).
    """
    # Imported here: initial_checkpoint imports this module.
    from deeplab2_kmax.trainer import initial_checkpoint  # pylint: disable=g-import-not-at-top
    try:
      reader, tracked = initial_checkpoint.checkpoint_variables(path)
      shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError):
      return None
    saved = {name: tuple(shapes[key]) for name, key in tracked.items()
             if name.split('/', 1)[0] in items}
    wanted = {f'{component}/{key}': tuple(variable.shape)
              for component, variables in items.items() for key, variable in variables.items()}
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    mismatched = sorted(name for name in set(wanted) & set(saved) if wanted[name] != saved[name])
    if not missing and not mismatched:
      return None
    rows = ([('shape', f'{name}: {list(saved[name])} in the checkpoint, {list(wanted[name])} in '
                       'the model') for name in mismatched]
            + [('missing', name) for name in missing]
            + [('unexpected', name) for name in unexpected])
    counts = (f'{len(wanted) - len(missing) - len(mismatched)} model variables match, '
              f'{len(missing)} are missing from it, {len(mismatched)} have another shape, '
              f'{len(unexpected)} of its variables are not in the model')
    return cls(format_variable_report(f'checkpoint {path} does not fit the configured model: '
                                      f'{counts}; {fix}', rows, listing_name='checkpoint_mismatch'))


def format_variable_report(headline: str, rows, listing_name: Optional[str] = None,
                           limit: int = 5, listing_path: Optional[str] = None) -> str:
  """`headline`, then the first `limit` (kind, variable) rows of each kind, then the path of a
  text file holding every row: `listing_path`, or, when rows are left out and `listing_name`
  is given, a new file in the temp folder named after it."""
  lines = [headline]
  by_kind = {}
  for kind, text in rows:
    by_kind.setdefault(kind, []).append(text)
  width = max((len(kind) for kind in by_kind), default=0)
  for kind, texts in by_kind.items():
    lines += [f'  {kind:<{width}}  {text}' for text in texts[:limit]]
    if len(texts) > limit:
      lines.append(f'  {"":<{width}}  ... and {len(texts) - limit} more')
  left_out = any(len(texts) > limit for texts in by_kind.values())
  if listing_path is None and left_out and listing_name:
    with tempfile.NamedTemporaryFile('w', prefix=f'deeplab2_kmax_{listing_name}_',
                                     suffix='.txt', delete=False) as f:
      listing_path = f.name
  if listing_path is not None:
    with open(listing_path, 'w', encoding='utf-8') as f:
      f.write(headline + '\n' + ''.join(f'{kind:<{width}}  {text}\n' for kind, text in rows))
    lines.append(f'  (every variable: {listing_path})')
  return '\n'.join(lines)


def restore(checkpoint: tf.train.Checkpoint, path: str, partial: bool = False) -> list[str]:
  """Restores `path` into `checkpoint`; every object of `checkpoint` must be found in it, but
  for OPTIONAL_ITEMS, whose variables keep their values when the file lacks them.

  Args:
    partial: allow values in the file that `checkpoint` lacks (e.g. optimizer slots at eval).

  Returns:
    The names of the OPTIONAL_ITEMS the file lacks.

  Raises:
    CheckpointMismatchError: naming the checkpoint and the fix, when a variable is missing or
      has another shape (the config changed since the checkpoint was written).
  """
  absent = _absent_optional_items(checkpoint, path)
  if absent:
    children = tf.train.TrackableView(checkpoint).children(checkpoint)
    # The same objects less the absent items (save_counter is the Checkpoint's own).
    checkpoint = tf.train.Checkpoint(**{name: child for name, child in children.items()
                                        if name not in absent and name != 'save_counter'})
  status = None
  try:
    status = checkpoint.restore(path)
    if partial:
      status = status.expect_partial()
    status.assert_existing_objects_matched()
  except (ValueError, AssertionError) as error:
    if status is not None:
      status.expect_partial()   # No TensorFlow warning per value left unrestored.
    fix = ('the config changed since it was written: use the config it was trained with, or a '
           'new --model_dir.')
    children = tf.train.TrackableView(checkpoint).children(checkpoint)
    # The model's components and the optimizers: dicts of variables (make_checkpoint).
    items = {name: dict(child) for name, child in children.items()
             if isinstance(child, collections.abc.Mapping) and name not in OPTIONAL_ITEMS}
    mismatch = CheckpointMismatchError.compare(items, path, fix) if items else None
    if mismatch:
      raise mismatch from None
    detail = str(error).splitlines()[0][:300]
    raise CheckpointMismatchError(
        f'checkpoint {path} does not fit the configured model ({detail}); {fix}') from None
  return sorted(absent)


def restore_latest(manager: tf.train.CheckpointManager,
                   log_fn: Callable[[str], None] = logging.info) -> Optional[str]:
  """Restores the newest checkpoint (model, optimizer state, step, loss scale); returns its
  path or None. Says through `log_fn` when the file has no loss scale for a loss-scaled run."""
  path = manager.latest_checkpoint
  if path:
    absent = restore(manager.checkpoint, path)
    if LOSS_SCALE_ITEM in absent:
      log_fn(f'[train] {path} has no dynamic loss scale (written before the scale was '
             f'checkpointed); the mixed_float16 loss scale starts afresh at '
             f'{loss_scale_lib.INITIAL_LOSS_SCALE:g}.')
  return path


class CheckpointPathError(CheckpointMismatchError):
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


def restore_model(model, checkpoint_path: str) -> str:
  """Restores every model variable from checkpoint_path (resolve_checkpoint's forms); returns
  the checkpoint read, for messages.

  A checkpoint of our layout (a runner checkpoint, or `model_zoo convert`'s output) is read as
  it is; one in DeepLab2's layout (a model-zoo download) is converted in memory
  (model_zoo/convert.py), and every variable of the model must receive a value.

  Raises:
    CheckpointPathError: checkpoint_path names no checkpoint.
    CheckpointMismatchError: a variable is missing or has another shape.
    convert.ConversionError (a ValueError): a DeepLab2 checkpoint that does not fit the model.
  """
  # Imported here: model_zoo.convert imports this module (issue #20 moves both into checkpoint/).
  from deeplab2_kmax.model_zoo import convert  # pylint: disable=g-import-not-at-top
  path = resolve_checkpoint(checkpoint_path)
  keys = [name for name, _ in tf.train.list_variables(path)]
  if convert.is_deeplab2_layout(keys):
    report = convert.from_deeplab2(tf.train.load_checkpoint(path), model, source=path)
    report.check()
    convert.assign(model, report.values)
    return f'{path} (DeepLab2 layout, converted)'
  # Optimizer slots and the step in the file are not needed; every model variable must be found.
  restore_model_weights(model, path)
  return path
