"""Builds the synthetic panoptic dataset (the README's default data).

    python -m deeplab2_kmax.data.build.synthetic --output_dir=/tmp/synthetic \
        --num_train=1000 --num_val=100 [--size=129] [--seed=0]

Writes, deterministically for a given seed and size:
  train-00000-of-0000N.tfrecord ...  DeepLab2-format examples (PNG image, raw int32 panoptic)
  val-00000-of-0000M.tfrecord ...
  val_images/<name>.png              the val images, for predict
  panoptic_val.json, panoptic_val/   COCO panoptic ground truth of the val split, for the
                                     official-format evaluator
  dataset_info.json                  counts, size, seed, class table

Configs in configs/synthetic/ find the data through ${SYNTHETIC_DATA_DIR}.
"""

import json
import multiprocessing
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

from deeplab2_kmax import command_line
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.synthetic import scenes as synthetic_scenes
from deeplab2_kmax.progress import Progress

LABEL_DIVISOR = 256
_SPLIT_SEED_OFFSET = {'train': 0, 'val': 1}

def image_name(split: str, index: int) -> str:
  return f'synthetic_{split}_{index:06d}'


def render_example(job):
  """Draws and encodes one scene (runs in a worker process; no TensorFlow here).

  Returns:
    (name, image_png, panoptic int32 [h, w], gt_png or None, segments_info or None)
  """
  split, index, seed, height, width, with_coco_gt = job
  scene = synthetic_scenes.generate_scene([seed, _SPLIT_SEED_OFFSET[split], index],
                                          height, width)
  panoptic = scene.panoptic(LABEL_DIVISOR).astype(np.int32)
  # zlib level 1: level 6 makes these photo-like images ~1% smaller for 1.4-1.8x the time.
  image_png = png_encoding.encode_png(scene.image, compression=1)
  gt_png, segments = None, None
  if with_coco_gt:
    # COCO segment ids: void pixels are 0 and not listed; others use the panoptic id, which is
    # unique per segment and never 0 because void is the only class 0.
    segment_ids = np.where(scene.semantic == synthetic_scenes.VOID, 0, panoptic)
    segments = []
    for segment_id in np.unique(segment_ids):
      if segment_id == 0:
        continue
      mask = segment_ids == segment_id
      segments.append({
          'id': int(segment_id),
          'category_id': int(segment_id // LABEL_DIVISOR),
          'area': int(mask.sum()),
          'bbox': coco_panoptic.segment_bbox(mask),
          'iscrowd': 0,
      })
    gt_png = png_encoding.encode_png(panoptic_rgb.id_to_rgb(segment_ids))
  return image_name(split, index), image_png, panoptic, gt_png, segments


def coco_categories():
  """The COCO "categories" of the synthetic dataset, with a "supercategory" as COCO's have."""
  descriptor = datasets.get_built_in(datasets.SYNTHETIC_PANOPTIC)
  return [dict(c, supercategory='thing' if c['isthing'] else 'stuff')
          for c in coco_panoptic.coco_categories(descriptor)]


def parse_size(text: str) -> tuple[int, int]:
  """(height, width) of --size, "S" (square) or "H,W", read as any crop size is."""
  try:
    height, width = datasets.crop_size_of(text.split(','), '--size')
  except ValueError:
    height = width = 0
  if min(height, width) < 17:
    raise ValueError(f'--size="{text}" must be "S" or "H,W" with sides >= 17')
  return height, width


def build(output_dir: str, num_train: int, num_val: int, height: int = 129, width: int = 129,
          seed: int = 0, examples_per_shard: int = 500, num_workers: int = 0,
          show_progress: bool = True) -> dict:
  """Writes the dataset; returns the dataset_info dict (also written as JSON)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.formats import tfrecord  # pylint: disable=g-import-not-at-top

  os.makedirs(output_dir, exist_ok=True)
  start = time.monotonic()
  num_workers = num_workers or os.cpu_count() or 1
  # "spawn" keeps TensorFlow (already imported here) out of the workers.
  context = multiprocessing.get_context('spawn')
  pool = context.Pool(num_workers) if num_workers > 1 else None
  info = {'seed': seed, 'height': height, 'width': width, 'label_divisor': LABEL_DIVISOR,
          'splits': {}, 'categories': coco_categories()}
  try:
    for split, count in (('train', num_train), ('val', num_val)):
      if count <= 0:
        continue
      with_gt = split == 'val'
      if with_gt:
        os.makedirs(os.path.join(output_dir, 'panoptic_val'), exist_ok=True)
        os.makedirs(os.path.join(output_dir, 'val_images'), exist_ok=True)
      jobs = [(split, i, seed, height, width, with_gt) for i in range(count)]
      results = (pool.imap(render_example, jobs, chunksize=16) if pool
                 else map(render_example, jobs))
      num_shards = max(1, -(-count // examples_per_shard))
      progress = Progress(count, label=f'synthetic {split}', unit='images',
                          stream=sys.stderr if show_progress else open(os.devnull, 'w'))
      annotations, images = [], []
      writer = None
      for index, (name, image_png, panoptic, gt_png, segments) in enumerate(results):
        shard = index * num_shards // count
        if writer is None or shard != writer[0]:
          if writer is not None:
            writer[1].close()
          path = os.path.join(output_dir, f'{split}-{shard:05d}-of-{num_shards:05d}.tfrecord')
          # Written under a temporary name and renamed when complete, so an interrupted run
          # never leaves a shard that looks whole.
          writer = (shard, tf.io.TFRecordWriter(path + '.tmp'), path)
        writer[1].write(tfrecord.encode_example(image_png, 'png', name, height, width,
                                                panoptic_label=panoptic))
        if writer is not None and (index + 1 == count or
                                   (index + 1) * num_shards // count != shard):
          writer[1].close()
          os.replace(writer[2] + '.tmp', writer[2])
          writer = None
        if with_gt:
          with open(os.path.join(output_dir, 'panoptic_val', name + '.png'), 'wb') as f:
            f.write(gt_png)
          with open(os.path.join(output_dir, 'val_images', name + '.png'), 'wb') as f:
            f.write(image_png)
          images.append({'id': name, 'file_name': name + '.png', 'height': height,
                         'width': width})
          annotations.append({'image_id': name, 'file_name': name + '.png',
                              'segments_info': segments})
        progress.update(1)
      progress.close()
      info['splits'][split] = {'num_examples': count, 'num_shards': num_shards}
      if with_gt:
        with open(os.path.join(output_dir, 'panoptic_val.json'), 'w') as f:
          json.dump({'images': images, 'annotations': annotations,
                     'categories': info['categories']}, f)
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  info['seconds'] = round(time.monotonic() - start, 3)
  with open(os.path.join(output_dir, 'dataset_info.json'), 'w') as f:
    json.dump({k: v for k, v in info.items() if k != 'seconds'}, f, indent=1)
  return info


def define_flags():
  """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
  flags.DEFINE_string('output_dir', None, 'Folder to write the dataset into.')
  flags.DEFINE_integer('num_train', 1000, 'Number of training images.')
  flags.DEFINE_integer('num_val', 100, 'Number of validation images.')
  flags.DEFINE_string('size', '129', 'Image size: "S" (square) or "H,W".')
  flags.DEFINE_integer('seed', 0, 'Seed; equal seeds give identical files.')
  flags.DEFINE_integer('examples_per_shard', 500, 'Examples per TFRecord shard.')
  flags.DEFINE_integer('num_workers', 0, 'Worker processes drawing scenes (0 = one per core).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f.output_dir:
    print('error: --output_dir is required', file=sys.stderr)
    return 1
  try:
    height, width = parse_size(f.size)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  info = build(f.output_dir, f.num_train, f.num_val, height, width, f.seed,
               f.examples_per_shard, f.num_workers)
  total = f.num_train + f.num_val
  print(f'wrote {total} images ({height}x{width}) to {f.output_dir} in '
        f'{info["seconds"]:.1f} s ({total / max(info["seconds"], 1e-9):.0f} images/s)')
  return 0


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
