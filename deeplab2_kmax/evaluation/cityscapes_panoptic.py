"""Cityscapes panoptic evaluation through the official cityscapesScripts (optional dependency).

Cityscapes' official panoptic metric (`cityscapesscripts.evaluation.evalPanopticSemanticLabeling`,
pip package `cityscapesscripts`) runs the same algorithm as panopticapi on COCO-format files, so
`coco_panoptic` gives the same numbers without the package. This module is for users who want
the official code itself in the loop:

    predictions -> formats.write_cityscapes_panoptic(...) per image -> prediction JSON
    evaluate_with_cityscapesscripts(gt_json, gt_folder, pred_json, pred_folder)

The ground truth is Cityscapes' own `gtFine/cityscapes_panoptic_val.json` and folder, made by
`cityscapesscripts/preparation/createPanopticImgs.py` (category ids are label ids, 7..33).

cityscapesScripts evaluates in a `multiprocessing.Pool` with the platform's default start
method (fork on Linux): call it from a process that has not initialised TensorFlow, e.g.
`python -m deeplab2_kmax.evaluation.cityscapes_panoptic ...`.
"""

import json
import os
import sys
import tempfile
from typing import Any, Optional

from absl import app
from absl import flags

from deeplab2_kmax import command_line
from deeplab2_kmax import common

_INSTALL_HINT = ('the official Cityscapes evaluation needs the optional package '
                 'cityscapesscripts: pip install cityscapesscripts (or evaluate the same files '
                 'with python -m deeplab2_kmax.evaluation.coco_panoptic, which gives equal PQ)')


def is_available() -> bool:
  """True when cityscapesScripts' panoptic evaluation can be imported."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    return importlib.util.find_spec('cityscapesscripts.evaluation') is not None
  except (ImportError, ValueError):  # The parent package is missing or unimportable.
    return False


def to_results_contract(official: dict[str, Any]) -> dict[str, Any]:
  """cityscapesScripts' results dict -> our output contract (string category keys).

  The official per_class, like panoptic_quality's, also lists categories absent from both
  sides (all zeros).
  """
  # The official keys are the strings of our contract (common.PQ_*).
  results = {name: {key: official[name][key]
                    for key in (common.PQ, common.SQ, common.RQ, common.PQ_NUM_CATEGORIES)}
             for name in (common.PQ_ALL, common.PQ_THINGS, common.PQ_STUFF)}
  results[common.PER_CLASS] = {
      str(category): {key: value[key] for key in (common.PQ, common.SQ, common.RQ)}
      for category, value in official[common.PER_CLASS].items()}
  return results


def evaluate_with_cityscapesscripts(gt_json: str, gt_folder: str, pred_json: str,
                                    pred_folder: str,
                                    results_file: Optional[str] = None) -> dict[str, Any]:
  """Runs cityscapesScripts' evaluatePanoptic; returns its results in our contract.

  Raises:
    ImportError: cityscapesscripts is not installed (the message says how to install it).
  """
  try:
    # Imported here: the package is optional.
    # pylint: disable-next=g-import-not-at-top
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as official_script
  except ImportError as error:
    raise ImportError(_INSTALL_HINT) from error
  with tempfile.TemporaryDirectory() as scratch:
    official = official_script.evaluatePanoptic(
        gt_json, gt_folder, pred_json, pred_folder,
        results_file or os.path.join(scratch, 'results.json'))
  return to_results_contract(official)


def _define_flags():
  # Defined only when run as a program: the names are those of coco_panoptic's flags, and both
  # modules may be imported into one process.
  for name, help_text in (('gt_json', 'Cityscapes panoptic GT JSON.'),
                          ('gt_folder', 'Folder of the GT PNGs.'),
                          ('pred_json', 'Prediction JSON.'),
                          ('pred_folder', 'Folder of the prediction PNGs.')):
    flags.DEFINE_string(name, None, help_text, required=True)
  flags.DEFINE_string('output_json', None, 'Where to write the results in our contract.')


def main(argv):
  """Prints the official table (cityscapesScripts does) and writes --output_json."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  values = flags.FLAGS
  try:
    results = evaluate_with_cityscapesscripts(values.gt_json, values.gt_folder, values.pred_json,
                                              values.pred_folder)
  except ImportError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  if values.output_json:
    with open(values.output_json, 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return 0


if __name__ == '__main__':
  _define_flags()
  command_line.run(main)
