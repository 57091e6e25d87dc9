"""Our checkpoint layout: what a checkpoint of a model holds and how it is read back.

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

A converted DeepLab2 checkpoint (deeplab2_conversion.py) has the model items only. Where the
checkpoints of a run are written, and resuming after a kill, is the trainer's
(trainer/checkpoints.py).
"""

import collections.abc
import tempfile
from typing import Optional

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

LOSS_SCALE_ITEM = 'loss_scale'
# Items added after checkpoints were first written: a checkpoint without them still restores.
OPTIONAL_ITEMS = (LOSS_SCALE_ITEM,)
# Our keys of the class-dependent last layers (their shape follows the class count): DeepLab2's
# `semantic_last_layer` and `transformer_class_head`.
SEMANTIC_LAST_LAYER = 'semantic_head/final_conv.'
INSTANCE_LAST_LAYER = 'predictor/transformer_class_head.'
_OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'


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


def checkpoint_variables(path: str):
  """{tracked path: checkpoint key} of every variable in the checkpoint's object graph."""
  reader = tf.train.load_checkpoint(path)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
  found = {}
  stack = [(0, '')]
  seen = set()
  while stack:
    node_id, prefix = stack.pop()
    if node_id in seen:
      continue
    seen.add(node_id)
    node = graph.nodes[node_id]
    for attribute in node.attributes:
      if attribute.name == 'VARIABLE_VALUE':
        found[prefix.rstrip('/')] = attribute.checkpoint_key
    for child in node.children:
      stack.append((child.node_id, f'{prefix}{child.local_name}/'))
  return reader, found


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
    try:
      reader, tracked = checkpoint_variables(path)
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
