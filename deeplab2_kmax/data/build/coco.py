"""Converts COCO panoptic to DeepLab2-format TFRecords.

    python -m deeplab2_kmax.data.build.coco --coco_root=R --output_dir=O \
        [--treat_crowd_as_ignore] [--splits=train,val,test] [--num_workers=0]

Reads the official layout:
  R/train2017/*.jpg, R/val2017/*.jpg, R/test2017/*.jpg
  R/annotations/panoptic_{train,val}2017.json
  R/annotations/panoptic_{train,val}2017/*.png     (id = R + 256 * G + 256^2 * B)

Writes O/{split}-%05d-of-%05d.tfrecord (1000 shards per split as DeepLab2, or fewer for small
data; test without labels) and O/dataset_options.textproto. COCO's sparse category ids become
the contiguous train ids of the built-in `coco_panoptic` descriptor (1..133, 0 = void); its
`category_ids` map them back. Crowd things get instance 0 and, with --treat_crowd_as_ignore
(the default, as DeepLab2), the ignore label. Splits whose files are absent are skipped.
"""

import os

from deeplab2_kmax import command_line
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.build import conversion
from deeplab2_kmax.data import datasets

NUM_SHARDS = 1000
SPLITS = ('train', 'val', 'test')


def split_jobs(coco_root: str, split: str):
  """ExampleJobs of a split and its JSON's structural defects; ([], []) when absent."""
  images_dir = os.path.join(coco_root, f'{split}2017')
  if split == 'test':
    if not os.path.isdir(images_dir):
      return [], []
    return [coco_panoptic.ExampleJob(os.path.splitext(os.path.basename(p))[0], p)
            for p in coco_panoptic.list_images(images_dir)], []
  json_path = os.path.join(coco_root, 'annotations', f'panoptic_{split}2017.json')
  if not os.path.exists(json_path):
    return [], []
  parsed = coco_panoptic.read_panoptic_json(
      json_path, os.path.join(coco_root, 'annotations', f'panoptic_{split}2017'), images_dir)
  return parsed.jobs, parsed.defects


def build(coco_root: str, output_dir: str, splits=SPLITS, treat_crowd_as_ignore: bool = True,
          num_shards: int = 0, num_workers: int = 1, overwrite: bool = False,
          show_progress: bool = True) -> list:
  """Converts the splits present under coco_root; returns a WriteResult per split."""
  if not os.path.isdir(coco_root):
    raise coco_panoptic.ConversionError(f'--coco_root={coco_root} is not a folder')
  descriptor = datasets.get_built_in(datasets.COCO_PANOPTIC)
  spec = coco_panoptic.spec_from_descriptor(descriptor, treat_crowd_as_ignore)
  return conversion.convert_built_in_splits(
      coco_root, output_dir, splits, split_jobs, spec, datasets.COCO_PANOPTIC,
      NUM_SHARDS, num_shards, num_workers, overwrite, show_progress,
      f'{coco_root}: found none of annotations/panoptic_{{train,val}}2017.json or test2017/; '
      'fix: point --coco_root at the folder holding annotations/ and the image folders')


def define_flags():
  conversion.add_built_in_flags('coco_root',
                                'COCO root (holding annotations/, train2017/, ...).', SPLITS,
                                NUM_SHARDS)


main = conversion.built_in_main(build, 'coco_root')


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
