"""Prints parameter counts per component and multiply-accumulates of a kMaX config.

    python -m deeplab2_kmax.model.summary --config_file=F [--config_override=...] [--crop=H,W]

Prints a table, then as the last line one JSON object:
{"total_params", "trainable_params", "components": {name: params}, "macs", ...}; "macs" counts
one image at the crop (inference graph; see model/macs.py).
"""

import json
import os
import re
import sys

from absl import flags

from deeplab2_kmax import command_line
from deeplab2_kmax.config import flags as config_flags
from deeplab2_kmax.config import loader
from deeplab2_kmax.data import datasets
from deeplab2_kmax.model import builder
from deeplab2_kmax.model import macs as macs_lib

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (importing stays side-effect free)."""
  config_flags.define_config_flags()
  flags.DEFINE_string('crop', None, 'H,W to build and count MACs at (default: the train crop).')


def _count(variables):
  total = 0
  for variable in variables:
    size = 1
    for dim in variable.shape:
      size *= int(dim)
    total += size
  return total


def summarize(model, crop):
  """Returns the summary dict of a built model at crop (height, width)."""
  components = {}
  trainable = {}
  for name, layer in model.components().items():
    components[name] = _count(layer.weights)
    trainable[name] = _count(layer.trainable_weights)
  total_macs, by_type, by_scope = macs_lib.count_macs(model, [1, crop[0], crop[1], 3])
  macs_by_component = {}
  for scope, value in by_scope.items():
    parts = scope.split('/')
    name = re.sub(r'_\d+$', '', parts[1]) if len(parts) > 1 else parts[0]
    macs_by_component[name] = macs_by_component.get(name, 0) + value
  return {
      'total_params': _count(model.weights),
      'trainable_params': _count(model.trainable_weights),
      'components': components,
      'trainable_components': trainable,
      'macs': total_macs,
      'macs_by_component': macs_by_component,
      'macs_by_op_type': by_type,
      'crop': list(crop),
  }


def format_table(summary):
  lines = [f'{"component":<22}{"params":>14}{"trainable":>14}{"GMACs":>10}']
  for name, params in summary['components'].items():
    lines.append(f'{name:<22}{params:>14,}{summary["trainable_components"][name]:>14,}'
                 f'{summary["macs_by_component"].get(name, 0) / 1e9:>10.2f}')
  lines.append(f'{"total":<22}{summary["total_params"]:>14,}{summary["trainable_params"]:>14,}'
               f'{summary["macs"] / 1e9:>10.2f}')
  lines.append(f'crop {summary["crop"][0]}x{summary["crop"][1]}; MACs by op type: ' +
               ', '.join(f'{k} {v / 1e9:.2f} G' for k, v in summary['macs_by_op_type'].items()))
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    config = loader.load_config(FLAGS.config_file, FLAGS.config_override,
                                environ=loader.PlaceholderEnvironment(), validate=False)
  except loader.ConfigError as error:
    print(error, file=sys.stderr)
    return 2
  if FLAGS.crop:
    crop = datasets.crop_size_of([int(v) for v in FLAGS.crop.split(',')], '--crop')
  else:
    crop = builder.default_crop(config)
  model = builder.build_model(config, crop_size=crop)
  summary = summarize(model, crop)
  print(format_table(summary))
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  define_flags()
  command_line.run(main)
