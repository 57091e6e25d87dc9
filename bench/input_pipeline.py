"""Input-pipeline throughput for the COCO-style kMaX recipe at 641x641.

    python bench/input_pipeline.py [--num_images=64] [--batches=20] [--batch_size=8]

Builds synthetic records of 641x641 (into --data_dir, or a temporary folder), then runs the
training pipeline with the COCO kMaX augmentations (resize to 641, scale 0.3-1.7, AutoAugment
simple policy, panoptic copy-paste 0.5, crop 641) and prints one JSON line.
"""

import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Reuse/write 641x641 synthetic data here.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 64, 'Synthetic training images to build.')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Timed batches (after 3 warm-up batches).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Batch size.')
_CROP = flags.DEFINE_integer('crop', 641, 'Crop size (k * 32 + 1).')

RECIPE = '''
dataset: "synthetic_panoptic" batch_size: {batch} crop_size: [{crop}, {crop}]
min_resize_value: {crop} max_resize_value: {crop} max_thing_id: 64
augmentations {{
  min_scale_factor: 0.3 max_scale_factor: 1.7 scale_factor_step_size: 0.1
  autoaugment_policy_name: "simple_classification_policy"
  panoptic_copy_paste {{ panoptic_copy_paste_scale: 0.5 panoptic_copy_paste_thing_option: "all"
                         panoptic_copy_paste_stuff_option: "random"
                         panoptic_copy_paste_void_option: "none" }}
}}
'''


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.data.build import synthetic as build_synthetic_data
  from deeplab2_kmax.data.input import pipeline  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.protos import dataset_pb2  # pylint: disable=g-import-not-at-top

  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix='bench_input_')
  crop = _CROP.value
  if not tf.io.gfile.glob(os.path.join(data_dir, 'train-*.tfrecord')):
    build_synthetic_data.build(data_dir, _NUM_IMAGES.value, 0, crop, crop, seed=0,
                               examples_per_shard=16, show_progress=False)
  options = text_format.Parse(RECIPE.format(batch=_BATCH_SIZE.value, crop=crop),
                              dataset_pb2.DatasetOptions())
  options.file_pattern.append(os.path.join(data_dir, 'train-*.tfrecord'))
  iterator = iter(pipeline.InputPipeline(options, is_training=True).dataset())
  for _ in range(3):
    next(iterator)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  seconds = time.perf_counter() - start
  images = _BATCHES.value * _BATCH_SIZE.value
  print(json.dumps({
      'benchmark': 'input_pipeline', 'crop': crop, 'batch_size': _BATCH_SIZE.value,
      'timed_batches': _BATCHES.value, 'images_per_s': round(images / seconds, 2),
      'augmentations': 'resize+scale0.3-1.7+autoaugment+copy_paste0.5+crop+flip',
      'tf_version': tf.__version__, 'cpu_count': os.cpu_count(),
      'machine': platform.processor() or platform.machine(),
      'date': time.strftime('%Y-%m-%d')}))


if __name__ == '__main__':
  app.run(main)
