"""Conversion throughput of COCO-format data at 640x480 (issue #9).

    python bench/convert_coco.py [--num_images=200] [--num_workers=2] [--data_dir=DIR] \
        [--repeat=1]

Makes synthetic COCO panoptic data once (data/build/synthetic.py's val split at 480x640: JSON,
RGB-id PNGs; images re-encoded as JPEG like COCO's), then times
data/build/coco_format.py (read JSON, decode PNG + JPEG, check, map to train ids, serialize,
write shards) and prints one JSON line.
"""

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

_NUM_IMAGES = flags.DEFINE_integer('num_images', 200, 'Images to convert.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Conversion worker processes.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Reuse/write the source data here.')
_REPEAT = flags.DEFINE_integer('repeat', 1, 'List every image this many times (as symlinked '
                               'copies), to time long runs without generating more scenes.')
_HEIGHT, _WIDTH = 480, 640


def make_source(data_dir: str, count: int) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.data.build import synthetic as build_synthetic_data
  if os.path.exists(os.path.join(data_dir, 'panoptic_coco.json')):
    return
  build_synthetic_data.build(data_dir, 0, count, _HEIGHT, _WIDTH, seed=0, show_progress=False)
  os.makedirs(os.path.join(data_dir, 'images'), exist_ok=True)
  with open(os.path.join(data_dir, 'panoptic_val.json')) as f:
    data = json.load(f)
  for image in data['images']:
    stem = image['file_name'][:-4]
    pixels = tf.io.decode_png(tf.io.read_file(os.path.join(data_dir, 'val_images',
                                                           image['file_name'])), 3)
    tf.io.write_file(os.path.join(data_dir, 'images', stem + '.jpg'),
                     tf.io.encode_jpeg(pixels, quality=90))
    image['file_name'] = stem + '.jpg'
  with open(os.path.join(data_dir, 'panoptic_coco.json'), 'w') as f:
    json.dump(data, f)


def repeated_json(data_dir: str, repeat: int) -> str:
  """A JSON listing each image `repeat` times under distinct names (symlinks)."""
  if repeat <= 1:
    return os.path.join(data_dir, 'panoptic_coco.json')
  with open(os.path.join(data_dir, 'panoptic_coco.json')) as f:
    data = json.load(f)
  images, annotations = [], []
  for k in range(repeat):
    for image, annotation in zip(data['images'], data['annotations']):
      stem = f'{image["file_name"][:-4]}_r{k}'
      for folder, old, new in (('images', image['file_name'], stem + '.jpg'),
                               ('panoptic_val', annotation['file_name'], stem + '.png')):
        link = os.path.join(data_dir, folder, new)
        if k and not os.path.lexists(link):
          os.symlink(old, link)
      name = image['file_name'] if k == 0 else stem + '.jpg'
      images.append(dict(image, id=f'{image["id"]}_r{k}', file_name=name))
      annotations.append(dict(annotation, image_id=f'{image["id"]}_r{k}',
                              file_name=annotation['file_name'] if k == 0 else stem + '.png'))
  path = os.path.join(data_dir, f'panoptic_coco_x{repeat}.json')
  with open(path, 'w') as f:
    json.dump(dict(data, images=images, annotations=annotations), f)
  return path


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.data.build import coco_format as build_coco_format_data

  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix='bench_convert_')
  make_source(data_dir, _NUM_IMAGES.value)
  json_path = repeated_json(data_dir, _REPEAT.value)
  out = tempfile.mkdtemp(prefix='bench_convert_out_')
  try:
    start = time.perf_counter()
    results = build_coco_format_data.build(
        os.path.join(data_dir, 'images'), json_path, out,
        panoptic_png_dir=os.path.join(data_dir, 'panoptic_val'), split='train',
        num_workers=_NUM_WORKERS.value, show_progress=False)
    seconds = time.perf_counter() - start
    size_mb = sum(os.path.getsize(p) for p in results[0].files) / 2 ** 20
  finally:
    shutil.rmtree(out, ignore_errors=True)
  count = results[0].num_examples
  print(json.dumps({
      'benchmark': 'convert_coco_format', 'images': count, 'distinct_images': _NUM_IMAGES.value, 'size': f'{_WIDTH}x{_HEIGHT}',
      'num_workers': _NUM_WORKERS.value, 'seconds': round(seconds, 2),
      'images_per_s': round(count / seconds, 2), 'output_mb': round(size_mb, 1),
      'tf_version': tf.__version__, 'cpu_count': os.cpu_count(), 'machine': platform.machine(),
      'date': datetime.date.today().isoformat()}))


if __name__ == '__main__':
  app.run(main)
