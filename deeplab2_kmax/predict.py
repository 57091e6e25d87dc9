"""Panoptic predictions for image files, from an export (SavedModel, ONNX or LiteRT) or a
training checkpoint.

    python -m deeplab2_kmax.predict (--model=M | --config_file=F --checkpoint_path=C) \
        --input=PATH_OR_GLOB --output_dir=D

For each image `<stem>.<ext>` it writes, under D:

| file                      | content                                                       |
|---------------------------|---------------------------------------------------------------|
| panoptic/<stem>.png       | COCO panoptic PNG: segment id = R + 256 G + 256^2 B, 0 = void |
| overlay/<stem>.png        | the image with each segment in its class colour, and a legend |
|                           | of the classes present                                        |
| segments/<stem>.json      | COCO `segments_info` (id, category_id, iscrowd, area, bbox)   |
|                           | plus each segment's class name, score and panoptic label      |

and `panoptic.json`, the COCO panoptic document of all images (with `categories`). M may be the
export's base path (its newest SavedModel version is used), a version folder, or a model.onnx /
model.tflite file of the export (run in ONNX Runtime / the LiteRT interpreter; the label space is
read from its folder's assets.extra, or from the .onnx metadata). A progress bar with ETA
goes to stderr.
"""

import io
import json
import os
import sys
from typing import Optional

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from deeplab2_kmax import command_line
from deeplab2_kmax import common
from deeplab2_kmax import config as config_lib
from deeplab2_kmax import export as export_lib
from deeplab2_kmax.export import runtimes
from deeplab2_kmax import progress as progress_lib
from deeplab2_kmax import visualization
from deeplab2_kmax.config import flags as config_flags
from deeplab2_kmax.evaluation import formats
from deeplab2_kmax.trainer import checkpoints

PANOPTIC_DIR = 'panoptic'
OVERLAY_DIR = 'overlay'
SEGMENTS_DIR = 'segments'
PANOPTIC_JSON = 'panoptic.json'
# Overlays of small images are enlarged (nearest) to at least this height, so they can be read.
MIN_OVERLAY_HEIGHT = 256
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')


class Predictor:
  """Runs the image_bytes signature (or its in-process equivalent) on encoded images.

  Attributes:
    descriptor: the DatasetDescriptor of the model's label space.
    source: what the predictions come from (for messages).
  """

  def __init__(self, function, descriptor, source: str):
    self._function = function
    self.descriptor = descriptor
    self.source = source

  @classmethod
  def from_saved_model(cls, saved_model: str) -> 'Predictor':
    directory = export_lib.latest_version_dir(saved_model)
    loaded = tf.saved_model.load(directory)
    if export_lib.SIGNATURE_IMAGE_BYTES in loaded.signatures:
      signature = loaded.signatures[export_lib.SIGNATURE_IMAGE_BYTES]
      function = lambda data: signature(image_bytes=tf.constant([data]))
    else:
      signature = loaded.signatures[export_lib.SIGNATURE_IMAGE_TENSOR]
      function = lambda data: signature(
          images=tf.io.decode_image(data, channels=3, expand_animations=False)[tf.newaxis])
    # Keep the loaded object alive with the signature that belongs to it.
    function.loaded = loaded
    return cls(function, export_lib.load_descriptor(directory), directory)

  @classmethod
  def from_model(cls, path: str) -> 'Predictor':
    """Any export format (export/runtimes.py): a SavedModel folder, a .onnx or a .tflite file."""
    kind = runtimes.format_of(path)
    if kind == 'saved_model':
      return cls.from_saved_model(path)
    runtime = runtimes.load(path)
    if runtime.descriptor is None:
      raise FileNotFoundError(
          f'{path} comes without its label space: deeplab2_kmax.export writes it to '
          f'{export_lib.descriptor_path(os.path.dirname(os.path.abspath(path)))}; keep the '
          'file in its export folder.')

    def function(data):
      # ONNX and LiteRT have no image decoder: decode here, as the image_bytes signature does.
      try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
      except tf.errors.InvalidArgumentError:
        raise tf.errors.InvalidArgumentError(
            None, None, 'not a JPEG, PNG, GIF, BMP or WebP image; its first bytes are '
            f'{data[:8]!r}') from None
      return runtime(image[np.newaxis])

    function.runtime = runtime
    return cls(function, runtime.descriptor, f'{path} ({kind})')

  @classmethod
  def from_checkpoint(cls, config, checkpoint_path: str) -> 'Predictor':
    module = export_lib.build_serving_module(config)
    restored = export_lib.restore_model(module.model, checkpoint_path)
    signature = module.signatures(['image_bytes'])[export_lib.SIGNATURE_IMAGE_BYTES]
    return cls(lambda data: signature(image_bytes=tf.constant([data])), module.descriptor,
               restored)

  def __call__(self, data: bytes) -> dict[str, np.ndarray]:
    """Predictions of one encoded image, each cropped to the image: [height, width] maps and
    the per-segment arrays trimmed to the segments found."""
    outputs = {key: np.asarray(value)[0] for key, value in self._function(data).items()}
    height, width = (int(x) for x in outputs[export_lib.IMAGE_SIZE])
    result = {}
    for key, value in outputs.items():
      if key in export_lib.PREDICTION_KEYS:
        result[key] = value[:height, :width]
      elif key in export_lib.SEGMENT_KEYS and key != export_lib.NUM_SEGMENTS:
        result[key] = value[:int(outputs[export_lib.NUM_SEGMENTS])]
      else:
        result[key] = value
    return result


def resolve_inputs(pattern: str) -> list[str]:
  """Image files named by a path, a folder or a glob, sorted."""
  if tf.io.gfile.isdir(pattern):
    files = [os.path.join(pattern, name) for name in tf.io.gfile.listdir(pattern)
             if name.lower().endswith(_IMAGE_EXTENSIONS)]
  else:
    files = tf.io.gfile.glob(pattern)
  files = sorted(files)
  if not files:
    raise FileNotFoundError(f'--input "{pattern}" matches no image file; give a file, a folder '
                            'or a glob such as "images/*.jpg".')
  return files


def _legend_font():
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top  (only overlays need it)
  try:
    return ImageFont.load_default(size=13)
  except TypeError:  # Pillow < 10.1 has one fixed bitmap size
    return ImageFont.load_default()


def overlay_with_legend(image: np.ndarray, panoptic: np.ndarray, descriptor) -> np.ndarray:
  """uint8 [H, W, 3] image + [H, W] panoptic ids -> overlay with a legend panel on its right.

  The overlay is enlarged by an integer factor to at least MIN_OVERLAY_HEIGHT rows; the legend
  lists each class present (void excluded) with its colour and its number of segments.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  colors = visualization.colorize_panoptic(panoptic, descriptor)
  blended = visualization.overlay(image, colors, alpha=0.6)
  scale = max(1, -(-MIN_OVERLAY_HEIGHT // max(1, image.shape[0])))
  blended = np.repeat(np.repeat(blended, scale, axis=0), scale, axis=1)
  divisor = descriptor.panoptic_label_divisor
  labels = np.unique(panoptic)
  classes = [int(c) for c in np.unique(labels // divisor) if c != descriptor.ignore_label
             and 0 <= c < descriptor.num_classes]
  font = _legend_font()
  row_height, swatch = 18, 12
  names = [f'{descriptor.class_names[c]} ({int(np.sum(labels // divisor == c))})'
           for c in classes] or ['(no segment)']
  text_width = max(int(ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength(n, font=font))
                   for n in names)
  legend_width = swatch + 16 + text_width
  height = max(blended.shape[0], row_height * len(names) + 8)
  canvas = Image.new('RGB', (blended.shape[1] + legend_width, height), (255, 255, 255))
  canvas.paste(Image.fromarray(blended), (0, 0))
  draw = ImageDraw.Draw(canvas)
  left = blended.shape[1] + 6
  for row, (name, class_id) in enumerate(zip(names, classes or [None])):
    top = 4 + row * row_height
    if class_id is not None:
      draw.rectangle([left, top + 2, left + swatch, top + 2 + swatch],
                     fill=tuple(int(v) for v in descriptor.colors[class_id]), outline=(0, 0, 0))
    draw.text((left + swatch + 6, top), name, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def segments_info(panoptic: np.ndarray, predictions: dict, descriptor, file_name: str,
                  image_id) -> tuple[np.ndarray, dict]:
  """COCO segment ids [height, width] and the COCO annotation of one prediction, its segments
  with their class name, score and panoptic label added."""
  ids, segments = formats.segments_from_panoptic_label(
      panoptic, formats.LabelSpace.from_descriptor(descriptor), image_name=file_name)
  # Both number segments in increasing panoptic label order, so they pair up one to one.
  labels = predictions[export_lib.SEGMENT_IDS]
  if len(labels) != len(segments):
    raise RuntimeError(f'{file_name}: the model reports {len(labels)} segments, the panoptic '
                       f'map holds {len(segments)}.')
  for segment, label, score in zip(segments, labels,
                                   predictions[export_lib.SEGMENT_SCORES]):
    segment['panoptic_label'] = int(label)
    segment['category_name'] = descriptor.class_names[int(label) //
                                                      descriptor.panoptic_label_divisor]
    segment['score'] = round(float(score), 6)
  return ids, {'image_id': image_id, 'file_name': file_name, 'segments_info': segments}


def predict_files(predictor: Predictor, files: list[str], output_dir: str,
                  show_progress: bool = True) -> list[dict]:
  """Writes the files of the module docstring for each image; returns the annotations."""
  descriptor = predictor.descriptor
  for folder in (PANOPTIC_DIR, OVERLAY_DIR, SEGMENTS_DIR):
    tf.io.gfile.makedirs(os.path.join(output_dir, folder))
  progress = progress_lib.Progress(len(files), label='predict', unit='images',
                                   stream=sys.stderr if show_progress else io.StringIO())
  annotations = []
  for path in files:
    stem = os.path.splitext(os.path.basename(path))[0]
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
    try:
      predictions = predictor(data)
    except tf.errors.InvalidArgumentError as error:
      raise ValueError(f'{path}: {error.message.splitlines()[0]}') from None
    panoptic = predictions[common.PRED_PANOPTIC]
    ids, annotation = segments_info(panoptic, predictions, descriptor, f'{stem}.png', stem)
    formats.write_png(os.path.join(output_dir, PANOPTIC_DIR, f'{stem}.png'),
                      formats.id_to_rgb(ids))
    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    formats.write_png(os.path.join(output_dir, OVERLAY_DIR, f'{stem}.png'),
                      overlay_with_legend(image, panoptic, descriptor))
    with tf.io.gfile.GFile(os.path.join(output_dir, SEGMENTS_DIR, f'{stem}.json'), 'w') as f:
      json.dump(annotation, f, indent=1)
    annotations.append(annotation)
    progress.update()
  progress.close()
  document = formats.coco_panoptic_json(annotations, formats.coco_categories(descriptor))
  with tf.io.gfile.GFile(os.path.join(output_dir, PANOPTIC_JSON), 'w') as f:
    json.dump(document, f)
  return annotations


# ---- Command line ----


def define_flags():
  config_flags.define_config_flags(required=False)
  flags.DEFINE_string('model', None, 'Export of deeplab2_kmax.export in any format: its '
                      '--output_path or a version folder (SavedModel, the newest version is '
                      'used), or a model.onnx (ONNX Runtime) or model.tflite (LiteRT) file.')
  flags.DEFINE_string('saved_model', None, 'Same as --model (kept for older scripts).')
  flags.DEFINE_string('checkpoint_path', None, 'With --config_file: a checkpoint prefix or a '
                      'folder of checkpoints (the newest is used).')
  flags.DEFINE_string('input', None, 'Image file, folder or glob.', required=True)
  flags.DEFINE_string('output_dir', None, 'Where predictions go.', required=True)


def make_predictor(model: Optional[str], config_file: Optional[str],
                   checkpoint_path: Optional[str]) -> Predictor:
  if bool(model) == bool(config_file or checkpoint_path):
    raise app.UsageError('pass either --model or both --config_file and --checkpoint_path.')
  if model:
    return Predictor.from_model(model)
  if not (config_file and checkpoint_path):
    raise app.UsageError('--config_file and --checkpoint_path go together.')
  return Predictor.from_checkpoint(config_flags.load_from_flags(inference=True), checkpoint_path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  values = flags.FLAGS
  try:
    if values.model and values.saved_model and values.model != values.saved_model:
      raise app.UsageError('--model and --saved_model name the same thing; pass one.')
    predictor = make_predictor(values.model or values.saved_model, values.config_file,
                               values.checkpoint_path)
    files = resolve_inputs(values.input)
    annotations = predict_files(predictor, files, values.output_dir)
  except (config_lib.ConfigError, checkpoints.CheckpointMismatchError, FileNotFoundError,
          ValueError, ImportError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  segments = sum(len(a['segments_info']) for a in annotations)
  first = os.path.join(values.output_dir, OVERLAY_DIR, annotations[0]['file_name'])
  print(f'[predict] {len(annotations)} images, {segments} segments, from {predictor.source}; '
        f'panoptic PNGs, overlays and segments JSON in {values.output_dir}; first overlay: '
        f'{first}', flush=True)
  return 0


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
