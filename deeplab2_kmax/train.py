"""Trains and/or evaluates an experiment.

    python -m deeplab2_kmax.train --config_file=F --model_dir=D \
        --mode=train|eval|train_and_eval|continuous_eval [--config_override=...] \
        [--num_gpus=N] [--tpu=NAME]

    # Published weights, evaluated as they are (downloaded and converted on the fly):
    python -m deeplab2_kmax.train --config_file=F --model_dir=D --mode=eval \
        --checkpoint_path=kmax_resnet50_coco_train

The strategy comes from the flags and TF_CONFIG (see deeplab2_kmax/trainer/strategy.py).
Config and data errors print one line and exit with status 1; so does a --model_dir that is a
file or cannot be written, checked before anything is built. Training modes record the
effective config and the command line in the model directory (trainer/runner.py).
"""

import sys

from absl import app
from absl import flags

from deeplab2_kmax import command_line
from deeplab2_kmax import output_folder
from deeplab2_kmax.config import flags as config_flags

config_flags.define_config_flags()
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Run directory: checkpoints, TensorBoard '
                                 'summaries, eval results.', required=True)
_MODE = flags.DEFINE_enum('mode', 'train_and_eval',
                          ['train', 'eval', 'train_and_eval', 'continuous_eval'], 'What to run.')
_NUM_GPUS = flags.DEFINE_integer('num_gpus', 0, 'GPUs to use (0: CPU; >1: MirroredStrategy).')
_TPU = flags.DEFINE_string('tpu', '', 'TPU name or grpc:// address (TPUStrategy).')
_CHECKPOINT_PATH = flags.DEFINE_string(
    'checkpoint_path', None, 'With --mode=eval: evaluate this checkpoint instead of the newest '
    'in --model_dir (results still go to --model_dir): a ckpt-N prefix, a folder of '
    'checkpoints, a `model_zoo convert` output, or a model-zoo name (downloaded and converted '
    'on the fly).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Before TensorFlow is imported and anything built: a bad folder fails in a second.
  # Training creates --model_dir; evaluation leaves a missing one to its own message (there is
  # no checkpoint to evaluate, or continuous_eval waits for a trainer to create it).
  problem = output_folder.problem('--model_dir', _MODEL_DIR.value, 'checkpoints, summaries and '
                                  'eval results go there',
                                  create=_MODE.value in ('train', 'train_and_eval'))
  if not problem and _CHECKPOINT_PATH.value and _MODE.value != 'eval':
    problem = (f'--checkpoint_path goes with --mode=eval only (got --mode={_MODE.value}); to '
               'start training from a checkpoint, set model_options.initial_checkpoint.')
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 1
  if not flags.FLAGS['verbosity'].present:
    # The console gets one line per training loop and the eval tables; absl INFO lines from
    # TensorFlow and Orbit (per save, per evaluation) only with --verbosity=0.
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.WARNING)
  # Imported here so that --help and flag errors do not pay for TensorFlow's start-up.
  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import config as config_lib
  from deeplab2_kmax.checkpoint import initial_checkpoint
  from deeplab2_kmax.checkpoint import layout as checkpoint_layout
  from deeplab2_kmax.checkpoint import paths as checkpoint_paths
  from deeplab2_kmax.data.input import pipeline
  from deeplab2_kmax.trainer import controller
  from deeplab2_kmax.trainer import runner
  from deeplab2_kmax.trainer import strategy as strategy_lib
  from deeplab2_kmax.trainer import trainer
  # pylint: enable=g-import-not-at-top
  try:
    if _CHECKPOINT_PATH.value:
      # Before anything is built: a wrong path or name should not cost the model's build.
      checkpoint_paths.resolve_checkpoint(_CHECKPOINT_PATH.value)
    strategy = strategy_lib.create_strategy(num_gpus=_NUM_GPUS.value, tpu=_TPU.value)
    config = config_flags.load_from_flags(num_replicas=strategy.num_replicas_in_sync)
    runner.run_experiment(config, _MODE.value, _MODEL_DIR.value, strategy,
                          command_line=['python', '-m', 'deeplab2_kmax.train', *sys.argv[1:]],
                          checkpoint_path=_CHECKPOINT_PATH.value)
  except (config_lib.ConfigError, pipeline.DataError, trainer.LossBlowUpError,
          controller.NonFiniteStateError,
          runner.NoCheckpointError, strategy_lib.StrategyError,
          checkpoint_layout.CheckpointMismatchError,
          initial_checkpoint.InitialCheckpointError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  command_line.run(main)
