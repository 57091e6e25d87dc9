"""Converts any dataset in COCO panoptic format to DeepLab2-format TFRecords, no code edits.

    python -m deeplab2_kmax.data.build.coco_format --images=DIR \
        --panoptic_json=ann.json [--panoptic_png_dir=DIR] --output_dir=O \
        [--dataset_config=O/dataset_options.textproto] [--split=train] [--name=my_data] \
        [--label_divisor=256] [--treat_crowd_as_ignore]

Input (as written by COCO, cityscapesscripts, the ADE20K preparation and labelling tools):
the JSON's "categories" ({"id", "name", "isthing", optional "color"}), "annotations" (one per
image, "file_name" of its PNG in --panoptic_png_dir, default: the JSON path without ".json"),
"images" ("file_name" relative to --images; without "images", the image with the PNG's stem).

Output: O/{split}-%05d-of-%05d.tfrecord and --dataset_config, the `dataset_descriptor { ... }`
of the dataset (class names sorted by category id as train ids 1..N, train id 0 = void and the
ignore label, thing flags, colours, the original category ids) ready to paste into the
train/eval dataset options of an experiment config. Converting a second split with the same
categories adds its size to the same file. Run `python -m deeplab2_kmax.data.build.validate
--dataset=ann.json` first for a full report of any problems in the annotations.
"""

import os

from absl import flags
from google.protobuf import text_format

from deeplab2_kmax import command_line
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.build import conversion
from deeplab2_kmax.data import datasets
from deeplab2_kmax.protos import dataset_pb2

EXAMPLES_PER_SHARD = 256


def descriptor_from_categories(categories: list, name: str, label_divisor: int,
                               splits_to_sizes: dict) -> datasets.DatasetDescriptor:
  """Train id 0 = void (ignore); categories sorted by id become train ids 1..N."""
  categories = sorted(categories, key=lambda c: c['id'])
  used = {c['id'] for c in categories}
  void_id = 0 if 0 not in used else -1
  palette = datasets.generate_palette(len(categories) + 1)
  colors = [(0, 0, 0)]
  for i, c in enumerate(categories):
    color = c.get('color')
    ok = (isinstance(color, (list, tuple)) and len(color) == 3 and
          all(isinstance(v, int) and 0 <= v <= 255 for v in color))
    colors.append(tuple(color) if ok else palette[i + 1])
  names = ['void'] + [c['name'] for c in categories]
  seen = {}
  for i, n in enumerate(names):
    if n in seen:
      raise coco_panoptic.ConversionError(
          f'categories {categories[seen[n] - 1]["id"] if seen[n] else "void"} and '
          f'{categories[i - 1]["id"]} are both named "{n}"; fix: give classes distinct names')
    seen[n] = i
  return datasets.DatasetDescriptor(
      name=name, class_names=tuple(names),
      class_has_instances=(False,) + tuple(bool(c['isthing']) for c in categories),
      colors=tuple(colors), ignore_label=0, panoptic_label_divisor=label_divisor,
      category_ids=(void_id,) + tuple(c['id'] for c in categories),
      splits_to_sizes=dict(splits_to_sizes))


def options_text(descriptor: datasets.DatasetDescriptor, output_dir: str) -> str:
  body = text_format.MessageToString(datasets.to_inline_options(descriptor))
  body = '\n'.join('  ' + line for line in body.strip().splitlines())
  patterns = '\n'.join(f'# {split}: file_pattern: "{os.path.join(os.path.abspath(output_dir), split)}'
                       f'-*.tfrecord"' for split in sorted(descriptor.splits_to_sizes))
  return (f'# Dataset "{descriptor.name}" converted by deeplab2_kmax.data.build.coco_format.\n'
          '# Paste into train_dataset_options / eval_dataset_options of an experiment config\n'
          f'# (the model\'s semantic output channels must equal the {descriptor.num_classes} '
          'classes).\n'
          f'{patterns}\n'
          f'dataset_descriptor {{\n{body}\n}}\n')


def _read_existing(path: str):
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      options = text_format.Parse(f.read(), dataset_pb2.DatasetOptions())
  except text_format.ParseError:
    return None
  if options.WhichOneof('dataset_source') != 'dataset_descriptor':
    return None
  return datasets.from_inline_options(options.dataset_descriptor)


def build(images: str, panoptic_json: str, output_dir: str, panoptic_png_dir: str = '',
          dataset_config: str = '', split: str = 'train', name: str = '',
          label_divisor: int = 256, treat_crowd_as_ignore: bool = True, num_shards: int = 0,
          num_workers: int = 1, overwrite: bool = False, show_progress: bool = True) -> list:
  """Converts one split; writes the dataset config; returns [WriteResult]."""
  if not os.path.isdir(images):
    raise coco_panoptic.ConversionError(f'--images={images} is not a folder')
  png_dir = panoptic_png_dir or os.path.splitext(panoptic_json)[0]
  if not os.path.isdir(png_dir):
    raise coco_panoptic.ConversionError(
        f'{png_dir}: no such folder of panoptic PNGs; fix: pass --panoptic_png_dir')
  data = coco_panoptic.load_json(panoptic_json)
  categories = coco_panoptic.read_categories(data, panoptic_json)
  name = name or os.path.splitext(os.path.basename(panoptic_json))[0]
  config_path = dataset_config or os.path.join(output_dir, conversion.DATASET_OPTIONS_FILE)
  sizes = {}
  existing = _read_existing(config_path)
  parsed = coco_panoptic.read_panoptic_json(panoptic_json, png_dir, images, data)
  descriptor = descriptor_from_categories(categories, name, label_divisor, {})
  if existing is not None:
    same = all(getattr(existing, f) == getattr(descriptor, f) for f in
               ('class_names', 'class_has_instances', 'category_ids', 'panoptic_label_divisor'))
    if not same:
      raise coco_panoptic.ConversionError(
          f'{config_path} describes other classes than {panoptic_json}; fix: convert splits '
          'that share one category list, or write to another --dataset_config')
    sizes.update(existing.splits_to_sizes)
  errors = [d for d in parsed.defects if d.is_error]
  if errors:
    raise coco_panoptic.ConversionError(str(errors[0]))
  if not parsed.jobs:
    raise coco_panoptic.ConversionError(f'{panoptic_json}: no annotations to convert')
  spec = coco_panoptic.spec_from_descriptor(descriptor, treat_crowd_as_ignore)
  result = conversion.convert_split(
      output_dir, split, parsed.jobs, spec,
      conversion.num_shards_for(len(parsed.jobs), num_shards,
                                max(8, -(-len(parsed.jobs) // EXAMPLES_PER_SHARD))),
      num_workers, overwrite, show_progress)
  sizes[split] = len(parsed.jobs)
  descriptor = descriptor_from_categories(categories, name, label_divisor, sizes)
  conversion.write_dataset_options(output_dir, options_text(descriptor, output_dir),
                                   config_path)
  return [result]


def define_flags():
  flags.DEFINE_string('images', None, 'Folder of the images (JSON "images" file_name is '
                      'relative to it).')
  flags.DEFINE_string('panoptic_json', None, 'COCO panoptic JSON.')
  flags.DEFINE_string('panoptic_png_dir', '', 'Folder of the panoptic PNGs (default: the JSON '
                      'path without .json).')
  flags.DEFINE_string('dataset_config', '', 'Where to write the dataset_descriptor textproto '
                      '(default: <output_dir>/dataset_options.textproto).')
  flags.DEFINE_string('split', 'train', 'Split name (shard-name prefix).')
  flags.DEFINE_string('name', '', 'Dataset name (default: the JSON file stem).')
  flags.DEFINE_integer('label_divisor', 256, 'panoptic = class * divisor + instance; must '
                       'exceed the instances of one class in an image.')
  conversion.add_common_flags(0)


main = conversion.converter_main(
    build, ('images', 'panoptic_json', 'panoptic_png_dir', 'dataset_config', 'split', 'name',
            'label_divisor') + conversion.COMMON_BUILD_FLAGS,
    required_flags=('images', 'panoptic_json', 'output_dir'))


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
