"""Small generated panoptic scenes written in real source formats, and an independent reference
for the panoptic maps the converters must produce."""

import json
import os

import numpy as np
import tensorflow as tf

from deeplab2_kmax.data.formats import png_encoding


def draw_scene(rng, height, width, stuff_ids, thing_ids, num_things=3, crowd_id=None,
               void_band=True):
  """Segments of one scene.

  Returns:
    (segment_ids int32 [h, w] with 0 = void, segments: list of dicts with id, category_id,
     iscrowd; ids are unique, nonzero and large enough to use all three RGB channels).
  """
  ids = np.zeros((height, width), np.int32)
  segments = []

  def add(category, iscrowd, mask):
    sid = int(rng.integers(1, 2 ** 24 - 1))
    while sid in {s['id'] for s in segments}:
      sid = int(rng.integers(1, 2 ** 24 - 1))
    ids[mask] = sid
    segments.append({'id': sid, 'category_id': int(category), 'iscrowd': int(iscrowd)})

  rows = np.arange(height)[:, None]
  cols = np.arange(width)[None, :]
  split = height // 2
  add(stuff_ids[0], 0, np.broadcast_to(rows < split, (height, width)))
  add(stuff_ids[1 % len(stuff_ids)], 0, np.broadcast_to(rows >= split, (height, width)))
  for k in range(num_things):
    y0, x0 = int(rng.integers(0, height - 6)), int(rng.integers(0, width - 6))
    h, w = int(rng.integers(3, max(4, height // 3))), int(rng.integers(3, max(4, width // 3)))
    add(thing_ids[k % len(thing_ids)], 0,
        (rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w))
  if crowd_id is not None:
    add(crowd_id, 1, (rows >= height - 4) & (cols < width // 3))
  if void_band:
    ids[:, -2:] = 0
  # Drop segments that were painted over entirely.
  present = set(np.unique(ids).tolist())
  return ids, [s for s in segments if s['id'] in present]


def with_areas(ids, segments):
  """segments_info entries as COCO writes them (area, bbox)."""
  result = []
  for s in segments:
    ys, xs = np.nonzero(ids == s['id'])
    result.append(dict(s, area=int(len(ys)), bbox=[int(xs.min()), int(ys.min()),
                                                   int(xs.max() - xs.min() + 1),
                                                   int(ys.max() - ys.min() + 1)]))
  return result


def random_image(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_jpeg(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_jpeg(image, quality=90))


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if array.dtype == np.uint16:
    data = tf.io.encode_png(array[..., None] if array.ndim == 2 else array).numpy()
  else:
    data = png_encoding.encode_png(array)
  with open(path, 'wb') as f:
    f.write(data)


def rgb(ids):
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)


def expected_panoptic(ids, segments, train_id_of, thing_train_ids, ignore, divisor,
                      crowd_as_ignore=True):
  """Reference DeepLab2 panoptic map, computed mask by mask (independent of the converter's
  lookup-table implementation)."""
  out = np.full(ids.shape, ignore * divisor, np.int64)
  counters = {}
  for s in segments:
    mask = ids == s['id']
    train = train_id_of[s['category_id']]
    if train in thing_train_ids:
      if s['iscrowd']:
        out[mask] = (ignore if crowd_as_ignore else train) * divisor
      else:
        counters[train] = counters.get(train, 0) + 1
        out[mask] = train * divisor + counters[train]
    else:
      out[mask] = train * divisor
  return out.astype(np.int32)


def read_back(pattern, dataset_options_text, crop):
  """{image_name: panoptic_raw} read through the evaluation input pipeline."""
  from google.protobuf import text_format
  from deeplab2_kmax.data.input import pipeline
  from deeplab2_kmax.protos import dataset_pb2
  options = text_format.Parse(dataset_options_text, dataset_pb2.DatasetOptions())
  options.file_pattern.append(pattern)
  options.batch_size = 1
  options.crop_size.extend([crop, crop])
  options.max_thing_id = 64
  result = {}
  for batch in pipeline.InputPipeline(options, is_training=False).iterate():
    height, width = batch['size_raw'][0].numpy()
    name = batch['image_name'][0].numpy().decode()
    result[name] = batch['panoptic_raw'][0].numpy()[:height, :width]
  return result
