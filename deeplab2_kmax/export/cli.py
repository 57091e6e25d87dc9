"""Command line of deeplab2_kmax.export (run as `python -m deeplab2_kmax.export`)."""

import os
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging

from deeplab2_kmax import command_line
from deeplab2_kmax import config as config_lib
from deeplab2_kmax import precision as precision_lib
from deeplab2_kmax.config import flags as config_flags
from deeplab2_kmax.export import litert_format
from deeplab2_kmax.export import onnx_format
from deeplab2_kmax.export import runtimes
from deeplab2_kmax.export import saved_model as saved_model_lib
from deeplab2_kmax.export import serving_module as serving_lib
from deeplab2_kmax.trainer import checkpoints

# Formats that compute in float32 whatever --precision says (no bfloat16 kernels worth using).
_FLOAT32_ONLY_FORMATS = ('onnx', 'litert')


def define_flags():
  config_flags.define_config_flags()
  flags.DEFINE_string('checkpoint_path', None, 'Checkpoint prefix (ckpt-N) or a folder holding '
                      'checkpoints (the newest is used).')
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
  flags.DEFINE_integer('version', None, 'Version folder (default: export_options.version).')


def parse_batch_size(text: Optional[str], default: int) -> Optional[int]:
  """--batch_size: None (flag unset) -> default; 'dynamic' or 0 -> None; N -> N."""
  if text is None:
    value = default
  elif text.strip().lower() == 'dynamic':
    value = 0
  else:
    try:
      value = int(text)
    except ValueError:
      raise ValueError(f'--batch_size must be a positive integer or "dynamic", got '
                       f'"{text}".') from None
  if value < 0:
    raise ValueError(f'--batch_size must be a positive integer or "dynamic", got {value}.')
  return value or None


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  values = flags.FLAGS
  checkpoint = values.checkpoint_path or values.model_dir
  if not checkpoint:
    raise app.UsageError('pass --checkpoint_path (or --model_dir of a training run).')
  # tf.saved_model.save logs each written file at INFO; the summary lines below say it all.
  logging.set_verbosity(logging.WARNING)
  try:
    formats = parse_formats(values.format)
    precisions = format_precisions(formats, values.precision)
    config = config_flags.load_from_flags(inference=True)
    options = config.export_options
    batch_size = parse_batch_size(values.batch_size, options.batch_size)
    input_types = values.input_type or list(options.input_type) or list(serving_lib.INPUT_TYPES)
    version = values.version if values.version is not None else options.version
    directory = os.path.join(values.output_path, str(version))
    modules = {}
    for name in formats:
      if precisions[name] not in modules:
        module = serving_lib.build_serving_module(config, batch_size=batch_size,
                                                  precision=precisions[name])
        restored = serving_lib.restore_model(module.model, checkpoint)
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
  except (config_lib.ConfigError, checkpoints.CheckpointMismatchError, ValueError,
          ImportError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


def run():
  define_flags()
  command_line.run(main)
