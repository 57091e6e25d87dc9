"""Command line of deeplab2_kmax.export (run as `python -m deeplab2_kmax.export`)."""

import os
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from deeplab2_kmax import command_line
from deeplab2_kmax import output_folder
from deeplab2_kmax import config as config_lib
from deeplab2_kmax import precision as precision_lib
from deeplab2_kmax.checkpoint import layout as checkpoint_layout
from deeplab2_kmax.checkpoint import model_restore
from deeplab2_kmax.checkpoint import paths as checkpoint_paths
from deeplab2_kmax.config import flags as config_flags
from deeplab2_kmax.config import run_record
from deeplab2_kmax.export import litert_format
from deeplab2_kmax.export import onnx_format
from deeplab2_kmax.export import runtimes
from deeplab2_kmax.export import saved_model as saved_model_lib
from deeplab2_kmax.export import serving_module as serving_lib

# Written into <version>/assets.extra by config/run_record.py (as into a training model_dir).
EXPERIMENT_FILE = run_record.CONFIG_FILE
COMMAND_LINE_FILE = run_record.COMMAND_LINE_FILE
# Formats that compute in float32 whatever --precision says (no bfloat16 kernels worth using).
_FLOAT32_ONLY_FORMATS = ('onnx', 'litert')


def define_flags():
  config_flags.define_config_flags()
  flags.DEFINE_string('checkpoint_path', None, 'Checkpoint prefix (ckpt-N), a folder holding '
                      'checkpoints (the newest is used; also `model_zoo convert`\'s output), '
                      'or a model-zoo name (downloaded and converted on the fly; '
                      '`python -m deeplab2_kmax.model_zoo list`).')
  flags.DEFINE_string('model_dir', None, 'Run directory of deeplab2_kmax.train; its newest '
                      'checkpoint is exported when --checkpoint_path is not given.')
  flags.DEFINE_string('output_path', None, 'Base path: every format goes to '
                      '<output_path>/<version>/ (TF Serving\'s layout).', required=True)
  flags.DEFINE_list('format', ['saved_model'], 'Formats to write, comma separated: '
                    f'{",".join(runtimes.FORMATS)} (SavedModel folder, model.onnx, '
                    'model.tflite).')
  flags.DEFINE_enum('precision', 'float32', list(precision_lib.PRECISIONS),
                    'SavedModel compute precision; "auto" picks bfloat16 only where THIS '
                    'machine has native bfloat16 (CPU flags avx512_bf16/amx_bf16/bf16, or a GPU '
                    'of compute capability >= 8.0), so export on the serving hardware. ONNX and '
                    'LiteRT are float32.')
  flags.DEFINE_enum('litert_weights', 'float32', list(litert_format.WEIGHT_TYPES),
                    'LiteRT weight type (float16 halves the file).')
  flags.DEFINE_integer('onnx_opset', onnx_format.DEFAULT_OPSET, 'ONNX opset version.')
  flags.DEFINE_list('input_type', None, 'SavedModel signatures to write (default: '
                    'export_options or all of '
                    f'{",".join(serving_lib.INPUT_TYPES)}).')
  flags.DEFINE_string('batch_size', None, 'Fixed batch size of the signatures, or "dynamic" '
                      '(default: export_options.batch_size; 0 = dynamic).')
  flags.DEFINE_integer('version', None, 'Version folder. Default: export_options.version when '
                       'the config sets it, else the next free number (1, or one above the '
                       'newest version in --output_path), so a new export never replaces one.')
  flags.DEFINE_bool('overwrite', False, 'Let an explicit --version (or export_options.version) '
                    'replace the existing version folder; without it that is refused.')


def parse_formats(names) -> list:
  """--format values, checked and in runtimes.FORMATS order (the SavedModel first: it clears
  its version folder)."""
  unknown = [name for name in names if name not in runtimes.FORMATS]
  if unknown or not names:
    raise ValueError(f'--format {",".join(names)}: {", ".join(unknown) or "nothing"} is not a '
                     f'format; use one or more of {",".join(runtimes.FORMATS)}.')
  return [name for name in runtimes.FORMATS if name in names]


def format_precisions(formats, requested: str, flags_: Optional[frozenset] = None) -> dict:
  """{format: 'float32' or 'bfloat16'}: `requested` resolved on this machine for the
  SavedModel; ONNX and LiteRT stay float32 (explicit bfloat16 for them is an error)."""
  result = {}
  for name in formats:
    if name in _FLOAT32_ONLY_FORMATS:
      if requested == 'bfloat16':
        raise ValueError(f'--precision=bfloat16 applies to the SavedModel only; --format={name} '
                         'is exported in float32 (use --precision=auto or float32 with it, or '
                         '--litert_weights=float16 for a smaller LiteRT file).')
      result[name] = 'float32'
    else:
      result[name] = precision_lib.resolve(requested, flags=flags_)
  return result


def prepare_output_path(output_path: str) -> None:
  """Creates the export's base folder, or raises ValueError saying why it cannot be one."""
  problem = output_folder.problem('--output_path', output_path, "TF Serving's model base path: "
                                  'the version folders go there')
  if problem:
    raise ValueError(problem)


def existing_versions(output_path: str) -> list[int]:
  """The numeric version folders in output_path, ascending."""
  if not tf.io.gfile.isdir(output_path):
    return []
  return sorted(int(name.rstrip('/')) for name in tf.io.gfile.listdir(output_path)
                if name.rstrip('/').isdigit()
                and tf.io.gfile.isdir(os.path.join(output_path, name)))


def choose_version(output_path: str, flag_version: Optional[int], options,
                   overwrite: bool) -> int:
  """The version folder to write (see --version and --overwrite).

  Args:
    output_path: the export's base folder.
    flag_version: --version, or None.
    options: the config's ExportOptions (its version counts when the config sets it).
    overwrite: --overwrite.

  Raises:
    ValueError: an explicit version whose folder already holds files, without overwrite.
  """
  versions = existing_versions(output_path)
  if flag_version is not None:
    version, source = flag_version, f'--version={flag_version}'
  elif options.HasField('version'):
    version, source = options.version, f'export_options.version: {options.version}'
  else:
    return max(versions, default=0) + 1
  if version < 1:
    raise ValueError(f'{source}: TF Serving loads versions 1 and up.')
  directory = os.path.join(output_path, str(version))
  if not overwrite and tf.io.gfile.isdir(directory) and tf.io.gfile.listdir(directory):
    raise ValueError(f'{directory} already holds an export ({source}); pass '
                     f'--overwrite to replace it, or --version={max(versions) + 1} (the next '
                     'free number, also the default when neither --version nor '
                     'export_options.version is set).')
  return version


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  values = flags.FLAGS
  checkpoint = values.checkpoint_path or values.model_dir
  if not checkpoint:
    raise app.UsageError('pass --checkpoint_path (or --model_dir of a training run).')
  checkpoint_flag = '--checkpoint_path' if values.checkpoint_path else '--model_dir'
  # tf.saved_model.save logs each written file at INFO; the summary lines below say it all.
  logging.set_verbosity(logging.WARNING)
  try:
    formats = parse_formats(values.format)
    precisions = format_precisions(formats, values.precision)
    config = config_flags.load_from_flags(inference=True)
    options = config.export_options
    batch_size = serving_lib.parse_batch_size(values.batch_size, options.batch_size)
    input_types = values.input_type or list(options.input_type) or list(serving_lib.INPUT_TYPES)
    # Paths before the model is built: a typo should not cost a model build.
    prepare_output_path(values.output_path)
    checkpoint = checkpoint_paths.resolve_checkpoint(checkpoint, checkpoint_flag)
    version = choose_version(values.output_path, values.version, options, values.overwrite)
    directory = os.path.join(values.output_path, str(version))
    modules = {}
    for name in formats:
      if precisions[name] not in modules:
        module = serving_lib.build_serving_module(config, batch_size=batch_size,
                                                  precision=precisions[name])
        restored = model_restore.restore_model(module.model, checkpoint)
        modules[precisions[name]] = module
      module = modules[precisions[name]]
      if name == 'saved_model':
        path = saved_model_lib.write(module, values.output_path, version, input_types)
        detail = (f'signatures {", ".join(serving_lib.INPUT_TYPES[t] for t in input_types)}; '
                  f'batch {batch_size or "dynamic"}; {precisions[name]}')
      elif name == 'onnx':
        path = onnx_format.write(module, directory,
                                 saved_model_lib.descriptor_text(module.descriptor),
                                 opset=values.onnx_opset)
        detail = f'opset {values.onnx_opset}; batch {batch_size or "dynamic"}; float32'
      else:
        path = litert_format.write(module, directory, weights=values.litert_weights)
        detail = f'batch {batch_size or "dynamic"}; {values.litert_weights} weights'
      print(f'[export] {restored} -> {path} ({name}: {detail})', flush=True)
    # Every format's folder carries the label space (SavedModel writes it itself).
    if 'saved_model' not in formats:
      saved_model_lib.write_descriptor(directory, next(iter(modules.values())).descriptor)
    # What produced this export (TF Serving ignores assets.extra).
    run_record.write_run_record(
        os.path.join(directory, saved_model_lib.ASSETS_EXTRA), config,
        [os.path.basename(sys.executable), '-m', 'deeplab2_kmax.export'] + sys.argv[1:])
  except (config_lib.ConfigError, checkpoint_layout.CheckpointMismatchError, ValueError,
          ImportError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


def run():
  define_flags()
  command_line.run(main)
