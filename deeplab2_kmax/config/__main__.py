"""Prints the effective experiment config after ${VAR} substitution, overrides and validation.

    SYNTHETIC_DATA_DIR=runs/demo/data python -m deeplab2_kmax.config \
        --config_file=configs/synthetic/kmax_r50_os32_synthetic.textproto \
        --config_override='train_dataset_options { batch_size: 4 }'

Exits 0 and prints the config as textproto, or exits 1 with one message naming file:line and
field.
"""

import sys

from absl import app
from absl import flags
from google.protobuf import text_format

from deeplab2_kmax import command_line
from deeplab2_kmax.config import flags as config_flags
from deeplab2_kmax.config import loader

_NUM_REPLICAS = flags.DEFINE_integer(
    'num_replicas', 1, 'Replicas the run will use; batch sizes must divide by it.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = config_flags.load_from_flags(num_replicas=_NUM_REPLICAS.value)
  except loader.ConfigError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(text_format.MessageToString(config), end='')
  return 0


if __name__ == '__main__':
  config_flags.define_config_flags()
  command_line.run(main)
