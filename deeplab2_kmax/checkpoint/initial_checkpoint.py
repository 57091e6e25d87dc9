"""Partial restore of `model_options.initial_checkpoint` (fine-tuning, backbone init).

    table = restore_initial_checkpoint(model, path, restore_semantic_last_layer=False,
                                       restore_instance_last_layer=False)

Reads a checkpoint written by the runner (items keyed as in layout.py:
`encoder/stage2.block1.conv1_bn_act.conv.kernel`, `predictor/transformer_class_head.kernel`)
and copies every variable whose shape matches into the model's variable of the same key.
Skipped are: everything outside the model components (optimizer slots, step),
the class-dependent last layers when their restore flag is false (DeepLab2's
`semantic_last_layer` = `semantic_head/final_conv` and `transformer_class_head`), and variables
whose shape differs (e.g. a different class count). Returns, and logs, a table of what was
restored and skipped, with reasons.

`path` may also be a model-zoo name (downloaded into the cache, see model_zoo/download.py) or
a DeepLab2 checkpoint: DeepLab2-layout keys are converted to ours first
(deeplab2_conversion.py, into a temporary folder), then restored by the same rules.
"""

import os
import tempfile
from typing import Callable, Optional

import tensorflow as tf

from deeplab2_kmax.checkpoint import deeplab2_conversion
from deeplab2_kmax.checkpoint import layout
from deeplab2_kmax.checkpoint import paths


class InitialCheckpointError(ValueError):
  """model_options.initial_checkpoint cannot be used; str(error) names it and the fix."""


def _live(items: dict, path: str):
  component, _, key = path.partition('/')
  return items.get(component, {}).get(key)


def restore_initial_checkpoint(model, path: str, restore_semantic_last_layer: bool = True,
                               restore_instance_last_layer: bool = True,
                               encoder_only: bool = False,
                               log_fn: Optional[Callable[[str], None]] = print,
                               field: str = 'model_options.initial_checkpoint') -> dict:
  """Copies matching variables from `path` into `model` (see the module docstring); `field`
  (the config field `path` came from) names it in errors.

  Returns:
    {'restored': [paths], 'skipped': {path: reason}, 'missing': [model paths not in the file]}.
  """
  path = resolve_checkpoint_path(path, field)
  try:
    keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError, RuntimeError) as error:  # OpError: a bad .index
    raise _unreadable(path, error, field) from None
  if deeplab2_conversion.is_deeplab2_layout(keys):
    with tempfile.TemporaryDirectory(prefix='deeplab2_converted_') as scratch:
      converted = _convert_deeplab2(model, path, os.path.join(scratch, 'ckpt'), encoder_only,
                                    log_fn)
      table = _restore_ours(model, converted, restore_semantic_last_layer,
                            restore_instance_last_layer, encoder_only, log_fn=None)
    table['source'] = path
    if log_fn:
      log_fn(format_table(f'{path} (DeepLab2 layout, converted)', table))
    return table
  return _restore_ours(model, path, restore_semantic_last_layer, restore_instance_last_layer,
                       encoder_only, log_fn)


def _unreadable(path: str, error: Exception,
                field: str = 'model_options.initial_checkpoint') -> InitialCheckpointError:
  return InitialCheckpointError(f'{field} "{path}" cannot be read: '
                                f'{str(error).splitlines()[0]}')


def resolve_checkpoint_path(path: str, field: str = 'model_options.initial_checkpoint') -> str:
  """A checkpoint prefix for a checkpoint to start from (`field`: the config field or flag
  it came from, for messages): a zoo name (fetched into the cache; ImageNet backbones too), a
  folder (its latest checkpoint) or a prefix (paths.resolve_checkpoint).

  Raises:
    InitialCheckpointError: naming the path and what would be right.
  """
  try:
    return paths.resolve_checkpoint(path, field, allow_backbones=True)
  except paths.CheckpointPathError as error:
    raise InitialCheckpointError(str(error)) from None


def _convert_deeplab2(model, path: str, output: str, encoder_only: bool, log_fn) -> str:
  """Converts a DeepLab2 checkpoint for `model` into our layout at `output` (values of
  mismatched shape are kept so that the restore table names them)."""
  reader = tf.train.load_checkpoint(path)
  report = deeplab2_conversion.from_deeplab2(reader, model, allow_class_mismatch=True,
                                 encoder_only=encoder_only, source=path)
  if log_fn:
    log_fn(report.summary().split('\n', 1)[0])
  values = dict(report.values)
  for key, _, our_key, _ in report.mismatched:
    values[our_key] = reader.get_tensor(key)
  if not values:
    raise InitialCheckpointError(f'model_options.initial_checkpoint "{path}": no variable of '
                                 'this DeepLab2 checkpoint maps onto the model.')
  return deeplab2_conversion.write_our_checkpoint(values, output)


def _restore_ours(model, path: str, restore_semantic_last_layer: bool,
                  restore_instance_last_layer: bool, encoder_only: bool,
                  log_fn: Optional[Callable[[str], None]]) -> dict:
  """restore_initial_checkpoint for a checkpoint prefix in our layout."""
  try:
    reader, variables = layout.checkpoint_variables(path)
  except (tf.errors.OpError, ValueError, RuntimeError) as error:  # OpError: a bad .index
    raise _unreadable(path, error) from None
  components = layout.model_items(model)
  if encoder_only:
    components = {'encoder': components['encoder']}
  skip_prefixes = {}
  if not restore_semantic_last_layer:
    skip_prefixes[layout.SEMANTIC_LAST_LAYER] = (
        'restore_semantic_last_layer_from_initial_checkpoint')
  if not restore_instance_last_layer:
    skip_prefixes[layout.INSTANCE_LAST_LAYER] = (
        'restore_instance_last_layer_from_initial_checkpoint')
  table = {'restored': [], 'skipped': {}, 'missing': []}
  assigned = set()
  for tracked, key in sorted(variables.items()):
    component = tracked.split('/', 1)[0]
    if component not in components:
      table['skipped'][tracked] = 'not a model component being restored'
      continue
    reason = next((flag for prefix, flag in skip_prefixes.items()
                   if tracked.startswith(prefix)), None)
    if reason:
      table['skipped'][tracked] = f'{reason} is false'
      continue
    target = _live(components, tracked)
    if target is None or not hasattr(target, 'assign'):
      table['skipped'][tracked] = 'no such variable in the model'
      continue
    value = reader.get_tensor(key)
    if tuple(value.shape) != tuple(target.shape):
      table['skipped'][tracked] = (f'shape {list(value.shape)} in the checkpoint, '
                                   f'{list(target.shape)} in the model')
      continue
    target.assign(value)
    assigned.add(id(target))
    table['restored'].append(tracked)
  for name, variables in components.items():
    for key, variable in variables.items():
      if id(variable) not in assigned:
        table['missing'].append(f'{name}/{key}')
  if not table['restored']:
    raise InitialCheckpointError(
        f'model_options.initial_checkpoint "{path}" restored no variable: is it a checkpoint '
        f'of this model family? ({len(variables)} variables in it)')
  if log_fn:
    log_fn(format_table(path, table))
  return table


def format_table(path: str, table: dict) -> str:
  """The log of a restore: counts, the first few skipped and missing variables, and a text
  file with every row (a real model has thousands of variables: they do not belong on the
  console)."""
  rows = ([('skipped', f'{p}: {why}') for p, why in table['skipped'].items()
           if why != 'not a model component being restored']
          + [('missing', p) for p in table['missing']]
          + [('restored', p) for p in table['restored']])
  headline = (f'[init] {path}: restored {len(table["restored"])} variables, skipped '
              f'{len(table["skipped"])}, {len(table["missing"])} model variables not restored')
  return layout.format_variable_report(headline, rows, listing_name='initial_checkpoint',
                                       limit=5)
