"""Checks a source or converted panoptic dataset and prints a report.

    python -m deeplab2_kmax.data.build.validate --dataset=PATH [--images=DIR] \
        [--panoptic_png_dir=DIR] [--dataset_config=FILE_OR_NAME] [--label_divisor=256] \
        [--max_listed=5] [--num_workers=1]

PATH is one of:
  * a COCO panoptic JSON (any dataset in COCO panoptic format; PNGs in --panoptic_png_dir,
    default the JSON path without ".json"; images in --images, optional);
  * a COCO, Cityscapes (after createPanopticImgs --use-train-id) or ADE20K (after the panoptic
    preparation) root folder, recognised by its layout;
  * a folder of converted TFRecords (or a glob of them), checked against
    --dataset_config (a built-in dataset name or a textproto with `dataset: ...` or
    `dataset_descriptor { ... }`; default: the folder's dataset_options.textproto).

Source checks: PNG ids listed in the JSON and vice versa, JSON areas vs pixel counts, one
crowd region per category, instance counts below the label divisor, image vs label size (and
the JSON's sizes), unknown categories, missing/unreadable files, duplicate ids.
Converted checks: records and images readable, label size vs image size, panoptic ids that
decode to unknown classes (or instance ids that overflowed the divisor), instances on stuff.

The report gives counts per kind of defect with the fix and the first offending files; the exit
code is 1 when an error-level defect was found.
"""

import collections
import dataclasses
import functools
import glob
import multiprocessing
import os
import sys
from typing import Optional, Sequence

from absl import flags
import numpy as np

from deeplab2_kmax import command_line
from deeplab2_kmax.data.formats import coco_panoptic as cf


@dataclasses.dataclass
class Report:
  """What a validation found."""
  title: str
  num_images: int = 0
  num_labelled: int = 0
  defects: list = dataclasses.field(default_factory=list)
  segments: int = 0
  things: int = 0
  stuff: int = 0
  crowd: int = 0
  max_things_per_image: int = 0
  images_with_defects: set = dataclasses.field(default_factory=set)

  @property
  def ok(self) -> bool:
    return not any(d.is_error for d in self.defects)

  def kinds(self) -> dict:
    counts = collections.Counter(d.kind for d in self.defects)
    return dict(counts)

  def add(self, image: str, defects: Sequence[cf.Defect]) -> None:
    self.defects.extend(defects)
    if defects:
      self.images_with_defects.add(image)

  def add_stats(self, stats: cf.ExampleStats) -> None:
    """Counts one image's segments into the totals."""
    self.segments += stats.segments
    self.things += stats.things
    self.stuff += stats.stuff
    self.crowd += stats.crowd
    self.max_things_per_image = max(self.max_things_per_image, stats.things)

  def format(self, max_listed: int = 5) -> str:
    lines = [self.title,
             f'images: {self.num_images} ({self.num_labelled} with labels); segments: '
             f'{self.segments} (things {self.things}, stuff {self.stuff}, crowd {self.crowd}); '
             f'most things in one image: {self.max_things_per_image}']
    if not self.defects:
      lines.append('no defects found')
    else:
      errors = sum(d.is_error for d in self.defects)
      lines.append(f'defects: {len(self.defects)} ({errors} errors, '
                   f'{len(self.defects) - errors} warnings) in '
                   f'{len(self.images_with_defects)} of {self.num_images} images')
      lines.append(cf.describe_defects(self.defects, max_listed))
    lines.append('result: ' + ('OK' if self.ok else
                               f'FAILED ({len(self.kinds())} kind(s) of defect)'))
    return '\n'.join(lines)


# ---- Source datasets ----


def _check_job(job: cf.ExampleJob, spec: cf.LabelSpec):
  """Defects and stats of one source example (worker function; no arrays returned)."""
  checked = cf.check_example(job, spec)
  return job.name, checked.defects, checked.stats, job.png_path is not None


def validate_jobs(title: str, jobs: Sequence[cf.ExampleJob], spec: Optional[cf.LabelSpec],
                  structural: Sequence[cf.Defect] = (), num_workers: int = 1) -> Report:
  report = Report(title)
  report.add('(json)', list(structural))
  work = functools.partial(_check_job, spec=spec)
  pool = None
  if num_workers > 1 and len(jobs) > 1:
    pool = multiprocessing.get_context('spawn').Pool(min(num_workers, len(jobs)))
    results = pool.imap(work, jobs, chunksize=4)
  else:
    results = map(work, jobs)
  try:
    for name, defects, stats, labelled in results:
      report.num_images += 1
      report.num_labelled += labelled
      report.add(name, defects)
      report.add_stats(stats)
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  return report


def _spec_from_config(dataset_config: str, treat_crowd_as_ignore: bool = True):
  descriptor = load_descriptor(dataset_config)
  return cf.spec_from_descriptor(descriptor, treat_crowd_as_ignore)


def validate_json(json_path: str, png_dir: str = '', images_dir: str = '',
                  dataset_config: str = '', label_divisor: int = 256,
                  num_workers: int = 1) -> Report:
  """Checks a COCO-panoptic-format dataset (classes from dataset_config or the JSON)."""
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.data.build import coco_format as build_coco_format_data
  png_dir = png_dir or os.path.splitext(json_path)[0]
  data = cf.load_json(json_path)
  if dataset_config:
    spec = _spec_from_config(dataset_config)
  else:
    categories = cf.read_categories(data, json_path)
    descriptor = build_coco_format_data.descriptor_from_categories(
        categories, 'dataset', label_divisor, {})
    spec = cf.spec_from_descriptor(descriptor)
  parsed = cf.read_panoptic_json(json_path, png_dir, images_dir or None, data)
  jobs = parsed.jobs
  if not images_dir:
    jobs = [dataclasses.replace(j, image_path='') for j in jobs]
  title = (f'COCO panoptic JSON {json_path} (PNGs {png_dir}; images '
           f'{images_dir or "not checked: pass --images"})')
  return validate_jobs(title, jobs, spec, parsed.defects, num_workers)


def validate_root(root: str, num_workers: int = 1) -> Optional[Report]:
  """Checks a COCO, Cityscapes or ADE20K source root (None if the layout is not recognised)."""
  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.build import ade20k as build_ade20k_data
  from deeplab2_kmax.data.build import cityscapes as build_cityscapes_data
  from deeplab2_kmax.data.build import coco as build_coco_data
  from deeplab2_kmax.data import datasets
  # pylint: enable=g-import-not-at-top
  if glob.glob(os.path.join(root, 'annotations', 'panoptic_*2017.json')):
    kind, module = 'COCO', build_coco_data
    spec = cf.spec_from_descriptor(datasets.get_built_in(datasets.COCO_PANOPTIC))
  elif os.path.isdir(os.path.join(root, 'leftImg8bit')):
    kind, module, spec = 'Cityscapes', build_cityscapes_data, build_cityscapes_data.label_spec()
  elif glob.glob(os.path.join(root, 'ade20k_panoptic_*.json')):
    kind, module, spec = 'ADE20K', build_ade20k_data, build_ade20k_data.label_spec()
  else:
    return None
  jobs, structural = [], []
  for split in module.SPLITS:
    split_jobs, defects = module.split_jobs(root, split)
    jobs += split_jobs
    structural += defects
  return validate_jobs(f'{kind} source dataset {root}', jobs, spec, structural, num_workers)


# ---- Converted datasets ----


def load_descriptor(dataset_config: str):
  """A descriptor from a built-in name or a DatasetOptions textproto file."""
  # pylint: disable=g-import-not-at-top
  from google.protobuf import text_format
  from deeplab2_kmax.data import datasets
  from deeplab2_kmax.protos import dataset_pb2
  # pylint: enable=g-import-not-at-top
  if dataset_config in datasets.BUILT_IN_DATASET_NAMES:
    return datasets.get_built_in(dataset_config)
  if not os.path.isfile(dataset_config):
    raise cf.ConversionError(
        f'--dataset_config={dataset_config} is neither a built-in dataset '
        f'({", ".join(datasets.BUILT_IN_DATASET_NAMES)}) nor a file')
  try:
    with open(dataset_config) as f:
      options = text_format.Parse(f.read(), dataset_pb2.DatasetOptions())
    return datasets.from_dataset_options(options)
  except (text_format.ParseError, ValueError) as error:
    raise cf.ConversionError(f'{dataset_config}: not a dataset options textproto ({error})'
                             ) from None


def _record_defects(file: str, index: int, record, descriptor) -> tuple:
  """(name, labelled, defects, ExampleStats or None) of one serialized record; segments are
  the distinct non-void panoptic ids (crowd: thing-class ids with instance 0)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.formats import tfrecord  # pylint: disable=g-import-not-at-top
  where = f'{file} record {index + 1}'
  try:
    parsed = tfrecord.parse_features(record)
  except tf.errors.OpError:
    return where, False, [cf.Defect(cf.UNREADABLE_FILE, where, 'not a tf.train.Example')], None
  name = parsed[common.KEY_IMAGE_FILENAME].numpy().decode('utf-8', 'replace')
  where = f'{file} record {index + 1} ("{name}")'
  defects = []
  try:
    image = tf.io.decode_image(parsed[common.KEY_ENCODED_IMAGE], channels=3,
                               expand_animations=False)
  except tf.errors.OpError as error:
    return name, False, [cf.Defect(cf.UNREADABLE_FILE, where,
                                   f'image cannot be decoded ({error.message})')], None
  height, width = (int(v) for v in image.shape[:2])
  stored = (int(parsed[common.KEY_IMAGE_HEIGHT]), int(parsed[common.KEY_IMAGE_WIDTH]))
  if stored != (height, width):
    defects.append(cf.Defect(cf.SIZE_MISMATCH, where,
                             f'image/height, image/width say {stored[0]}x{stored[1]} but the '
                             f'image is {height}x{width}'))
  encoded = parsed[common.KEY_ENCODED_LABEL].numpy()
  if not encoded:
    return name, False, defects, None
  if parsed[common.KEY_LABEL_FORMAT].numpy() == b'png':
    label = tf.io.decode_png(encoded, channels=1).numpy()[..., 0].astype(np.int64)
    label = label * descriptor.panoptic_label_divisor   # semantic-only label
  else:
    if len(encoded) != 4 * height * width:
      defects.append(cf.Defect(cf.SIZE_MISMATCH, where,
                               f'raw label has {len(encoded) // 4} values, the image '
                               f'{height}x{width} has {height * width} pixels'))
      return name, True, defects, None
    label = np.frombuffer(encoded, '<i4').reshape(height, width).astype(np.int64)
  if label.shape != (height, width):
    defects.append(cf.Defect(cf.SIZE_MISMATCH, where,
                             f'label is {label.shape[0]}x{label.shape[1]}, image '
                             f'{height}x{width}'))
    return name, True, defects, None
  d = descriptor
  values = np.unique(label)
  semantic = values // d.panoptic_label_divisor
  instance = values % d.panoptic_label_divisor
  known = ((semantic >= 0) & (semantic < d.num_classes)) | (semantic == d.ignore_label)
  if not known.all():
    bad = values[~known]
    defects.append(cf.Defect(
        cf.UNKNOWN_CLASS, where,
        f'panoptic id {int(bad[0])} decodes to class {int(bad[0]) // d.panoptic_label_divisor} '
        f'outside the {d.num_classes} classes of "{d.name}" (an instance id >= the label '
        f'divisor {d.panoptic_label_divisor} also looks like this); {len(bad)} such id(s)'))
  is_thing = np.array([0 <= s < d.num_classes and d.class_has_instances[s] for s in semantic],
                      bool)
  on_stuff = known & ~is_thing & (instance != 0)
  if on_stuff.any():
    v = int(values[on_stuff][0])
    defects.append(cf.Defect(cf.INSTANCE_ON_STUFF, where,
                             f'panoptic id {v} gives instance {v % d.panoptic_label_divisor} '
                             f'to stuff class {v // d.panoptic_label_divisor}'))
  stats = cf.ExampleStats(
      things=int((is_thing & (instance != 0)).sum()),
      stuff=int((known & ~is_thing & (semantic != d.ignore_label)).sum()),
      crowd=int((is_thing & (instance == 0)).sum()))
  stats.segments = stats.things + stats.stuff + stats.crowd
  return name, True, defects, stats


def validate_records(files: Sequence[str], descriptor, title: str) -> Report:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.formats import tfrecord  # pylint: disable=g-import-not-at-top
  report = Report(title)
  for file in files:
    records_read = 0
    try:
      for index, record in enumerate(tf.data.TFRecordDataset(file)):
        records_read = index + 1
        name, labelled, defects, stats = _record_defects(file, index, record, descriptor)
        report.num_images += 1
        report.num_labelled += labelled
        report.add(name, defects)
        if stats is not None:
          report.add_stats(stats)
    except tf.errors.OpError:
      report.add(file, [cf.Defect(cf.UNREADABLE_FILE, file,
                                  tfrecord.unreadable_shard_text(records_read))])
  return report


def validate(dataset: str, images: str = '', panoptic_png_dir: str = '',
             dataset_config: str = '', label_divisor: int = 256,
             num_workers: int = 1) -> Report:
  """Dispatches on what `dataset` is (see the module docstring)."""
  if dataset.endswith('.json'):
    return validate_json(dataset, panoptic_png_dir, images, dataset_config, label_divisor,
                         num_workers)
  if os.path.isdir(dataset):
    records = sorted(glob.glob(os.path.join(dataset, '*.tfrecord')))
    if not records:
      report = validate_root(dataset, num_workers)
      if report is None:
        raise cf.ConversionError(
            f'{dataset}: neither TFRecords nor a COCO / Cityscapes / ADE20K layout; fix: pass '
            'a panoptic JSON, a source root or a folder of converted shards')
      return report
    config = dataset_config or os.path.join(dataset, 'dataset_options.textproto')
  else:
    records = sorted(glob.glob(dataset))
    if not records:
      raise cf.ConversionError(f'--dataset={dataset}: no such file, folder or TFRecords')
    config = dataset_config or os.path.join(os.path.dirname(records[0]),
                                            'dataset_options.textproto')
  if not dataset_config and not os.path.exists(config):
    raise cf.ConversionError(f'{dataset}: no dataset_options.textproto next to the shards; fix: '
                             'pass --dataset_config (a built-in name or a textproto)')
  descriptor = load_descriptor(config)
  return validate_records(records, descriptor,
                          f'converted dataset {dataset} ({len(records)} shards, dataset '
                          f'"{descriptor.name}", label divisor '
                          f'{descriptor.panoptic_label_divisor})')


def define_flags():
  flags.DEFINE_string('dataset', None, 'Panoptic JSON, source root, or folder/glob of '
                      'converted TFRecords.')
  flags.DEFINE_string('images', '', 'Image folder of a panoptic JSON (enables image checks).')
  flags.DEFINE_string('panoptic_png_dir', '', 'PNG folder of a panoptic JSON (default: the '
                      'JSON path without .json).')
  flags.DEFINE_string('dataset_config', '', 'Built-in dataset name or dataset options '
                      'textproto describing the classes.')
  flags.DEFINE_integer('label_divisor', 256, 'Label divisor for a JSON checked without '
                       '--dataset_config.')
  flags.DEFINE_integer('max_listed', 5, 'Offending files listed per kind of defect.')
  flags.DEFINE_integer('num_workers', 1, 'Worker processes for source checks.')


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 1
  f = flags.FLAGS
  if not f.dataset:
    print('error: --dataset is required', file=sys.stderr)
    return 1
  try:
    report = validate(f.dataset, f.images, f.panoptic_png_dir, f.dataset_config,
                      f.label_divisor, f.num_workers)
  except cf.ConversionError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(report.format(f.max_listed))
  return 0 if report.ok else 1


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
