"""Conversion between DeepLab2 kMaX checkpoints and ours.

    report = from_deeplab2(tf.train.load_checkpoint(path), model)   # values keyed our way
    report.check()                                                   # raises unless complete
    write_our_checkpoint(report.values, '/tmp/kmax/ckpt')

DeepLab2 keys (`encoder/_stage2/_block1/_conv1_bn_act/_batch_norm/beta/.ATTRIBUTES/
VARIABLE_VALUE`) map to our variables through deeplab2_key_map.py. Our checkpoint is the
layout of layout.py for the model: one item per model component, each a dict of its variables
keyed by their path below the component with '/' written '.', so initial_checkpoint.py
restores it like a checkpoint of our own run.

ImageNet backbone checkpoints: DeepLab2's ResNet / Axial-ResNet ones hold an `encoder` item;
ConvNeXt weights are `save_weights` files of the encoder alone (keys start at the encoder, e.g.
`downsample_layers/0/...`). Both map into our encoder; classification-only variables are
reported as unused.
"""

import dataclasses
from typing import Iterable, Optional

import numpy as np
import tensorflow as tf

from deeplab2_kmax.checkpoint import deeplab2_key_map
from deeplab2_kmax.checkpoint import layout

# DeepLab2's top-level checkpoint items (kmax_deeplab.py checkpoint_items).
DEEPLAB2_ITEMS = ('encoder', 'pixel_decoder', 'transformer_decoder', 'semantic_decoder',
                  'pixel_space_head', 'transformer_mask_head', 'transformer_class_head',
                  'pixel_space_feature_batch_norm', 'pixel_space_mask_batch_norm',
                  'semantic_head_without_last_layer', 'semantic_last_layer')
# The class-dependent last layers (their shape follows the class count): the main semantic and
# class heads, and the auxiliary class head inside every transformer-decoder layer.
_AUXILIARY_CLASS_HEAD = '.transformer_class_head.'


class ConversionError(ValueError):
  """A checkpoint does not convert completely; str(error) lists what is wrong."""


def is_class_dependent(our_key: str) -> bool:
  """Whether our checkpoint key 'component/a.b.c' belongs to a class-dependent last layer."""
  return (our_key.startswith((layout.SEMANTIC_LAST_LAYER, layout.INSTANCE_LAST_LAYER))
          or _AUXILIARY_CLASS_HEAD in our_key)


@dataclasses.dataclass
class ConversionReport:
  """What a conversion assigned and what it could not.

  values: {our checkpoint key 'component/a.b.c': np.ndarray in our layout}.
  unmapped: our keys that received no value.
  unused: source keys that map to no variable of the model.
  mismatched: (source key, source shape, our key, our shape) whose shapes do not fit.
  allowed: our keys the caller allowed to stay unassigned (a subset of unmapped).
  """
  values: dict = dataclasses.field(default_factory=dict)
  unmapped: list = dataclasses.field(default_factory=list)
  unused: list = dataclasses.field(default_factory=list)
  mismatched: list = dataclasses.field(default_factory=list)
  allowed: list = dataclasses.field(default_factory=list)
  source: str = ''

  @property
  def problems(self) -> list:
    return [key for key in self.unmapped if key not in set(self.allowed)]

  def counts(self) -> str:
    return (f'assigned {len(self.values)} variables, {len(self.unmapped)} unassigned '
            f'({len(self.allowed)} allowed), {len(self.unused)} source variables unused, '
            f'{len(self.mismatched)} shape mismatches')

  def _rows(self) -> list:
    """(kind, text) of every variable that did not simply map: problems first."""
    mismatched = {ours for _, _, ours, _ in self.mismatched}
    return ([('shape', f'{key} {list(shape)} -> {ours} {list(our_shape)}')
             for key, shape, ours, our_shape in self.mismatched]
            + [('unmapped', key) for key in self.problems if key not in mismatched]
            + [('unused', key) for key in self.unused]
            + [('allowed', key) for key in self.allowed])

  def summary(self, limit: int = 5, listing_path: Optional[str] = None) -> str:
    """The counts, the first `limit` variables of each kind and, given `listing_path`, a text
    file there listing them all."""
    return layout.format_variable_report(f'[convert] {self.source}: {self.counts()}',
                                         self._rows(), limit=limit, listing_path=listing_path)

  def check(self) -> None:
    """Raises ConversionError unless every model variable not allowed got a value; its
    message has the counts, the first few variables of each kind and a temp file listing
    them all."""
    if self.problems:
      raise ConversionError(layout.format_variable_report(
          f'{self.source}: {len(self.problems)} model variables get no value ({self.counts()}). '
          'Is the config the one the checkpoint was trained with? When fine-tuning to other '
          'classes allow the class-dependent last layers (--allow_class_mismatch).',
          self._rows(), listing_name='conversion'))


def our_variable_keys(model) -> dict:
  """{variable path relative to the model: our checkpoint key 'component/a.b.c'}."""
  keys = {}
  by_id = {}
  for name, variables in layout.model_items(model).items():
    for key, variable in variables.items():
      by_id[id(variable)] = f'{name}/{key}'
  for path, variable in deeplab2_key_map.model_variable_paths(model).items():
    keys[path] = by_id[id(variable)]
  return keys


def is_convnext(model) -> bool:
  return any(path.startswith('encoder/convnext_block_')
             for path in deeplab2_key_map.model_variable_paths(model))


def _variable_keys(shape_map: dict) -> dict:
  """{DeepLab2 key (with an `encoder/` item for encoder-only files): source key}."""
  # Optimizer slots of a training checkpoint (`<variable>/.OPTIMIZER_SLOT/optimizer/m/...`)
  # are not model variables.
  keys = [key for key in shape_map if key.endswith(deeplab2_key_map.CHECKPOINT_SUFFIX)
          and '/.OPTIMIZER_SLOT/' not in key]
  if keys and not any(key.split('/', 1)[0] in DEEPLAB2_ITEMS for key in keys):
    return {f'encoder/{key}': key for key in keys}  # An encoder's own save_weights file.
  return {key: key for key in keys}


def from_deeplab2(reader, model, allow_class_mismatch: bool = False,
                  allowed: Iterable[str] = (), encoder_only: bool = False,
                  source: str = '') -> ConversionReport:
  """Values for the model's variables from a DeepLab2 checkpoint (see the module docstring).

  Args:
    reader: tf.train.load_checkpoint(...) result (or anything with get_variable_to_shape_map
      and get_tensor).
    model: a built KMaXDeepLab whose architecture matches the checkpoint.
    allow_class_mismatch: the class-dependent last layers may stay unassigned.
    allowed: further our-key prefixes that may stay unassigned.
    encoder_only: only the encoder's pretrainable variables are expected (ImageNet
      backbones); the rest of the model (and MaX-DeepLab's transformer, extra-decoder and
      memory variables) is allowed to stay unassigned.
  """
  our_keys = our_variable_keys(model)
  variables = deeplab2_key_map.model_variable_paths(model)
  report = ConversionReport(source=source or 'checkpoint')
  assigned = set()
  shapes = reader.get_variable_to_shape_map()
  for key, source_key in sorted(_variable_keys(shapes).items()):
    path = deeplab2_key_map.upstream_to_ours(key)
    if path is None or path not in variables:
      report.unused.append(source_key)
      continue
    target_shape = tuple(variables[path].shape)
    shape = tuple(shapes[source_key])
    if not deeplab2_key_map.layouts_compatible(shape, target_shape):
      report.mismatched.append((source_key, shape, our_keys[path], target_shape))
      continue
    value = deeplab2_key_map.to_our_layout(reader.get_tensor(source_key), target_shape)
    report.values[our_keys[path]] = value.astype(variables[path].dtype)
    assigned.add(path)
  allowed = tuple(allowed)
  # An ImageNet backbone fills only the pretrainable part of the encoder: MaX-DeepLab's
  # transformer, extra-decoder and memory variables train from scratch.
  in_backbone = getattr(model.encoder, 'is_backbone_variable', lambda variable: True)
  for path in sorted(set(variables) - assigned):
    key = our_keys[path]
    report.unmapped.append(key)
    if ((allow_class_mismatch and is_class_dependent(key)) or key.startswith(allowed)
        or (encoder_only and not (key.startswith('encoder/') and in_backbone(variables[path])))):
      report.allowed.append(key)
  return report


def write_our_checkpoint(values: dict, output: str) -> str:
  """Writes {our key 'component/a.b.c': value} as our checkpoint at prefix `output`."""
  items = {}
  for key, value in values.items():
    component, _, rest = key.partition('/')
    items.setdefault(component, {})[rest] = tf.Variable(value, trainable=False)
  return tf.train.Checkpoint(**items).write(output)


def read_our_checkpoint(path: str) -> dict:
  """{our key 'component/a.b.c': value} of a checkpoint in our layout (model variables only)."""
  reader, variables = layout.checkpoint_variables(path)
  return {tracked: reader.get_tensor(key) for tracked, key in variables.items()}


def write_deeplab2_checkpoint(values: dict, output: str) -> str:
  """Writes {DeepLab2 key: value} as an object-graph checkpoint with exactly those keys.

  Nested dicts are tracked by their keys, so `encoder/_stem/_conv/kernel/.ATTRIBUTES/
  VARIABLE_VALUE` comes out of {'encoder': {'_stem': {'_conv': {'kernel': variable}}}}.
  """
  root = {}
  for key, value in values.items():
    if not key.endswith(deeplab2_key_map.CHECKPOINT_SUFFIX):
      raise ValueError(f'"{key}" is not a variable key (no {deeplab2_key_map.CHECKPOINT_SUFFIX})')
    parts = key[:-len(deeplab2_key_map.CHECKPOINT_SUFFIX)].split('/')
    node = root
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = tf.Variable(value, trainable=False)
  return tf.train.Checkpoint(**root).write(output)


def to_deeplab2(model, values: Optional[dict] = None) -> dict:
  """{DeepLab2 key: value in DeepLab2's layout} of the model's variables (or of `values`, a
  {our key: value} dict for this model's architecture)."""
  convnext = is_convnext(model)
  our_keys = our_variable_keys(model)
  variables = deeplab2_key_map.model_variable_paths(model)
  result = {}
  for path, variable in variables.items():
    value = variable.numpy() if values is None else values[our_keys[path]]
    key = deeplab2_key_map.ours_to_upstream(path, convnext_encoder=convnext)
    result[key] = deeplab2_key_map.to_deeplab2_layout(path, value, convnext_encoder=convnext)
  return result


def assign(model, values: dict) -> int:
  """Assigns {our key: value} to the model's variables; returns how many were assigned."""
  our_keys = our_variable_keys(model)
  count = 0
  for path, variable in deeplab2_key_map.model_variable_paths(model).items():
    key = our_keys[path]
    if key in values:
      variable.assign(values[key])
      count += 1
  return count


def is_deeplab2_layout(keys: Iterable[str]) -> bool:
  """Whether checkpoint keys are DeepLab2's (nested attribute paths) rather than ours.

  Ours are `<component>/<path with dots>/.ATTRIBUTES/VARIABLE_VALUE` (plus the step and
  optimizer items), two components at most; DeepLab2's nest deeper for almost every variable.
  """
  suffix = deeplab2_key_map.CHECKPOINT_SUFFIX
  return any(key.endswith(suffix) and key[:-len(suffix)].count('/') >= 2 for key in keys)
