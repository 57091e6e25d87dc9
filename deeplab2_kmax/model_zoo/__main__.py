"""Command line of the model zoo: list, download, convert, readme (see __init__.py)."""

import argparse
import os
import sys

# The crop a conversion builds the model at: variable shapes do not depend on it.
_CONVERSION_CROP = (65, 65)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m deeplab2_kmax.model_zoo',
                                   description=__doc__)
  commands = parser.add_subparsers(dest='command', required=True)
  commands.add_parser('list', help='list the registry: name, dataset, metric, cached or not')
  download = commands.add_parser('download', help='download and extract a zoo checkpoint')
  download.add_argument('name')
  download.add_argument('--url', default=None, help='fetch from this address instead')
  convert = commands.add_parser(
      'convert', help='convert a DeepLab2 checkpoint (or zoo name) to our checkpoint layout')
  convert.add_argument('--from', dest='source', required=True,
                       help='DeepLab2 checkpoint prefix, folder or model-zoo name')
  convert.add_argument('--config_file', required=True, help='config of the model to fill')
  convert.add_argument('--output', required=True, help='prefix of the checkpoint to write')
  convert.add_argument('--allow_class_mismatch', action='store_true',
                       help='leave the class-dependent last layers unassigned when their '
                            'shapes differ (fine-tuning to other classes)')
  convert.add_argument('--encoder_only', action='store_true',
                       help='the source is an ImageNet backbone: fill the encoder only')
  convert.add_argument('--to_deeplab2', action='store_true',
                       help='the reverse: --from is our checkpoint, write DeepLab2\'s layout')
  readme = commands.add_parser('readme', help='regenerate model_zoo/README.md')
  readme.add_argument('--check', action='store_true',
                      help='exit 1 if model_zoo/README.md is not current')
  return parser


def _list() -> int:
  from deeplab2_kmax.model_zoo import download, registry  # pylint: disable=g-import-not-at-top
  root = download.cache_dir()
  print(f'# cache: {root} (${download.CACHE_ENV})')
  for entry in registry.load_registry().values():
    metric = next((f'{key} {value}' for key, value in entry.metrics.items()), '')
    cached = 'cached' if (root / 'checkpoints' / entry.name).exists() else ''
    print(f'{entry.name:<44} {entry.dataset:<20} {metric:<14} {cached:<7} {entry.config}')
  return 0


def _build_model(config_file: str):
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  config = loader.load_config(config_file, environ=loader.PlaceholderEnvironment(),
                              validate=False)
  return builder.build_model(config, crop_size=_CONVERSION_CROP)


def _read_source(args, source: str, read_fn):
  """read_fn(source), or ConversionError naming --from when there is no readable checkpoint."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.checkpoint import deeplab2_conversion  # pylint: disable=g-import-not-at-top
  try:
    return read_fn(source)
  except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as error:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise deeplab2_conversion.ConversionError(
        f'--from={args.source}: no readable checkpoint at {source} ({detail}); give a '
        'checkpoint prefix (the path before .index), its folder or a model-zoo name') from None


def _convert(args) -> int:
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from deeplab2_kmax.checkpoint import deeplab2_conversion
  from deeplab2_kmax.checkpoint import deeplab2_key_map
  from deeplab2_kmax.checkpoint import initial_checkpoint
  from deeplab2_kmax.checkpoint import layout as checkpoint_layout
  # pylint: enable=g-import-not-at-top
  source = initial_checkpoint.resolve_checkpoint_path(args.source, '--from')
  # Read before the (slower) model build, so that a wrong --from fails at once.
  if args.to_deeplab2:
    values = _read_source(args, source, deeplab2_conversion.read_our_checkpoint)
    model = _build_model(args.config_file)
    our_keys = deeplab2_conversion.our_variable_keys(model)
    shapes = {our_keys[path]: list(variable.shape)
              for path, variable in deeplab2_key_map.model_variable_paths(model).items()}
    rows = ([('shape', f'{key}: {list(values[key].shape)} in the checkpoint, {shape} in the '
                       'model') for key, shape in sorted(shapes.items())
             if key in values and list(values[key].shape) != shape]
            + [('missing', key) for key in sorted(set(shapes) - set(values))])
    if rows:
      raise deeplab2_conversion.ConversionError(checkpoint_layout.format_variable_report(
          f'{source} does not fit the model of {args.config_file}: '
          f'{sum(kind == "missing" for kind, _ in rows)} of its variables are missing, '
          f'{sum(kind == "shape" for kind, _ in rows)} have another shape',
          rows, listing_name='conversion'))
    path = deeplab2_conversion.write_deeplab2_checkpoint(
        deeplab2_conversion.to_deeplab2(model, values), args.output)
    print(f'[convert] wrote DeepLab2-layout checkpoint {path}')
    return 0
  reader = _read_source(args, source, tf.train.load_checkpoint)
  model = _build_model(args.config_file)
  report = deeplab2_conversion.from_deeplab2(
      reader, model, allow_class_mismatch=args.allow_class_mismatch,
      encoder_only=args.encoder_only, source=source)
  # Refused: the counts, the first few variables of each kind and a temp file with them all.
  report.check()
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  path = deeplab2_conversion.write_our_checkpoint(report.values, args.output)
  print(report.summary(listing_path=f'{path}.conversion.txt'))
  print(f'[convert] wrote {path} ({len(report.values)} variables); use it as '
        'model_options.initial_checkpoint')
  return 0


def _readme(check: bool) -> int:
  from deeplab2_kmax.model_zoo import registry  # pylint: disable=g-import-not-at-top
  text = registry.render_readme()
  if not check:
    registry.README_PATH.write_text(text)
    print(f'wrote {registry.README_PATH}')
    return 0
  current = registry.README_PATH.read_text() if registry.README_PATH.exists() else ''
  if current != text:
    print(f'{registry.README_PATH} is out of date; run python -m deeplab2_kmax.model_zoo '
          'readme', file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  # TensorFlow is imported only by `convert`, so that list/download/readme start quickly.
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model_zoo import download, registry  # pylint: disable=g-import-not-at-top
  errors = (registry.RegistryError, download.DownloadError, download.UnsafeArchiveError,
            loader.ConfigError)
  try:
    if args.command == 'list':
      return _list()
    if args.command == 'download':
      print(download.fetch_checkpoint(args.name, url=args.url))
      return 0
    if args.command == 'readme':
      return _readme(args.check)
    # pylint: disable=g-import-not-at-top
    from deeplab2_kmax.checkpoint import deeplab2_conversion
    from deeplab2_kmax.checkpoint import initial_checkpoint
    # pylint: enable=g-import-not-at-top
    errors += (deeplab2_conversion.ConversionError, initial_checkpoint.InitialCheckpointError)
    return _convert(args)
  except Exception as error:  # pylint: disable=broad-except
    if not isinstance(error, errors):
      raise
    print(f'error: {error}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
