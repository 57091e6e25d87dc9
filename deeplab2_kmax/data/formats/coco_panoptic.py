"""COCO panoptic format (JSON + PNGs) to DeepLab2 panoptic maps, with validation.

The COCO panoptic format (also written by cityscapesscripts' createPanopticImgs, the ADE20K
panoptic preparation, and many labelling tools):

  panoptic.json  {"images": [{"id", "file_name", "height", "width"}, ...],
                  "annotations": [{"image_id", "file_name" (the PNG),
                                   "segments_info": [{"id", "category_id", "area", "iscrowd",
                                                      "bbox"}, ...]}, ...],
                  "categories": [{"id", "name", "isthing", "color"}, ...]}
  panoptic/*.png RGB; segment id = R + 256 * G + 256^2 * B; id 0 = void (not listed).

A DeepLab2 panoptic map is `semantic * label_divisor + instance` with contiguous train ids
(LabelSpec maps category ids to them). As in DeepLab2's converters: void pixels get the ignore
label; non-crowd things get per-class instance ids counting from 1 in segments_info order;
crowd things get instance 0 and, with treat_crowd_as_ignore, the ignore label; stuff gets
instance 0.

Every problem found is a Defect (kind, file, message, fix); `check_example` collects them all
(the validator reports them), `encode_example_job` refuses an example with an error-level defect
(the converters stop with ConversionError naming the file, segment and fix), and so do
`read_panoptic_png` and `read_panoptic_annotation`, the readers of one PNG or one annotation
that the evaluation uses (PanopticFormatError, of which ConversionError is a kind).

TensorFlow is imported inside the functions that decode files, so worker processes and the
validator import this module cheaply.
"""

import collections
import dataclasses
import json
import os
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from deeplab2_kmax.data.formats import panoptic_rgb
from deeplab2_kmax.data.formats import png_encoding

# ---- Defect kinds ----
MISSING_FILE = 'missing_file'
UNREADABLE_FILE = 'unreadable_file'
BAD_LABEL_PNG = 'bad_label_png'
MISSING_ANNOTATION = 'missing_annotation'
DUPLICATE_ANNOTATION = 'duplicate_annotation'
DUPLICATE_SEGMENT_ID = 'duplicate_segment_id'
RESERVED_SEGMENT_ID = 'reserved_segment_id'
ID_NOT_IN_PNG = 'id_not_in_png'
ID_NOT_IN_JSON = 'id_not_in_json'
AREA_MISMATCH = 'area_mismatch'
CROWD_NOT_UNIQUE = 'crowd_not_unique'
CROWD_ON_STUFF = 'crowd_on_stuff'
INSTANCE_OVERFLOW = 'instance_overflow'
SIZE_MISMATCH = 'size_mismatch'
UNKNOWN_CLASS = 'unknown_class'
INSTANCE_ON_STUFF = 'instance_on_stuff'   # converted records only

FIXES = {
    MISSING_FILE: 'check the folder flags and the "file_name" fields of the JSON',
    UNREADABLE_FILE: 're-export the file (it is truncated or not an image)',
    BAD_LABEL_PNG: 'save panoptic labels as 8-bit RGB PNGs with id = R + 256*G + 256^2*B',
    MISSING_ANNOTATION: 'give every image one "annotations" entry (segments_info may be empty) '
                        'and every annotation an "images" entry',
    DUPLICATE_ANNOTATION: 'keep one "annotations" entry per image_id',
    DUPLICATE_SEGMENT_ID: 'give each segment of an image a distinct id',
    RESERVED_SEGMENT_ID: 'id 0 marks void pixels in the PNG; give segments ids >= 1',
    ID_NOT_IN_PNG: 'remove the segment from segments_info or fix the PNG colours',
    ID_NOT_IN_JSON: "list these ids in the image's segments_info, or paint the pixels 0 (void)",
    AREA_MISMATCH: 'recompute "area" from the PNG (was the PNG resized or saved lossy?)',
    CROWD_NOT_UNIQUE: 'merge the crowd regions of one category into one segment',
    CROWD_ON_STUFF: 'set "iscrowd": 0 (only thing classes have crowd regions)',
    INSTANCE_OVERFLOW: 'use a larger label divisor (e.g. --label_divisor=1000) or fewer '
                       'instances',
    SIZE_MISMATCH: "labels must have the image's height and width (re-export at full size)",
    UNKNOWN_CLASS: 'add the category to "categories" / the dataset descriptor, or fix the '
                   'category_id',
    INSTANCE_ON_STUFF: 'stuff pixels need instance 0; re-convert the dataset',
}

# Kinds that do not stop a conversion (the converter keeps DeepLab2's behaviour for them).
WARNING_KINDS = frozenset({CROWD_NOT_UNIQUE})


class PanopticFormatError(ValueError):
  """Panoptic data that breaks its format (or that the official scripts would reject); the
  message names the file, the segment or value, and what would be right."""


class ConversionError(PanopticFormatError):
  """Bad input data of a converter; str(error) is one line naming the file, the problem and
  the fix."""


@dataclasses.dataclass(frozen=True)
class Defect:
  kind: str
  file: str
  message: str

  @property
  def is_error(self) -> bool:
    return self.kind not in WARNING_KINDS

  def __str__(self) -> str:
    return f'{self.file}: {self.message}; fix: {FIXES[self.kind]}'


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How dataset category ids become DeepLab2 panoptic ids (the converters' direction).

  Not the same concept as evaluation/formats.LabelSpace, which is the other direction: there
  every train id has exactly the one category id of its DatasetDescriptor, read straight from
  it. Here a converter chooses the mapping from the category ids its files hold (the Cityscapes
  converter reads train ids there, not the descriptor's label ids; a COCO-format dataset may
  leave categories out) and how crowd regions are labelled (`treat_crowd_as_ignore`, a choice
  of the conversion run, not of the dataset).
  """
  category_to_train_id: Mapping[int, int]
  thing_train_ids: frozenset
  ignore_label: int
  label_divisor: int
  treat_crowd_as_ignore: bool = True


def spec_from_descriptor(descriptor, treat_crowd_as_ignore: bool = True,
                         category_to_train_id: Optional[Mapping[int, int]] = None) -> LabelSpec:
  """A LabelSpec for a datasets.DatasetDescriptor (category ids from descriptor.category_ids,
  skipping the ignore class, unless given)."""
  if category_to_train_id is None:
    category_to_train_id = {cid: train for train, cid in enumerate(descriptor.category_ids)
                            if train != descriptor.ignore_label}
  return LabelSpec(dict(category_to_train_id), frozenset(descriptor.thing_class_ids),
                   descriptor.ignore_label, descriptor.panoptic_label_divisor,
                   treat_crowd_as_ignore)


@dataclasses.dataclass(frozen=True)
class ExampleJob:
  """One image to convert or check.

  Attributes:
    name: Image file stem (the record's image/filename).
    image_path: The image file.
    png_path: The panoptic PNG, or None for a split without labels.
    segments: segments_info of the image (None without labels).
    json_size: (height, width) listed in the JSON "images" entry, if any.
  """
  name: str
  image_path: str
  png_path: Optional[str] = None
  segments: Optional[tuple] = None
  json_size: Optional[tuple] = None


@dataclasses.dataclass
class ExampleStats:
  segments: int = 0
  things: int = 0
  stuff: int = 0
  crowd: int = 0
  pixels_per_class: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CheckedExample:
  job: ExampleJob
  defects: list
  stats: ExampleStats
  image_bytes: Optional[bytes] = None
  image_format: Optional[str] = None
  image_size: Optional[tuple] = None
  panoptic: Optional[np.ndarray] = None


# ---- JSON ----


@dataclasses.dataclass
class PanopticJson:
  path: str
  categories: list
  jobs: list
  defects: list


def _int_field(entry: dict, key: str, where: str, path: str) -> int:
  if key not in entry:
    raise ConversionError(f'{path}: {where} has no "{key}" field; fix: every entry needs '
                          f'"{key}" (see the COCO panoptic format)')
  try:
    return int(entry[key])
  except (TypeError, ValueError):
    raise ConversionError(f'{path}: {where} has "{key}": {entry[key]!r}, not an integer; '
                          'fix: write ids as integers') from None


def load_json(path: str, name: Optional[str] = None,
              required: tuple[str, ...] = ('annotations',)) -> dict:
  """A COCO panoptic JSON, checked: a dict whose `required` keys are lists, and no
  instance-segmentation (detection) JSON in its place.

  Args:
    path: The JSON file.
    name: How errors name the file besides its path, e.g. the flag that gave it
      ('--gt_json "x.json" does not exist'); None: the path alone.
    required: Keys that must hold lists.

  Raises:
    ConversionError (a PanopticFormatError) naming the file, what is wrong and the fix.
  """
  label = path if name is None else f'{name} "{path}"'
  if not os.path.isfile(path):
    raise ConversionError(f'{label} does not exist; fix: check the path')
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (ValueError, UnicodeDecodeError) as error:
    raise ConversionError(f'{label} is not valid JSON ({error}); fix: re-export the '
                          'annotations') from None
  for key in required:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
      raise ConversionError(f'{label} has no "{key}" list; fix: this must be a COCO panoptic '
                            'JSON ({"images": [...], "annotations": [...], "categories": [...]})')
  first = data['annotations'][0] if data['annotations'] else {}
  if isinstance(first, dict) and 'segments_info' not in first and (
      'segmentation' in first or 'bbox' in first):
    # e.g. labelme / CVAT exports: one entry per object with polygons or RLE (deeplab2 #141).
    raise ConversionError(
        f'{label}: this is a COCO instance-segmentation (detection) JSON, one annotation per '
        'object with "segmentation", not the panoptic format (one annotation per image with '
        'a PNG "file_name" and "segments_info"); fix: convert it to COCO panoptic format '
        'first, e.g. with panopticapi\'s converters/detection2panoptic_coco_format.py')
  return data


def read_categories(data: dict, path: str, require_isthing: bool = True) -> list[dict]:
  """The "categories" list, checked: [{"id": int, "name": str, "isthing": 0/1, ...}]."""
  categories = data.get('categories')
  if not isinstance(categories, list) or not categories:
    raise ConversionError(f'{path}: no "categories" list; fix: list every class as '
                          '{"id": 1, "name": "car", "isthing": 1}')
  result, seen = [], set()
  for index, category in enumerate(categories):
    where = f'categories[{index}]'
    if not isinstance(category, dict):
      raise ConversionError(f'{path}: {where} is not an object')
    cid = _int_field(category, 'id', where, path)
    if cid in seen:
      raise ConversionError(f'{path}: category id {cid} is listed twice; fix: give each '
                            'category a distinct id')
    seen.add(cid)
    if require_isthing and 'isthing' not in category:
      raise ConversionError(
          f'{path}: category {cid} ("{category.get("name", "?")}") has no "isthing" field; '
          'fix: add "isthing": 1 for countable objects or "isthing": 0 for stuff')
    result.append({'id': cid, 'name': str(category.get('name', f'class_{cid}')),
                   'isthing': bool(category.get('isthing', 0)),
                   'color': category.get('color')})
  return result


def coco_categories(descriptor, use_train_ids: bool = False) -> list[dict]:
  """The "categories" list of a COCO panoptic JSON for a dataset (read_categories reads it).

  Args:
    descriptor: A DatasetDescriptor; every train id but its ignore label gets an entry.
    use_train_ids: Key categories by contiguous train id instead of dataset category id.

  Returns:
    [{"id", "name", "isthing": 0 or 1, "color": [r, g, b]}, ...] in train-id order.
  """
  return [{'id': train_id if use_train_ids else int(descriptor.category_ids[train_id]),
           'name': descriptor.class_names[train_id],
           'isthing': int(bool(descriptor.class_has_instances[train_id])),
           'color': list(descriptor.colors[train_id])}
          for train_id in range(descriptor.num_classes) if train_id != descriptor.ignore_label]


def _segments(annotation: dict, where: str, path: str) -> tuple:
  segments = annotation.get('segments_info')
  if not isinstance(segments, list):
    raise ConversionError(f'{path}: {where} has no "segments_info" list; fix: add '
                          '"segments_info": [] for an image without segments')
  result = []
  for index, segment in enumerate(segments):
    seg_where = f'{where}.segments_info[{index}]'
    if not isinstance(segment, dict):
      raise ConversionError(f'{path}: {seg_where} is not an object')
    area = segment.get('area')
    result.append({'id': _int_field(segment, 'id', seg_where, path),
                   'category_id': _int_field(segment, 'category_id', seg_where, path),
                   'iscrowd': int(segment.get('iscrowd', 0) or 0),
                   'area': None if area is None else int(round(float(area)))})
  return tuple(result)


def read_panoptic_json(path: str, png_dir: str, images_dir: Optional[str],
                       data: Optional[dict] = None) -> PanopticJson:
  """Reads a COCO panoptic JSON into ExampleJobs (sorted by name) and structural defects.

  Images are found through the "images" entry of each annotation's image_id
  (images_dir/file_name); without one, by the PNG's stem with any image extension in images_dir.
  """
  data = load_json(path) if data is None else data
  images = data.get('images') or []
  images_by_id = {}
  for index, image in enumerate(images):
    if not isinstance(image, dict) or 'id' not in image or 'file_name' not in image:
      raise ConversionError(f'{path}: images[{index}] needs "id" and "file_name"; fix: '
                            'list every image as {"id": ..., "file_name": ..., "height": ..., '
                            '"width": ...}')
    images_by_id[str(image['id'])] = image
  defects, jobs, seen = [], [], {}
  stems = None
  for index, annotation in enumerate(data['annotations']):
    where = f'annotations[{index}]'
    if not isinstance(annotation, dict) or 'file_name' not in annotation:
      raise ConversionError(f'{path}: {where} has no "file_name" (its PNG); fix: add it')
    png_name = annotation['file_name']
    image_id = annotation.get('image_id', os.path.splitext(png_name)[0])
    segments = _segments(annotation, where, path)
    key = str(image_id)   # labelling tools mix 7 and "7"
    if key in seen:
      defects.append(Defect(DUPLICATE_ANNOTATION, path,
                            f'image_id {image_id!r} has annotations {seen[key]} and {index}'))
      continue
    seen[key] = index
    image = images_by_id.get(key)
    json_size = None
    if image is not None:
      image_file = image['file_name']
      if image.get('height') and image.get('width'):
        json_size = (int(image['height']), int(image['width']))
    else:
      if images:
        defects.append(Defect(MISSING_ANNOTATION, path,
                              f'{where} (image_id {image_id!r}, PNG {png_name}) has no '
                              '"images" entry; looking the image up by the PNG name'))
      if stems is None:
        stems = _stems(images_dir)
      stem = os.path.splitext(os.path.basename(png_name))[0]
      image_file = stems.get(stem, stem + '.jpg')
    jobs.append(ExampleJob(
        name=os.path.splitext(os.path.basename(image_file))[0],
        image_path=os.path.join(images_dir or '', image_file),
        png_path=os.path.join(png_dir, png_name), segments=segments, json_size=json_size))
  for image_id, image in images_by_id.items():
    if image_id not in seen:
      defects.append(Defect(MISSING_ANNOTATION, path,
                            f'image {image["file_name"]} (id {image_id!r}) has no annotation'))
  jobs.sort(key=lambda job: job.name)
  return PanopticJson(path, data.get('categories') or [], jobs, defects)


# File endings of the images tf.io.decode_image reads (lower case): what the converters and
# predict take as images in a folder.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


def _stems(folder: Optional[str]) -> dict:
  if not folder or not os.path.isdir(folder):
    return {}
  return {os.path.splitext(name)[0]: name for name in sorted(os.listdir(folder))
          if name.lower().endswith(IMAGE_EXTENSIONS)}


def list_images(folder: str, suffix: str = '') -> list[str]:
  """Image files (recursively) in a folder whose names end with suffix + an image extension."""
  found = []
  for root, _, names in os.walk(folder):
    for name in names:
      stem, ext = os.path.splitext(name)
      if ext.lower() in IMAGE_EXTENSIONS and stem.endswith(suffix):
        found.append(os.path.join(root, name))
  return sorted(found)


# ---- Pixels ----


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_JPEG_SIGNATURE = b'\xff\xd8\xff'


def _read_bytes(path: str, defects: list) -> Optional[bytes]:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    defects.append(Defect(MISSING_FILE, path, 'file not found'))
  except OSError as error:
    defects.append(Defect(UNREADABLE_FILE, path, f'cannot be read ({error.strerror})'))
  return None


def decode_label_png(data: bytes, path: str, defects: list) -> Optional[np.ndarray]:
  """Segment ids [h, w] of a COCO panoptic PNG, or None (with a defect)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not data.startswith(_PNG_SIGNATURE) or len(data) < 33:
    defects.append(Defect(BAD_LABEL_PNG, path, 'not a PNG file'))
    return None
  bit_depth, color_type = data[24], data[25]
  if color_type in (0, 4):
    defects.append(Defect(BAD_LABEL_PNG, path,
                          f'single-channel (grey, {bit_depth}-bit) PNG; COCO panoptic labels '
                          'are RGB'))
    return None
  if bit_depth == 16:
    defects.append(Defect(BAD_LABEL_PNG, path, '16-bit RGB PNG'))
    return None
  try:
    rgb = tf.io.decode_png(data, channels=3).numpy()
  except tf.errors.OpError as error:
    defects.append(Defect(UNREADABLE_FILE, path, f'PNG cannot be decoded ({error.message})'))
    return None
  return panoptic_rgb.rgb_to_id(rgb)


def read_panoptic_png(path: str) -> np.ndarray:
  """Reads a COCO panoptic PNG file as `[height, width]` int64 segment ids.

  The checks of decode_label_png (the converters' and the validator's reader): an 8-bit RGB(A)
  or palette PNG; grey and 16-bit PNGs are refused rather than misread.

  Raises:
    FileNotFoundError: naming the path, when it cannot be read.
    PanopticFormatError: naming the path, the problem and the fix, when it is no 8-bit RGB PNG.
  """
  defects = []
  data = _read_bytes(path, defects)
  if data is None:
    raise FileNotFoundError(f'cannot read PNG "{path}": {defects[0].message}')
  ids = decode_label_png(data, path, defects)
  if ids is None:
    raise PanopticFormatError(str(defects[0]))
  return ids


def segment_bbox(mask: np.ndarray) -> list[int]:
  """The COCO `bbox` [x, y, width, height] of a segment's non-empty `[height, width]` mask."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def read_image(path: str, defects: list) -> Optional[tuple]:
  """(bytes, format, (height, width)) of an image, kept as is when JPEG or PNG and re-encoded
  as PNG otherwise; None (with a defect) when missing or undecodable."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  data = _read_bytes(path, defects)
  if data is None:
    return None
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.OpError as error:
    defects.append(Defect(UNREADABLE_FILE, path, f'image cannot be decoded ({error.message})'))
    return None
  size = tuple(int(v) for v in image.shape[:2])
  if data.startswith(_JPEG_SIGNATURE):
    return data, 'jpeg', size
  if data.startswith(_PNG_SIGNATURE):
    return data, 'png', size
  return png_encoding.encode_png(image.numpy()), 'png', size


def panoptic_from_segments(ids: np.ndarray, segments: Sequence[dict], spec: LabelSpec,
                           file: str, defects: list, stats: Optional[ExampleStats] = None
                           ) -> np.ndarray:
  """The DeepLab2 panoptic map (int32 [h, w]) of segment ids and their segments_info.

  Appends a Defect per problem; pixels of a defective segment become ignore pixels.
  """
  stats = stats if stats is not None else ExampleStats()
  divisor = spec.label_divisor
  void_value = spec.ignore_label * divisor
  # Pixels are matched to the few listed ids with a binary search (much cheaper than
  # np.unique over all pixels); only unmatched pixels are examined further.
  flat = ids.ravel()
  keys = np.array(sorted({s['id'] for s in segments if s['id'] != 0}), np.int64)
  if len(keys):
    position = np.minimum(np.searchsorted(keys, flat), len(keys) - 1)
    hit = keys[position] == flat
  else:
    position = np.zeros(flat.shape, np.int64)
    hit = np.zeros(flat.shape, bool)
  counts = np.bincount(position[hit], minlength=len(keys))
  index_of = {int(v): i for i, v in enumerate(keys)}
  lut = np.full(max(1, len(keys)), void_value, np.int64)
  listed = set()
  instance_count = collections.defaultdict(int)
  crowd_categories = set()
  for segment in segments:
    sid, cid = segment['id'], segment['category_id']
    what = f'segment {sid} (category {cid})'
    if sid in listed:
      defects.append(Defect(DUPLICATE_SEGMENT_ID, file, f'{what} is listed twice'))
      continue
    listed.add(sid)
    if sid == 0:
      defects.append(Defect(RESERVED_SEGMENT_ID, file, f'{what} has id 0'))
      continue
    stats.segments += 1
    index = index_of.get(sid)
    pixels = int(counts[index]) if index is not None else 0
    if pixels == 0:
      if 0 <= sid <= panoptic_rgb.MAX_RGB_ID:
        where = f'colour {tuple(int(c) for c in panoptic_rgb.id_to_rgb(np.array(sid)))}'
      else:
        where = f'no RGB colour has it: ids lie in [0, {panoptic_rgb.MAX_RGB_ID}]'
      defects.append(Defect(ID_NOT_IN_PNG, file,
                            f'{what} is in the JSON but no pixel of the PNG has this id '
                            f'({where})'))
    elif segment.get('area') is not None and segment['area'] != pixels:
      defects.append(Defect(AREA_MISMATCH, file,
                            f'{what}: JSON area {segment["area"]}, PNG has {pixels} pixels'))
    train = spec.category_to_train_id.get(cid)
    if train is None:
      defects.append(Defect(UNKNOWN_CLASS, file, f'{what}: category {cid} is not a known '
                            'class'))
      continue
    instance = 0
    semantic = train
    if train in spec.thing_train_ids:
      if segment['iscrowd']:
        stats.crowd += 1
        if train in crowd_categories:
          defects.append(Defect(CROWD_NOT_UNIQUE, file,
                                f'{what}: a second crowd segment of category {cid}'))
        crowd_categories.add(train)
        if spec.treat_crowd_as_ignore:
          semantic = spec.ignore_label
      else:
        stats.things += 1
        instance_count[train] += 1
        instance = instance_count[train]
        if instance >= divisor:
          defects.append(Defect(INSTANCE_OVERFLOW, file,
                                f'{what}: instance {instance} of category {cid} does not fit '
                                f'below the label divisor {divisor}'))
          continue
    else:
      stats.stuff += 1
      if segment['iscrowd']:
        defects.append(Defect(CROWD_ON_STUFF, file,
                              f'{what}: "iscrowd": 1 on stuff category {cid}'))
    if index is not None:
      lut[index] = semantic * divisor + instance
      stats.pixels_per_class[semantic] = stats.pixels_per_class.get(semantic, 0) + pixels
  rest = flat[~hit]
  rest = rest[rest != 0]
  unlisted = []
  if rest.size:
    values, value_counts = np.unique(rest, return_counts=True)
    unlisted = [(int(v), int(c)) for v, c in zip(values, value_counts)]
  if unlisted:
    shown = ', '.join(f'{v} ({c} px)' for v, c in unlisted[:3])
    more = f' and {len(unlisted) - 3} more' if len(unlisted) > 3 else ''
    defects.append(Defect(ID_NOT_IN_JSON, file,
                          f'{len(unlisted)} segment id(s) of the PNG are not in segments_info: '
                          f'{shown}{more}'))
  return np.where(hit, lut[position], void_value).reshape(ids.shape).astype(np.int32)


def check_example(job: ExampleJob, spec: Optional[LabelSpec], read_pixels: bool = True
                  ) -> CheckedExample:
  """Reads and checks one example; collects every defect instead of stopping."""
  defects, stats = [], ExampleStats()
  result = CheckedExample(job, defects, stats)
  image = read_image(job.image_path, defects) if job.image_path else None
  if image is not None:
    result.image_bytes, result.image_format, result.image_size = image
    if job.json_size and tuple(job.json_size) != result.image_size:
      defects.append(Defect(SIZE_MISMATCH, job.image_path,
                            f'image is {result.image_size[0]}x{result.image_size[1]} '
                            f'(height x width) but the JSON lists '
                            f'{job.json_size[0]}x{job.json_size[1]}'))
  if job.png_path is None or not read_pixels:
    return result
  data = _read_bytes(job.png_path, defects)
  ids = decode_label_png(data, job.png_path, defects) if data is not None else None
  if ids is None:
    return result
  if result.image_size is not None and ids.shape != result.image_size:
    defects.append(Defect(SIZE_MISMATCH, job.png_path,
                          f'label is {ids.shape[0]}x{ids.shape[1]} (height x width) but image '
                          f'{os.path.basename(job.image_path)} is '
                          f'{result.image_size[0]}x{result.image_size[1]}'))
  if spec is not None:
    result.panoptic = panoptic_from_segments(ids, job.segments or (), spec, job.png_path,
                                             defects, stats)
  return result


def read_panoptic_annotation(annotation: Mapping, png_dir: str, spec: LabelSpec,
                             json_path: str = '') -> np.ndarray:
  """The DeepLab2 panoptic map of one COCO panoptic annotation, as the converters compute it.

  Args:
    annotation: One entry of a COCO panoptic JSON's "annotations" (`file_name` of its PNG in
      `png_dir`, `segments_info`).
    png_dir: Folder of the panoptic PNGs.
    spec: The category -> train id mapping and crowd policy (spec_from_descriptor).
    json_path: The JSON file, named in error messages about its fields.

  Returns:
    `[height, width]` int32 panoptic map, `train_id * label_divisor + instance`: instances
    numbered from 1 per thing class in segments_info order, stuff and crowd instance 0, void
    pixels the ignore label (crowd too with spec.treat_crowd_as_ignore).

  Raises:
    FileNotFoundError: the PNG cannot be read.
    PanopticFormatError: on the first error-level defect (see panoptic_from_segments), naming
      the file, the segment and the fix; a ConversionError for malformed JSON fields.
  """
  png_path = os.path.join(png_dir, annotation['file_name'])
  segments = _segments(annotation, f'the annotation of {annotation["file_name"]}',
                       json_path or png_path)
  defects = []
  panoptic = panoptic_from_segments(read_panoptic_png(png_path), segments, spec, png_path,
                                    defects)
  errors = [d for d in defects if d.is_error]
  if errors:
    extra = f' (and {len(errors) - 1} more problem(s) in this image)' if len(errors) > 1 else ''
    raise PanopticFormatError(f'{errors[0]}{extra}')
  return panoptic


def encode_example_job(job: ExampleJob, spec: LabelSpec) -> bytes:
  """The serialized DeepLab2 tf.train.Example of a job; raises ConversionError on the first
  error-level defect (runs in the converters' worker processes)."""
  from deeplab2_kmax.data.formats import tfrecord  # pylint: disable=g-import-not-at-top
  checked = check_example(job, spec)
  errors = [d for d in checked.defects if d.is_error]
  if errors:
    extra = f' (and {len(errors) - 1} more problem(s) in this image)' if len(errors) > 1 else ''
    raise ConversionError(f'image "{job.name}": {errors[0]}{extra}')
  height, width = checked.image_size
  return tfrecord.encode_example(checked.image_bytes, checked.image_format, job.name, height,
                                 width, panoptic_label=checked.panoptic)


def check_jobs_unique(jobs: Iterable[ExampleJob]) -> None:
  """Image names become record names and prediction file names: they must be unique."""
  seen = {}
  for job in jobs:
    if job.name in seen:
      raise ConversionError(f'images {seen[job.name]} and {job.image_path} have the same name '
                            f'"{job.name}"; fix: rename one (record names must be unique)')
    seen[job.name] = job.image_path


def describe_defects(defects: Sequence[Defect], limit: int = 3) -> str:
  """A short multi-line summary: count per kind and the first few of each."""
  by_kind = collections.OrderedDict()
  for defect in defects:
    by_kind.setdefault(defect.kind, []).append(defect)
  lines = []
  for kind, items in by_kind.items():
    lines.append(f'  {kind}: {len(items)}  (fix: {FIXES[kind]})')
    lines.extend(f'    {d.file}: {d.message}' for d in items[:limit])
  return '\n'.join(lines)
