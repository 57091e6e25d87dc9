"""The main job on the embedded synthetic dataset: data -> config -> input pipeline -> model ->
train -> eval -> export -> predict, as far as the package implements it today.

    python -m deeplab2_kmax.demo [--workdir=runs/demo] [--num_train=1000] [--num_val=100]

Each stage prints what it did and where its files are; stages whose code has not landed yet
say so and are skipped.
"""

import glob
import importlib.util
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from deeplab2_kmax import command_line
from deeplab2_kmax import common

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'configs', 'synthetic', 'kmax_r50_os32_synthetic_demo.textproto')

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Folder for data, model and outputs.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 1000, 'Synthetic training images.')
_NUM_VAL = flags.DEFINE_integer('num_val', 100, 'Synthetic validation images.')
_CONFIG_FILE = flags.DEFINE_string('config_file', CONFIG, 'Experiment config.')


def _say(stage: str, text: str) -> None:
  print(f'[demo:{stage}] {text}', flush=True)


def _available(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def stage_data(data_dir: str) -> None:
  # pylint: disable-next=g-import-not-at-top
  from deeplab2_kmax.data.build import synthetic as build_synthetic_data
  if os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
    _say('data', f'reusing synthetic data in {data_dir}')
    return
  info = build_synthetic_data.build(data_dir, _NUM_TRAIN.value, _NUM_VAL.value)
  _say('data', f'wrote {_NUM_TRAIN.value} train + {_NUM_VAL.value} val images to {data_dir} '
               f'in {info["seconds"]:.1f} s')


def stage_config():
  from deeplab2_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(_CONFIG_FILE.value)
  _say('config', f'{_CONFIG_FILE.value} parses and validates '
                 f'({config.model_options.WhichOneof("meta_architecture")}, '
                 f'{config.model_options.backbone.name}, crop '
                 f'{list(config.train_dataset_options.crop_size)})')
  return config


def stage_input(config, workdir: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import visualization  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.input import pipeline  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.formats import png_encoding  # pylint: disable=g-import-not-at-top
  train = pipeline.InputPipeline(config.train_dataset_options, is_training=True)
  iterator = train.iterate()
  batch = next(iterator)
  start = time.perf_counter()
  for _ in range(5):
    next(iterator)
  rate = 5 * config.train_dataset_options.batch_size / (time.perf_counter() - start)
  shapes = ', '.join(f'{k} {list(v.shape)}' for k, v in batch.items() if k != 'image_name')
  _say('input', f'training batches: {shapes}; {rate:.0f} images/s')
  rows = []
  for i in range(min(4, batch['image'].shape[0])):
    image = batch[common.IMAGE][i].numpy().astype(np.uint8)
    colors = visualization.colorize_panoptic(batch[common.GT_PANOPTIC][i].numpy(),
                                             train.descriptor)
    rows.append([image, colors, visualization.overlay(image, colors)])
  path = os.path.join(workdir, 'input_batch.png')
  with open(path, 'wb') as f:
    f.write(png_encoding.encode_png(visualization.grid(rows)))
  _say('input', f'a picture of augmented inputs and their ground truth: {path}')
  return batch


def stage_model(config, batch):
  if not _available('deeplab2_kmax.model.builder'):
    _say('model', 'skipped: the model (issue #3) has not landed yet')
    return
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  model = builder.build_model(config)
  outputs = model(batch[common.IMAGE], training=False)
  shapes = ', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items() if hasattr(v, 'shape'))
  _say('model', f'{model.count_params():,} parameters; outputs: {shapes}')


def stage_command(stage: str, module: str, args: list[str]) -> bool:
  if not _available(module):
    _say(stage, f'skipped: python -m {module} has not landed yet')
    return False
  command = [sys.executable, '-m', module] + args
  _say(stage, ' '.join(command))
  subprocess.run(command, check=True)
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  start = time.monotonic()
  workdir = os.path.abspath(_WORKDIR.value)
  data_dir = os.environ.setdefault(common.ENV_SYNTHETIC_DATA_DIR,
                                   os.path.join(workdir, 'data'))
  os.makedirs(workdir, exist_ok=True)
  from deeplab2_kmax import config as config_lib  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.data.input import pipeline  # pylint: disable=g-import-not-at-top
  try:
    stage_data(data_dir)
    config = stage_config()
    batch = stage_input(config, workdir)
    stage_model(config, batch)
    model_dir = os.path.join(workdir, 'model')
    flags_common = [f'--config_file={_CONFIG_FILE.value}', f'--model_dir={model_dir}']
    if stage_command('train', 'deeplab2_kmax.train', flags_common + ['--mode=train_and_eval']):
      stage_command('export', 'deeplab2_kmax.export',
                    flags_common + [f'--output_path={os.path.join(workdir, "export")}'])
      predictions = os.path.join(workdir, 'predictions')
      if stage_command('predict', 'deeplab2_kmax.predict',
                       [f'--model={os.path.join(workdir, "export")}',
                        f'--input={os.path.join(data_dir, "val_images", "*.png")}',
                        f'--output_dir={predictions}']):
        overlays = sorted(glob.glob(os.path.join(predictions, 'overlay', '*.png')))
        if overlays:
          _say('predict', f'look at {overlays[0]}: a validation image with its predicted '
                          'segments in class colours and a legend of the classes')
  except (config_lib.ConfigError, pipeline.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  except subprocess.CalledProcessError as error:
    print(f'error: {" ".join(error.cmd)} failed with status {error.returncode}',
          file=sys.stderr)
    return 1
  _say('done', f'finished in {time.monotonic() - start:.0f} s; outputs in {workdir}')
  return 0


if __name__ == '__main__':
  command_line.run(main)
