"""Converts Cityscapes panoptic to DeepLab2-format TFRecords.

    python -m deeplab2_kmax.data.build.cityscapes --cityscapes_root=R --output_dir=O \
        [--treat_crowd_as_ignore] [--splits=train,val,test]

First create the panoptic ground truth with cityscapesscripts (PyPI `cityscapesscripts`):

    CITYSCAPES_DATASET=R python -m cityscapesscripts.preparation.createPanopticImgs \
        --dataset-folder R/gtFine --use-train-id --set-names train val

Reads:
  R/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  R/gtFine/cityscapes_panoptic_{split}_trainId.json   (category_id = Cityscapes train id)
  R/gtFine/cityscapes_panoptic_{split}_trainId/{city}_{seq}_{frame}_gtFine_panoptic.png

Writes O/{split}-%05d-of-%05d.tfrecord (10 shards per split as DeepLab2; test without labels)
with image/filename `{city}_{seq}_{frame}` and panoptic = train_id * 1000 + instance (ignore
label 255), plus O/dataset_options.textproto (`dataset: "cityscapes_panoptic"`).
"""

import dataclasses
import os

from deeplab2_kmax import command_line
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.build import conversion
from deeplab2_kmax.data import datasets

NUM_SHARDS = 10
SPLITS = ('train', 'val', 'test')
_IMAGE_SUFFIX = '_leftImg8bit'
_PANOPTIC_SUFFIX = '_gtFine_panoptic.png'


def split_jobs(root: str, split: str):
  """(jobs, structural defects) of a split; ([], []) when its images are absent."""
  images_dir = os.path.join(root, 'leftImg8bit', split)
  if not os.path.isdir(images_dir):
    return [], []
  images = {os.path.basename(p)[:-len(_IMAGE_SUFFIX + '.png')]: p
            for p in coco_panoptic.list_images(images_dir, _IMAGE_SUFFIX)}
  if split == 'test':
    return [coco_panoptic.ExampleJob(prefix, path) for prefix, path in sorted(images.items())], []
  json_path = os.path.join(root, 'gtFine', f'cityscapes_panoptic_{split}_trainId.json')
  if not os.path.exists(json_path):
    raise coco_panoptic.ConversionError(
        f'{json_path}: not found; fix: create it with cityscapesscripts: '
        f'python -m cityscapesscripts.preparation.createPanopticImgs --dataset-folder '
        f'{os.path.join(root, "gtFine")} --use-train-id --set-names {split}')
  parsed = coco_panoptic.read_panoptic_json(
      json_path, os.path.join(root, 'gtFine', f'cityscapes_panoptic_{split}_trainId'), None)
  jobs, defects = [], list(parsed.defects)
  for job in parsed.jobs:
    # The JSON's image file names are not those of leftImg8bit; match by the shared prefix.
    png_name = os.path.basename(job.png_path)
    prefix = png_name[:-len(_PANOPTIC_SUFFIX)] if png_name.endswith(_PANOPTIC_SUFFIX) else job.name
    image_path = images.pop(prefix, None)
    if image_path is None:
      defects.append(coco_panoptic.Defect(
          coco_panoptic.MISSING_FILE, json_path,
          f'no leftImg8bit image {prefix}{_IMAGE_SUFFIX}.png for annotation {png_name}'))
      continue
    jobs.append(dataclasses.replace(job, name=prefix, image_path=image_path))
  for prefix, path in sorted(images.items()):
    defects.append(coco_panoptic.Defect(coco_panoptic.MISSING_ANNOTATION, path,
                                        f'image {prefix} has no annotation in {json_path}'))
  return sorted(jobs, key=lambda j: j.name), defects


def label_spec(treat_crowd_as_ignore: bool = True) -> coco_panoptic.LabelSpec:
  descriptor = datasets.get_built_in(datasets.CITYSCAPES_PANOPTIC)
  # createPanopticImgs --use-train-id writes train ids as category ids.
  return coco_panoptic.spec_from_descriptor(
      descriptor, treat_crowd_as_ignore,
      category_to_train_id={i: i for i in range(descriptor.num_classes)})


def build(cityscapes_root: str, output_dir: str, splits=SPLITS,
          treat_crowd_as_ignore: bool = True, num_shards: int = 0, num_workers: int = 1,
          overwrite: bool = False, show_progress: bool = True) -> list:
  spec = label_spec(treat_crowd_as_ignore)
  return conversion.convert_built_in_splits(
      cityscapes_root, output_dir, splits, split_jobs, spec, datasets.CITYSCAPES_PANOPTIC,
      NUM_SHARDS, num_shards, num_workers, overwrite, show_progress,
      f'{cityscapes_root}: no leftImg8bit/{{train,val,test}} images; fix: point '
      '--cityscapes_root at the folder holding leftImg8bit/ and gtFine/')


def define_flags():
  conversion.add_built_in_flags('cityscapes_root', 'Cityscapes root (leftImg8bit/, gtFine/).',
                                SPLITS, NUM_SHARDS)


main = conversion.built_in_main(build, 'cityscapes_root')


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
