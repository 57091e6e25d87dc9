"""What every converter of data/build/ shares: converting a split of ExampleJobs into sharded
DeepLab2 TFRecords, the dataset-options file next to the shards, and the command-line wrapper.
"""

import functools
import os
import sys
import time
from typing import Callable, Optional, Sequence

from absl import flags

from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.build import shard_writer

# The dataset-options file each converter writes into its output folder; the validator and
# `dataset_descriptor`-based experiment configs read it.
DATASET_OPTIONS_FILE = 'dataset_options.textproto'


def num_shards_for(num_images: int, requested: int, default: int) -> int:
  """`requested` (0 = DeepLab2's default for the dataset), never more shards than images."""
  return max(1, min(requested or default, max(1, num_images)))


def convert_split(output_dir: str, split: str, jobs: Sequence[coco_panoptic.ExampleJob],
                  spec: Optional[coco_panoptic.LabelSpec], num_shards: int, num_workers: int = 1,
                  overwrite: bool = False, show_progress: bool = True
                  ) -> shard_writer.WriteResult:
  """Writes one split; jobs without png_path become examples without labels.

  num_workers: processes writing shards (0 = automatic, see `workers`).
  """
  coco_panoptic.check_jobs_unique(jobs)
  state = {'split': split, 'labels': spec is not None}
  if spec is not None:
    state.update(category_to_train_id=sorted(spec.category_to_train_id.items()),
                 thing_train_ids=sorted(spec.thing_train_ids), ignore_label=spec.ignore_label,
                 label_divisor=spec.label_divisor,
                 treat_crowd_as_ignore=spec.treat_crowd_as_ignore)
  work = functools.partial(coco_panoptic.encode_example_job, spec=spec)
  return shard_writer.write_shards(output_dir, split, list(jobs), work, num_shards,
                                   num_workers=workers(num_workers, len(jobs)), state=state, overwrite=overwrite,
                                   show_progress=show_progress)


def convert_built_in_splits(root: str, output_dir: str, splits: Sequence[str],
                            split_jobs: Callable, spec, dataset: str, default_num_shards: int,
                            num_shards: int, num_workers: int, overwrite: bool,
                            show_progress: bool, missing_message: str) -> list:
  """Converts each split of a built-in dataset's source root and writes its dataset options.

  Args:
    split_jobs: (root, split) -> (jobs, defects); a split with no jobs is skipped.
    spec: LabelSpec for labelled splits (the "test" split is written without labels).
    missing_message: ConversionError text when no split was found.

  Returns:
    A WriteResult per converted split.
  """
  results = []
  for split in splits:
    jobs, defects = split_jobs(root, split)
    errors = [d for d in defects if d.is_error]
    if errors:
      raise coco_panoptic.ConversionError(str(errors[0]))
    if not jobs:
      continue
    results.append(convert_split(
        output_dir, split, jobs, None if split == 'test' else spec,
        num_shards_for(len(jobs), num_shards, default_num_shards), num_workers, overwrite,
        show_progress))
  if not results:
    raise coco_panoptic.ConversionError(missing_message)
  write_dataset_options(output_dir, built_in_options_text(dataset, output_dir,
                                                          [r.split for r in results]))
  return results


def write_dataset_options(output_dir: str, text: str, path: Optional[str] = None) -> str:
  """Writes the dataset part of an experiment config (a DatasetOptions textproto fragment) and
  returns its path."""
  path = path or os.path.join(output_dir, DATASET_OPTIONS_FILE)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
  return path


def built_in_options_text(dataset: str, output_dir: str, splits: Sequence[str]) -> str:
  lines = [f'# Dataset options of the shards in this folder; paste into train_dataset_options /',
           f'# eval_dataset_options of an experiment config.',
           f'dataset: "{dataset}"']
  lines += [f'# {split}: file_pattern: "{os.path.join(os.path.abspath(output_dir), split)}'
            f'-*.tfrecord"' for split in splits]
  return '\n'.join(lines) + '\n'


# The flags add_common_flags defines that every converter's build() takes, by these names.
COMMON_BUILD_FLAGS = ('output_dir', 'treat_crowd_as_ignore', 'num_shards', 'num_workers',
                      'overwrite')


def add_common_flags(num_shards_default: int) -> None:
  """Defines the flags of COMMON_BUILD_FLAGS (num_shards_default: the dataset's default, 0 for
  one shard per 256 images)."""
  flags.DEFINE_string('output_dir', None, 'Folder for the TFRecord shards.')
  flags.DEFINE_bool('treat_crowd_as_ignore', True, 'Crowd pixels get the ignore label.')
  default = num_shards_default or 'one per 256 images, at least 8'
  flags.DEFINE_integer('num_shards', 0, f'Shards per split (0 = {default}; at most one per '
                       'image).')
  flags.DEFINE_integer('num_workers', 0, 'Worker processes writing shards (0 = one per core '
                       f'for splits of {AUTO_PARALLEL_MIN_IMAGES}+ images, else none; 1 = none).')
  flags.DEFINE_bool('overwrite', False, 'Delete existing shards of the converted splits first '
                    '(default: resume, keeping complete shards).')


def add_built_in_flags(root_flag: str, root_help: str, splits: Sequence[str],
                       num_shards_default: int) -> None:
  """The flags of a built-in dataset's converter (coco, cityscapes, ade20k): its source root
  `--<root_flag>`, `--splits` and the common flags."""
  flags.DEFINE_string(root_flag, None, root_help)
  flags.DEFINE_list('splits', list(splits), 'Splits to convert (absent ones are skipped).')
  add_common_flags(num_shards_default)


def converter_main(build: Callable[..., list], build_flags: Sequence[str],
                   required_flags: Sequence[str]) -> Callable[[Sequence[str]], int]:
  """The main(argv) of a converter command line.

  Args:
    build: The converter's build(), returning a WriteResult per split; its arguments are
      named as the flags that give them.
    build_flags: The flags passed to build, each as the keyword argument of its name.
    required_flags: Flags that must be set, checked in this order (a ConversionError
      "--<flag> is required" for the first one missing).

  Returns:
    main(argv) for command_line.run: exit code 0, or 1 with one error line (see run()).
  """
  def main(argv):
    values = flags.FLAGS

    def convert():
      for name in required_flags:
        require(getattr(values, name), name)
      return build(**{name: getattr(values, name) for name in build_flags})
    return run(convert, argv)
  return main


def built_in_main(build: Callable[..., list], root_flag: str) -> Callable[[Sequence[str]], int]:
  """converter_main of a built-in dataset's converter: the flags of add_built_in_flags."""
  return converter_main(build, (root_flag, 'splits') + COMMON_BUILD_FLAGS,
                        required_flags=(root_flag, 'output_dir'))


# Below this many images, worker processes cost more (each imports TensorFlow: seconds) than
# they save, so the automatic choice converts in this process.
AUTO_PARALLEL_MIN_IMAGES = 1000


def workers(requested: int, num_images: int = AUTO_PARALLEL_MIN_IMAGES) -> int:
  """`requested`, or for 0: one per core for large splits, else 1."""
  if requested:
    return requested
  return (os.cpu_count() or 1) if num_images >= AUTO_PARALLEL_MIN_IMAGES else 1


def run(convert: Callable[[], list], argv: Sequence[str]) -> int:
  """Runs a converter's body: one readable error line and exit code 1 on bad input."""
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 1
  start = time.monotonic()
  try:
    results = convert()
  except (coco_panoptic.ConversionError, shard_writer.ShardStateError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  seconds = time.monotonic() - start
  total = sum(r.num_examples for r in results)
  for r in results:
    print(f'{r.split}: {r.num_examples} images in {r.num_shards} shards '
          f'({r.shards_written} written, {r.shards_skipped} already complete)')
  print(f'done in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} images/s)')
  return 0


def require(value, flag: str) -> None:
  if not value:
    raise coco_panoptic.ConversionError(f'--{flag} is required')
