"""Dataset descriptors: built-in ones and those described inline in an experiment config.

A descriptor holds everything the model, loss, evaluation and visualisation need to know about
a dataset's label space. Built-ins:

| name                  | classes | ignore label | label divisor | things            |
|-----------------------|---------|--------------|---------------|-------------------|
| coco_panoptic         | 134     | 0            | 256           | train ids 1..80   |
| cityscapes_panoptic   | 19      | 255          | 1000          | train ids 11..18  |
| ade20k_panoptic       | 151     | 0            | 1000          | 100 classes       |
| synthetic_panoptic    | 7       | 0            | 256           | train ids 1..3    |
"""

import colorsys
import dataclasses
import re
from typing import Mapping, Sequence

from deeplab2_kmax.data import class_tables
from deeplab2_kmax.protos import dataset_pb2

COCO_PANOPTIC = 'coco_panoptic'
CITYSCAPES_PANOPTIC = 'cityscapes_panoptic'
ADE20K_PANOPTIC = 'ade20k_panoptic'
SYNTHETIC_PANOPTIC = 'synthetic_panoptic'

_HEX_COLOR = re.compile(r'^#([0-9a-fA-F]{6})$')


@dataclasses.dataclass(frozen=True)
class DatasetDescriptor:
  """The label space of a panoptic dataset.

  Attributes:
    name: Short name, e.g. "coco_panoptic".
    class_names: Name of each contiguous train id 0..num_classes-1.
    class_has_instances: Per train id, True for thing classes.
    colors: Per train id, an (r, g, b) display colour.
    ignore_label: Train id of unlabelled pixels (may lie outside [0, num_classes)).
    panoptic_label_divisor: panoptic = semantic * divisor + instance.
    category_ids: Per train id, the dataset's own category id (for official-format output).
    splits_to_sizes: Number of examples per split, where known.
  """
  name: str
  class_names: tuple[str, ...]
  class_has_instances: tuple[bool, ...]
  colors: tuple[tuple[int, int, int], ...]
  ignore_label: int
  panoptic_label_divisor: int
  category_ids: tuple[int, ...]
  splits_to_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def thing_class_ids(self) -> tuple[int, ...]:
    return tuple(i for i, is_thing in enumerate(self.class_has_instances) if is_thing)

  @property
  def stuff_class_ids(self) -> tuple[int, ...]:
    """Non-thing train ids, excluding the ignore label."""
    return tuple(i for i, is_thing in enumerate(self.class_has_instances)
                 if not is_thing and i != self.ignore_label)


def generate_palette(num_colors: int) -> tuple[tuple[int, int, int], ...]:
  """Distinct, deterministic colours (golden-ratio hue steps)."""
  colors = []
  for i in range(num_colors):
    hue = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    colors.append((int(r * 255), int(g * 255), int(b * 255)))
  return tuple(colors)


def _from_table(name, rows, ignore_label, divisor, splits, void_row=None):
  if void_row is not None:
    rows = (void_row,) + tuple(rows)
  return DatasetDescriptor(
      name=name,
      class_names=tuple(r[1] for r in rows),
      class_has_instances=tuple(r[2] for r in rows),
      colors=tuple(r[3] for r in rows),
      ignore_label=ignore_label,
      panoptic_label_divisor=divisor,
      category_ids=tuple(r[0] for r in rows),
      splits_to_sizes=splits)


_BUILT_IN = {
    COCO_PANOPTIC: lambda: _from_table(
        COCO_PANOPTIC, class_tables.COCO_CATEGORIES, 0, 256,
        {'train': 118287, 'val': 5000, 'test': 40670}, void_row=class_tables.COCO_VOID),
    CITYSCAPES_PANOPTIC: lambda: _from_table(
        CITYSCAPES_PANOPTIC, class_tables.CITYSCAPES_CATEGORIES, 255, 1000,
        {'train_fine': 2975, 'val_fine': 500, 'trainval_fine': 3475, 'test_fine': 1525}),
    ADE20K_PANOPTIC: lambda: _from_table(
        ADE20K_PANOPTIC, class_tables.ADE20K_CATEGORIES, 0, 1000,
        {'train': 20210, 'val': 2000}),
    SYNTHETIC_PANOPTIC: lambda: _from_table(
        SYNTHETIC_PANOPTIC, class_tables.SYNTHETIC_CATEGORIES, 0, 256, {}),
}

BUILT_IN_DATASET_NAMES = tuple(sorted(_BUILT_IN))


def get_built_in(name: str) -> DatasetDescriptor:
  """Returns a built-in descriptor; raises ValueError listing the valid names."""
  if name not in _BUILT_IN:
    raise ValueError(f'unknown dataset "{name}"; built-in datasets are '
                     f'{", ".join(BUILT_IN_DATASET_NAMES)} (or describe yours inline with '
                     'dataset_descriptor { ... })')
  return _BUILT_IN[name]()


def parse_color(text: str) -> tuple[int, int, int]:
  match = _HEX_COLOR.match(text.strip())
  if not match:
    raise ValueError(f'colour "{text}" is not of the form "#rrggbb"')
  value = int(match.group(1), 16)
  return (value >> 16) & 255, (value >> 8) & 255, value & 255


def from_inline_options(options: dataset_pb2.DatasetDescriptorOptions) -> DatasetDescriptor:
  """Builds a descriptor from `dataset_descriptor { ... }` (validated by config.validation)."""
  num_classes = len(options.class_names)
  colors = (tuple(parse_color(c) for c in options.colors) if options.colors
            else generate_palette(num_classes))
  category_ids = (tuple(options.category_ids) if options.category_ids
                  else tuple(range(num_classes)))
  return DatasetDescriptor(
      name=options.name or 'custom',
      class_names=tuple(options.class_names),
      class_has_instances=tuple(options.class_has_instances),
      colors=colors,
      ignore_label=options.ignore_label,
      panoptic_label_divisor=options.panoptic_label_divisor,
      category_ids=category_ids,
      splits_to_sizes=dict(options.splits_to_sizes))


def from_dataset_options(options: dataset_pb2.DatasetOptions) -> DatasetDescriptor:
  """The descriptor named or described by a DatasetOptions message."""
  source = options.WhichOneof('dataset_source')
  if source == 'dataset_descriptor':
    return from_inline_options(options.dataset_descriptor)
  if source is None:
    raise ValueError('no dataset given: set `dataset: "<name>"` or `dataset_descriptor {...}`')
  return get_built_in(options.dataset)


def crop_size_of(crop_size: Sequence[int], field: str = 'crop_size') -> tuple[int, int]:
  """(height, width) of a crop given as [height, width] or [size] (a size x size square).

  The one reading of DatasetOptions.crop_size (and of crops given on a command line): the
  input pipeline, the model build, the post-processor and the exported preprocessing all call
  it, so a one-value crop means the same square everywhere.

  Args:
    crop_size: the field's values, e.g. `options.crop_size`.
    field: the field or flag the values came from, for the error message.

  Raises:
    ValueError: naming `field` and its values, when there are none or more than two.
  """
  values = [int(value) for value in crop_size]
  if len(values) == 1:
    values = values * 2
  if len(values) != 2:
    raise ValueError(f'{field} is {values}; give [height, width], or one value for a square '
                     'crop')
  return values[0], values[1]


def to_inline_options(descriptor: DatasetDescriptor) -> dataset_pb2.DatasetDescriptorOptions:
  """The inverse of from_inline_options (used by converters that write a descriptor)."""
  options = dataset_pb2.DatasetDescriptorOptions(
      name=descriptor.name,
      class_names=descriptor.class_names,
      class_has_instances=descriptor.class_has_instances,
      colors=['#%02x%02x%02x' % c for c in descriptor.colors],
      ignore_label=descriptor.ignore_label,
      panoptic_label_divisor=descriptor.panoptic_label_divisor,
      category_ids=descriptor.category_ids)
  options.splits_to_sizes.update(descriptor.splits_to_sizes)
  return options


