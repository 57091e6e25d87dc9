"""Panoptic quality of COCO-format predictions, equal to cocodataset/panopticapi's pq_compute.

    python -m deeplab2_kmax.evaluation.coco_panoptic \
        --gt_json=panoptic_val2017.json --gt_folder=panoptic_val2017 \
        --pred_json=predictions.json --pred_folder=predictions \
        --output_json=pq.json

Prints the official table (values x 100) and writes `--output_json` as
`{"All": {"pq", "sq", "rq", "n"}, "Things": {...}, "Stuff": {...},
  "per_class": {"<category_id>": {"pq", "sq", "rq"}}}` with fractions in [0, 1]; per_class lists
every category of the GT JSON, as pq_compute does (zeros for one with no TP, FP or FN, which
the averages and n leave out). Works for Cityscapes panoptic files too
(the same format). Exits 1 with one line naming the file, image and segment when an input is
malformed.
"""

import json
import os
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags

from deeplab2_kmax import command_line
from deeplab2_kmax.data.formats import coco_panoptic
from deeplab2_kmax.data.formats.coco_panoptic import PanopticFormatError
from deeplab2_kmax.evaluation import panoptic_quality

# Command-line flags, defined only when run as a program (importing this module for its
# `evaluate` function must not touch the global absl flag registry).
_GT_JSON = None
_GT_FOLDER = None
_PRED_JSON = None
_PRED_FOLDER = None
_OUTPUT_JSON = None
_NUM_WORKERS = None
_PER_CLASS = None
_CHECK_GT_AREAS = None


def define_flags():
  """Defines the command-line flags of `python -m deeplab2_kmax.evaluation.coco_panoptic`."""
  global _GT_JSON, _GT_FOLDER, _PRED_JSON, _PRED_FOLDER, _OUTPUT_JSON
  global _NUM_WORKERS, _PER_CLASS, _CHECK_GT_AREAS
  if _GT_JSON is not None:  # already defined (e.g. by a test that runs main in process)
    return
  _GT_JSON = flags.DEFINE_string('gt_json', None, 'Ground-truth COCO panoptic JSON.')
  _GT_FOLDER = flags.DEFINE_string('gt_folder', None, 'Folder of the ground-truth PNGs.')
  _PRED_JSON = flags.DEFINE_string('pred_json', None, 'Prediction JSON (annotations by image_id).')
  _PRED_FOLDER = flags.DEFINE_string('pred_folder', None, 'Folder of the prediction PNGs.')
  _OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Where to write the results (optional).')
  _NUM_WORKERS = flags.DEFINE_integer('num_workers', os.cpu_count() or 1,
                                      'Processes reading and matching images (1 = in process).')
  _PER_CLASS = flags.DEFINE_boolean('per_class', False, 'Also print one row per category.')
  _CHECK_GT_AREAS = flags.DEFINE_boolean(
      'check_gt_areas', False,
      'Fail when a GT JSON area differs from its PNG pixel count (the official scripts trust the '
      'JSON; a wrong area gives PQ above 100).')


def evaluate(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str,
             output_json: Optional[str] = None, num_workers: int = 1,
             verbose: bool = False, check_gt_areas: bool = False) -> dict[str, Any]:
  """Library entry of the CLI: evaluates, writes `output_json` if given, returns the results.

  Raises:
    PanopticFormatError: Any malformed or missing input, with a message naming it.
  """
  for folder, what in ((gt_folder, '--gt_folder'), (pred_folder, '--pred_folder')):
    if not os.path.isdir(folder):
      raise PanopticFormatError(f'{what} "{folder}" is not a folder')
  gt = coco_panoptic.load_json(gt_json, '--gt_json', required=('annotations', 'categories'))
  pred = coco_panoptic.load_json(pred_json, '--pred_json')
  progress = None
  if verbose:
    def progress(done, total):
      if done == total or done % 500 == 0:
        print(f'{done} / {total} images evaluated', file=sys.stderr)
  results = panoptic_quality.evaluate_folders(gt, gt_folder, pred, pred_folder,
                                              num_workers=num_workers, progress=progress,
                                              check_gt_areas=check_gt_areas)
  if output_json:
    directory = os.path.dirname(output_json)
    if directory:
      os.makedirs(directory, exist_ok=True)
    with open(output_json, 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  missing = [name for name, flag in (('gt_json', _GT_JSON), ('gt_folder', _GT_FOLDER),
                                     ('pred_json', _PRED_JSON), ('pred_folder', _PRED_FOLDER))
             if not flag.value]
  if missing:
    print(f'error: missing --{", --".join(missing)}', file=sys.stderr)
    return 1
  start = time.time()
  try:
    results = evaluate(_GT_JSON.value, _GT_FOLDER.value, _PRED_JSON.value, _PRED_FOLDER.value,
                       _OUTPUT_JSON.value, _NUM_WORKERS.value, verbose=True,
                       check_gt_areas=_CHECK_GT_AREAS.value)
  except (PanopticFormatError, FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  categories = None
  if _PER_CLASS.value:
    with open(_GT_JSON.value) as f:
      categories = {c['id']: c for c in json.load(f)['categories']}
  print(panoptic_quality.format_table(results, categories))
  print(f'Time elapsed: {time.time() - start:0.2f} seconds')
  return 0


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
