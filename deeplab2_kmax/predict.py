"""Panoptic predictions for image files, from an export (SavedModel, ONNX or LiteRT) or a
training checkpoint.

    python -m deeplab2_kmax.predict (--model=M | --config_file=F --checkpoint_path=C) \
        --input=PATH_OR_GLOB --output_dir=D [--fail_fast]

For each image `<stem>.<ext>` it writes, under D (two inputs of one stem, such as x.jpg and
x.png, or a/x.jpg and b/x.jpg, are told apart by their extension, then by their folders:
`x_jpg`, `x_png`, `a_x_jpg`; the stem is also the image_id in panoptic.json):

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
read from its folder's assets.extra, or from the .onnx metadata). With --config_file,
--checkpoint_path takes a ckpt-N prefix, a folder of checkpoints or a model-zoo name
(`python -m deeplab2_kmax.model_zoo list`; DeepLab2's checkpoints are converted on the fly).
A progress bar with ETA goes to stderr.

Bad input files (unreadable, empty, not an image, refused by the model) are skipped: the others
are predicted and panoptic.json is written for them; then a summary lists each skipped file
with its reason, and the exit status is 1. With --fail_fast the first bad file stops the run
(exit status 1, no panoptic.json). An --output_dir that cannot be a folder, a missing model or
checkpoint, and an --input that matches nothing stop before any prediction, with one line.
"""

import collections
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
from deeplab2_kmax import output_folder
from deeplab2_kmax.export import runtimes
from deeplab2_kmax import progress as progress_lib
from deeplab2_kmax import visualization
from deeplab2_kmax.checkpoint import layout as checkpoint_layout
from deeplab2_kmax.checkpoint import model_restore
from deeplab2_kmax.checkpoint import paths as checkpoint_paths
from deeplab2_kmax.config import flags as config_flags
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding
from deeplab2_kmax.data.formats import tfrecord
from deeplab2_kmax.evaluation import formats
from deeplab2_kmax.export import serving_module

PANOPTIC_DIR = 'panoptic'
OVERLAY_DIR = 'overlay'
SEGMENTS_DIR = 'segments'
PANOPTIC_JSON = 'panoptic.json'
# Overlays of small images are enlarged (nearest) to at least this height, so they can be read.
MIN_OVERLAY_HEIGHT = 256


class BadInputError(ValueError):
  """An input cannot be predicted; str(error) says why (the caller names the file)."""


class SkippedInputsError(ValueError):
  """predict_files skipped bad inputs after writing the outputs of the others.

  Attributes:
    annotations: the COCO annotations of the images predicted (as predict_files returns).
    failures: [(path, reason)] of the skipped files, in input order.
  """

  def __init__(self, annotations: list, failures: list, total: int, output_dir: str):
    self.annotations = annotations
    self.failures = failures
    if total == 1:
      path, reason = failures[0]
      super().__init__(f'{path}: {reason}')
      return
    if len(failures) == total:
      lines = [f'all {total} input files skipped; nothing predicted ({output_dir}/'
               f'{PANOPTIC_JSON} lists no image):']
    else:
      lines = [f'{len(failures)} of {total} input files skipped; the outputs of the other '
               f'{total - len(failures)} are in {output_dir} ({PANOPTIC_JSON} included):']
    lines += [f'  {path}: {reason}' for path, reason in failures]
    super().__init__('\n'.join(lines))


def image_bytes_problem(data: bytes) -> Optional[str]:
  """Why data cannot be an image ("is empty (0 bytes)", "is not a JPEG, ..."), or None."""
  if not data:
    return 'is empty (0 bytes)'
  if not bool(tfrecord.has_image_signature(tf.constant(data)).numpy()):
    return f'is not a JPEG, PNG, GIF, BMP or WebP image; its first bytes are {data[:8]!r}'
  return None


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
      image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
      return runtime(image[np.newaxis])

    function.runtime = runtime
    return cls(function, runtime.descriptor, f'{path} ({kind})')

  @classmethod
  def from_checkpoint(cls, config, checkpoint_path: str) -> 'Predictor':
    module = export_lib.build_serving_module(config)
    restored = model_restore.restore_model(module.model, checkpoint_path)
    signature = module.signatures(['image_bytes'])[export_lib.SIGNATURE_IMAGE_BYTES]
    return cls(lambda data: signature(image_bytes=tf.constant([data])), module.descriptor,
               restored)

  def __call__(self, data: bytes) -> dict[str, np.ndarray]:
    """Predictions of one encoded image, each cropped to the image: [height, width] maps and
    the per-segment arrays trimmed to the segments found.

    Raises:
      BadInputError: data is not an image, or the model refuses it (the reason in one line).
    """
    problem = image_bytes_problem(data)
    if problem:
      raise BadInputError(problem)
    try:
      raw = self._function(data)
    except tf.errors.InvalidArgumentError as error:
      raise BadInputError(serving_module.error_message(error)) from None
    outputs = {key: np.asarray(value)[0] for key, value in raw.items()}
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
  """Image files named by a path, a folder or a glob, sorted (folders a glob matches are left
  out; any other file it matches is an input, reported if it is no image)."""
  if tf.io.gfile.isdir(pattern):
    files = [os.path.join(pattern, name) for name in tf.io.gfile.listdir(pattern)
             if name.lower().endswith(coco_panoptic.IMAGE_EXTENSIONS)]
  else:
    files = [path for path in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(path)]
  files = sorted(files)
  if not files:
    raise FileNotFoundError(f'--input "{pattern}" matches no image file; give a file, a folder '
                            'or a glob such as "images/*.jpg".')
  return files


def output_stems(files: list[str]) -> list[str]:
  """A distinct output stem (file name without extension, and image_id) for each input file.

  A file's stem is its name without extension, unless another input has the same one: then
  the extension is kept (x.jpg, x.png -> x_jpg, x_png), then its folders below the inputs'
  common folder (a/x.jpg, b/x.jpg -> a_x_jpg, b_x_jpg), then its position in `files`.
  """
  paths = [os.path.abspath(path) for path in files]
  common_folder = os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else ''

  def name(index: int, level: int) -> str:
    path = paths[index]
    if level == 0:
      return os.path.splitext(os.path.basename(path))[0]
    if level == 1:
      return os.path.basename(path).replace('.', '_')
    text = os.path.relpath(path, common_folder).replace(os.sep, '_').replace('.', '_')
    return text if level == 2 else f'{text}_{index}'

  # Only the files in a collision move on to a longer name; the position ends every collision.
  levels = [0] * len(paths)
  while True:
    names = [name(i, level) for i, level in enumerate(levels)]
    counts = collections.Counter(names)
    clashing = [i for i, n in enumerate(names) if counts[n] > 1 and levels[i] < 3]
    if not clashing:
      return names
    for i in clashing:
      levels[i] += 1


def prepare_output_dir(output_dir: str) -> None:
  """Creates output_dir and its folders, or raises ValueError saying why it cannot be one."""
  problem = output_folder.problem('--output_dir', output_dir,
                                  'it is created if missing; the predictions go there')
  if problem:
    raise ValueError(problem)
  for folder in (PANOPTIC_DIR, OVERLAY_DIR, SEGMENTS_DIR):
    tf.io.gfile.makedirs(os.path.join(output_dir, folder))


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


def _read(path: str) -> bytes:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  except (tf.errors.OpError, OSError) as error:
    reason = getattr(error, 'message', None) or str(error)
    raise BadInputError(f'cannot be read ({reason.splitlines()[0]})') from None


def predict_files(predictor: Predictor, files: list[str], output_dir: str,
                  show_progress: bool = True, fail_fast: bool = False) -> list[dict]:
  """Writes the files of the module docstring for each image; returns the annotations.

  Raises:
    SkippedInputsError: after writing every output, when some files were bad (it lists them
      and holds the annotations of the others).
    ValueError: at the first bad file, with fail_fast (panoptic.json is not written).
  """
  descriptor = predictor.descriptor
  prepare_output_dir(output_dir)
  progress = progress_lib.Progress(len(files), label='predict', unit='images',
                                   stream=sys.stderr if show_progress else io.StringIO())
  annotations, failures = [], []
  for path, stem in zip(files, output_stems(files)):
    try:
      data = _read(path)
      predictions = predictor(data)
    except BadInputError as error:
      if fail_fast:
        progress.close()
        raise ValueError(f'{path}: {error} (--fail_fast: stopped here)') from None
      failures.append((path, str(error)))
      progress.update()
      continue
    panoptic = predictions[common.PRED_PANOPTIC]
    ids, annotation = segments_info(panoptic, predictions, descriptor, f'{stem}.png', stem)
    png_encoding.write_png(os.path.join(output_dir, PANOPTIC_DIR, f'{stem}.png'),
                           panoptic_rgb.id_to_rgb(ids))
    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    png_encoding.write_png(os.path.join(output_dir, OVERLAY_DIR, f'{stem}.png'),
                           overlay_with_legend(image, panoptic, descriptor))
    with tf.io.gfile.GFile(os.path.join(output_dir, SEGMENTS_DIR, f'{stem}.json'), 'w') as f:
      json.dump(annotation, f, indent=1)
    annotations.append(annotation)
    progress.update()
  progress.close()
  document = formats.coco_panoptic_json(annotations, coco_panoptic.coco_categories(descriptor))
  with tf.io.gfile.GFile(os.path.join(output_dir, PANOPTIC_JSON), 'w') as f:
    json.dump(document, f)
  if failures:
    raise SkippedInputsError(annotations, failures, len(files), output_dir)
  return annotations


# ---- Command line ----


def define_flags():
  config_flags.define_config_flags(required=False)
  flags.DEFINE_string('model', None, 'Export of deeplab2_kmax.export in any format: its '
                      '--output_path or a version folder (SavedModel, the newest version is '
                      'used), or a model.onnx (ONNX Runtime) or model.tflite (LiteRT) file.')
  flags.DEFINE_string('saved_model', None, 'Same as --model (kept for older scripts).')
  flags.DEFINE_string('checkpoint_path', None, 'With --config_file: a checkpoint prefix, a '
                      'folder of checkpoints (the newest is used) or a model-zoo name.')
  flags.DEFINE_string('input', None, 'Image file, folder or glob.', required=True)
  flags.DEFINE_string('output_dir', None, 'Where predictions go (a folder, created if '
                      'missing).', required=True)
  flags.DEFINE_bool('fail_fast', False, 'Stop at the first bad input file (default: skip bad '
                    'files, predict the others, list the skipped ones at the end and exit 1).')


def make_predictor(model: Optional[str], config_file: Optional[str],
                   checkpoint_path: Optional[str]) -> Predictor:
  if bool(model) == bool(config_file or checkpoint_path):
    raise app.UsageError('pass either --model or both --config_file and --checkpoint_path.')
  if model:
    return Predictor.from_model(model)
  if not (config_file and checkpoint_path):
    raise app.UsageError('--config_file and --checkpoint_path go together.')
  config = config_flags.load_from_flags(inference=True)
  # Before the model is built: a wrong path should not cost its build.
  checkpoint = checkpoint_paths.resolve_checkpoint(checkpoint_path)
  return Predictor.from_checkpoint(config, checkpoint)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  values = flags.FLAGS
  skipped = None
  try:
    if values.model and values.saved_model and values.model != values.saved_model:
      raise app.UsageError('--model and --saved_model name the same thing; pass one.')
    # The output folder and the inputs are checked before the model is loaded.
    prepare_output_dir(values.output_dir)
    files = resolve_inputs(values.input)
    predictor = make_predictor(values.model or values.saved_model, values.config_file,
                               values.checkpoint_path)
    try:
      annotations = predict_files(predictor, files, values.output_dir,
                                  fail_fast=values.fail_fast)
    except SkippedInputsError as error:
      annotations, skipped = error.annotations, error
  except (config_lib.ConfigError, checkpoint_layout.CheckpointMismatchError, FileNotFoundError,
          ValueError, ImportError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  if annotations:
    segments = sum(len(a['segments_info']) for a in annotations)
    first = os.path.join(values.output_dir, OVERLAY_DIR, annotations[0]['file_name'])
    print(f'[predict] {len(annotations)} images, {segments} segments, from {predictor.source}; '
          f'panoptic PNGs, overlays and segments JSON in {values.output_dir}; first overlay: '
          f'{first}', flush=True)
  if skipped:
    # Last, so that it is what the user reads when the run ends.
    print(f'error: {skipped}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
