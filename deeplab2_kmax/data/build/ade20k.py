"""Converts ADE20K panoptic to DeepLab2-format TFRecords.

    python -m deeplab2_kmax.data.build.ade20k --ade20k_root=R --output_dir=O \
        [--splits=train,val]

Reads the layout that the ADE20K panoptic preparation (Mask2Former's
`datasets/prepare_ade20k_pan_seg.py`, which DeepLab2 also expects) writes into
ADEChallengeData2016/:
  R/images/training/ADE_train_%08d.jpg, R/images/validation/ADE_val_%08d.jpg
  R/ade20k_panoptic_{train,val}.json        (category ids 0..149)
  R/ade20k_panoptic_{train,val}/<stem>.png  (id = R + 256 * G + 256^2 * B)

Writes O/{split}-%05d-of-%05d.tfrecord (1000 shards per split as DeepLab2, or fewer for small
data) with panoptic = train_id * 1000 + instance, where train id = category id + 1 and 0 is
void ("other objects"; category 255 of the preparation maps to it), plus
O/dataset_options.textproto (`dataset: "ade20k_panoptic"`).
"""

import os

from deeplab2_kmax import command_line
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.build import conversion
from deeplab2_kmax.data import datasets

NUM_SHARDS = 1000
SPLITS = ('train', 'val')
_IMAGE_FOLDERS = {'train': 'training', 'val': 'validation'}


def split_jobs(root: str, split: str):
  json_path = os.path.join(root, f'ade20k_panoptic_{split}.json')
  if not os.path.exists(json_path):
    return [], []
  parsed = coco_panoptic.read_panoptic_json(
      json_path, os.path.join(root, f'ade20k_panoptic_{split}'),
      os.path.join(root, 'images', _IMAGE_FOLDERS[split]))
  return parsed.jobs, parsed.defects


def label_spec(treat_crowd_as_ignore: bool = True) -> coco_panoptic.LabelSpec:
  descriptor = datasets.get_built_in(datasets.ADE20K_PANOPTIC)
  # category_ids = (255, 0, 1, ..., 149): train id = index; 255 ("other objects") is void.
  mapping = {cid: train for train, cid in enumerate(descriptor.category_ids)}
  return coco_panoptic.spec_from_descriptor(descriptor, treat_crowd_as_ignore, mapping)


def build(ade20k_root: str, output_dir: str, splits=SPLITS, treat_crowd_as_ignore: bool = True,
          num_shards: int = 0, num_workers: int = 1, overwrite: bool = False,
          show_progress: bool = True) -> list:
  spec = label_spec(treat_crowd_as_ignore)
  return conversion.convert_built_in_splits(
      ade20k_root, output_dir, splits, split_jobs, spec, datasets.ADE20K_PANOPTIC,
      NUM_SHARDS, num_shards, num_workers, overwrite, show_progress,
      f'{ade20k_root}: no ade20k_panoptic_{{train,val}}.json; fix: point --ade20k_root at '
      'ADEChallengeData2016/ after running the ADE20K panoptic preparation '
      '(Mask2Former datasets/prepare_ade20k_pan_seg.py)')


def define_flags():
  conversion.add_built_in_flags('ade20k_root', 'ADEChallengeData2016 folder after the '
                                'panoptic preparation.', SPLITS, NUM_SHARDS)


main = conversion.built_in_main(build, 'ade20k_root')


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
