"""Assembles a run: model, loss, optimizers, checkpoints, datasets, Orbit trainer/evaluator and
the controller (trainer/controller.py), and runs one mode.

    run_experiment(config, mode='train_and_eval', model_dir='runs/x', strategy=strategy)

Modes: 'train' (to training_number_of_steps, checkpointing every save_checkpoints_steps),
'eval' (the latest checkpoint once), 'train_and_eval' (evaluate every eval_interval steps and
at the end), 'continuous_eval' (evaluate each new checkpoint until the final step or until no
new one comes within continuous_eval_timeout seconds).

Training modes first record the effective config and the command line in model_dir
(`experiment.textproto`, `command_line.txt`: config/run_record.py; a changed config is warned
about and the previous one kept), delete the `ckpt-<N>_temp/` folders a killed checkpoint
write left there (one console line names them), and warn once when a training crop holds more
thing instances than the model has mask slots (trainer.py).
"""

import os
import sys
import threading
from typing import Callable, Optional, Sequence

from absl import logging
import keras
import tensorflow as tf

from deeplab2_kmax import precision as precision_lib
from deeplab2_kmax.checkpoint import initial_checkpoint
from deeplab2_kmax.checkpoint import layout as checkpoint_layout
from deeplab2_kmax.checkpoint import model_restore
from deeplab2_kmax.config import run_record
from deeplab2_kmax.data import datasets
from deeplab2_kmax.data.input import pipeline as pipeline_lib
from deeplab2_kmax.model import builder as model_builder
from deeplab2_kmax.model.loss import builder as loss_builder
from deeplab2_kmax.model.post_processing import post_processor as post_processor_lib
from deeplab2_kmax.trainer import checkpoints
from deeplab2_kmax.trainer import controller as controller_lib
from deeplab2_kmax.trainer import evaluator as evaluator_lib
from deeplab2_kmax.trainer import loss_scale as loss_scale_lib
from deeplab2_kmax.trainer import optimizer as optimizer_lib
from deeplab2_kmax.trainer import preemption as preemption_lib
from deeplab2_kmax.trainer import strategy as strategy_lib
from deeplab2_kmax.trainer import trainer as trainer_lib

MODES = ('train', 'eval', 'train_and_eval', 'continuous_eval')


def _restore_pretrained(model, model_options, log_fn) -> None:
  """backbone.pretrained_weights into the encoder, then initial_checkpoint over the model (as
  DeepLab2 loads the former when building the encoder and restores the latter afterwards).
  Either may be ours, a DeepLab2 checkpoint or a model-zoo name."""
  if model_options.backbone.pretrained_weights:
    initial_checkpoint.restore_initial_checkpoint(
        model, model_options.backbone.pretrained_weights, encoder_only=True, log_fn=log_fn,
        field='model_options.backbone.pretrained_weights')
  if model_options.initial_checkpoint:
    initial_checkpoint.restore_initial_checkpoint(
        model, model_options.initial_checkpoint,
        restore_semantic_last_layer=(
            model_options.restore_semantic_last_layer_from_initial_checkpoint),
        restore_instance_last_layer=(
            model_options.restore_instance_last_layer_from_initial_checkpoint),
        log_fn=log_fn)


def on_accelerator(strategy: tf.distribute.Strategy) -> bool:
  """Whether the strategy's replicas run on GPUs or TPUs (not the CPU)."""
  return any(tf.DeviceSpec.from_string(device).device_type in ('GPU', 'TPU')
             for device in strategy.extended.worker_devices)


def warn_if_slow_bf16(policy: str, strategy: tf.distribute.Strategy,
                      flags=None) -> Optional[str]:
  """Logs (absl WARNING) and returns precision.slow_bf16_warning's message when a bfloat16
  policy runs on a CPU without native bfloat16; None otherwise. Called once per Experiment,
  outside every replica and loop.

  Args:
    policy: trainer_options.mixed_precision_policy.
    strategy: the run's strategy (GPU or TPU replicas never warn).
    flags: CPU flags (default: this machine's /proc/cpuinfo).
  """
  message = precision_lib.slow_bf16_warning(policy, on_accelerator(strategy), flags=flags)
  if message:
    logging.warning(message)
  return message


class NoCheckpointError(RuntimeError):
  """eval mode found no checkpoint to evaluate."""


def _distribute(strategy, pipeline, skip_batches: int = 0):
  def dataset_fn(input_context):
    dataset = pipeline.dataset(input_context)
    return dataset.skip(skip_batches) if skip_batches else dataset
  return strategy.distribute_datasets_from_function(dataset_fn)


class Experiment:
  """Everything of one run, built eagerly under the strategy's scope (see module docstring)."""

  def __init__(self, config, mode: str, model_dir: str,
               strategy: Optional[tf.distribute.Strategy] = None, log_fn: Callable = print,
               command_line: Optional[Sequence[str]] = None,
               checkpoint_path: Optional[str] = None):
    if mode not in MODES:
      raise ValueError(f'--mode must be one of {", ".join(MODES)}, got "{mode}".')
    if checkpoint_path and mode != 'eval':
      raise ValueError(f'--checkpoint_path={checkpoint_path} goes with --mode=eval only (got '
                       f'--mode={mode}); to start training from a checkpoint, set '
                       'model_options.initial_checkpoint.')
    # eval of a given checkpoint (a path or a model-zoo name) instead of model_dir's newest.
    self.checkpoint_path = checkpoint_path
    self.config = config
    self.mode = mode
    self.model_dir = model_dir
    self.strategy = strategy or strategy_lib.create_strategy()
    if mode == 'continuous_eval' and strategy_lib.num_workers(self.strategy) > 1:
      # Evaluation is collective, and each worker would pick up new checkpoints on its own
      # schedule: the workers would evaluate different ones.
      raise ValueError('--mode=continuous_eval runs on one machine: it follows the checkpoints '
                       'as they appear, which the workers of TF_CONFIG would each see at their '
                       'own time. Start it without TF_CONFIG (or with a one-task TF_CONFIG) '
                       'and the same --model_dir; --mode=eval evaluates one checkpoint on a '
                       'cluster.')
    self.log_fn = log_fn
    training = mode in ('train', 'train_and_eval')
    evaluating = mode != 'train'
    trainer_options = config.trainer_options
    train_options = config.train_dataset_options
    if train_options.deterministic:
      # Bit-identical reruns (and resumes): seeded initialisation and deterministic kernels.
      tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(trainer_options.seed)
    # Once per run, before anything is built: the model computes in this policy in every mode.
    warn_if_slow_bf16(trainer_options.mixed_precision_policy, self.strategy)
    source = train_options if training else config.eval_dataset_options
    self.descriptor = datasets.from_dataset_options(source)
    chief = strategy_lib.is_chief(self.strategy)
    if training and chief:
      change = run_record.write_run_record(
          model_dir, config, sys.argv if command_line is None else command_line)
      if change:
        log_fn(f'[train] warning: {change}')
    with self.strategy.scope():
      self.model = model_builder.build_model(config, descriptor=self.descriptor)
      self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name='global_step',
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.groups = (optimizer_lib.build_optimizers(trainer_options.solver_options, self.model,
                                                    self.global_step) if training else [])
      # Checkpointed with the run, so a resumed mixed_float16 run keeps its scale.
      self.loss_scale = (loss_scale_lib.DynamicLossScale() if training and
                         trainer_options.mixed_precision_policy == 'mixed_float16' else None)
      self.checkpoint = checkpoint_layout.make_checkpoint(self.model, self.groups,
                                                          self.global_step, self.loss_scale)
    self.manager = checkpoints.make_manager(self.checkpoint, model_dir, self.global_step,
                                            trainer_options, self.strategy)
    if not chief:
      # This worker's metrics.jsonl goes there before its first checkpoint does.
      tf.io.gfile.makedirs(self.manager.directory)
    if training:
      # This process is the one writer of checkpoints here: no save of ours is under way.
      removed = checkpoints.remove_unfinished_writes(self.manager.directory)
      if removed:
        log_fn(f'[train] removed {", ".join(removed)} from {self.manager.directory}: '
               f'unfinished checkpoint write(s) of an interrupted run.')
    # Evaluation reads model_dir's checkpoints on every worker: on a worker other than the
    # chief the manager keeps that worker's scratch copies, which a cluster evaluating a run
    # does not have. The newest one is restored here, so that a mismatch fails before anything
    # runs, with a readable message; --mode=eval evaluates it (run()).
    self._restored_for_eval = None
    if checkpoint_path:
      # Our layout, or DeepLab2's (a model-zoo download) converted in memory.
      restored = model_restore.restore_model(self.model, checkpoint_path)
      log_fn(f'[eval] evaluating {restored}')
    elif not training:
      self._restored_for_eval = tf.train.latest_checkpoint(model_dir)
      if self._restored_for_eval:
        # Optimizer slots in the file are not needed; every model variable must be found.
        checkpoint_layout.restore(self.checkpoint, self._restored_for_eval, partial=True)
    resumed = checkpoints.restore_latest(self.manager, log_fn) if training else None
    if resumed:
      log_fn(f'[train] resumed from {resumed} at step {int(self.global_step.numpy())}')
    elif training:
      # Only a fresh run starts from pretrained weights; a resumed one has its own.
      _restore_pretrained(self.model, config.model_options, log_fn)
    self.files = []
    self.trainer = self.evaluator = None
    if training:
      train_pipeline = pipeline_lib.InputPipeline(train_options, is_training=True,
                                                  descriptor=self.descriptor)
      self.files += train_pipeline.files
      # A deterministic run resumes on the batch it would have seen: skip the consumed ones.
      skip = int(self.global_step.numpy()) if train_options.deterministic else 0
      with self.strategy.scope():
        loss = loss_builder.build_loss(config, self.descriptor)
      self.trainer = trainer_lib.Trainer(config, self.model, loss, self.groups,
                                         self.global_step, self.strategy,
                                         _distribute(self.strategy, train_pipeline, skip),
                                         log_fn=log_fn, descriptor=self.descriptor,
                                         loss_scale=self.loss_scale,
                                         post_processor=post_processor_lib.PostProcessor
                                         .from_options(config.evaluator_options,
                                                       self.descriptor,
                                                       train_options.crop_size))
    if evaluating:
      eval_pipeline = pipeline_lib.InputPipeline(config.eval_dataset_options,
                                                 is_training=False)
      self.files += eval_pipeline.files
      self.evaluator = evaluator_lib.Evaluator(
          config, self.model,
          post_processor_lib.build_post_processor(config, eval_pipeline.descriptor),
          eval_pipeline.descriptor, self.global_step, self.strategy,
          _distribute(self.strategy, eval_pipeline), model_dir=model_dir if chief else None,
          log_fn=log_fn)
    total = trainer_options.solver_options.training_number_of_steps
    self.controller = controller_lib.RunController(
        self.trainer, self.evaluator, self.global_step, self.manager, self.checkpoint,
        steps_per_loop=max(1, min(trainer_options.steps_per_loop, total)),
        checkpoint_interval=trainer_options.save_checkpoints_steps,
        summary_interval=trainer_options.save_summaries_steps, total_steps=total,
        summary_dir=model_dir if chief else None,
        # Every worker logs the steps it trained: the chief in model_dir, the others in their
        # scratch folder (no TensorBoard there).
        metrics_path=os.path.join(model_dir if chief else self.manager.directory,
                                  controller_lib.METRICS_FILE),
        log_fn=log_fn, recovery_max_trials=trainer_options.recovery_max_trials)
    if resumed:
      self.controller.note_restored(resumed)
    self._preemption_enabled = (training and not isinstance(self.strategy,
                                                            tf.distribute.TPUStrategy)
                                # The handler installs a SIGTERM handler: main thread only.
                                and threading.current_thread() is threading.main_thread())

  def run(self):
    """Runs the mode; returns the last evaluation results (None when nothing was evaluated)."""
    options = self.config.trainer_options
    total = options.solver_options.training_number_of_steps
    eval_options = self.config.evaluator_options
    eval_steps = eval_options.eval_steps
    if self._preemption_enabled:
      # Created when the run starts (not in __init__): it installs the SIGTERM handler, which
      # close() below takes away again.
      self.controller.preemption = preemption_lib.PreemptionWatcher(
          self.strategy, save_fn=self.controller.save_checkpoint,
          step_fn=lambda: int(self.global_step.numpy()), log_fn=self.log_fn,
          on_exit=self.controller.note_preemption)
    try:
      if self.mode == 'train':
        self.controller.train(total)
      elif self.mode == 'train_and_eval':
        interval = eval_options.eval_interval
        self.controller.train_and_evaluate(eval_steps=eval_steps,
                                           eval_interval=max(1, min(interval, total)))
      elif self.mode == 'eval':
        if not self.checkpoint_path and not self._restored_for_eval:
          raise NoCheckpointError(
              f'no checkpoint in {self.model_dir} to evaluate; train first (--mode=train), '
              'point --model_dir at a trained run, or name one with --checkpoint_path (a '
              'checkpoint or a model-zoo name).')
        # The checkpoint restored in __init__.
        self.controller.evaluate(eval_steps)
      else:
        self._evaluate_continuously(eval_steps, eval_options.continuous_eval_timeout, total)
    except tf.errors.OpError as error:
      message = pipeline_lib.explain_error(error, self.files)
      if message is None:
        raise
      raise pipeline_lib.DataError(message) from None
    finally:
      if self.controller.preemption is not None:
        self.controller.preemption.close()
        self.controller.preemption = None
    return self.evaluator.last_results if self.evaluator else None


  def _evaluate_continuously(self, eval_steps: int, timeout: int, total_steps: int):
    """Evaluates each new checkpoint of model_dir (a results JSON each) until one at
    total_steps has been evaluated, or none newer arrives within `timeout` s (< 0: wait)."""
    self.log_fn(f'[eval] waiting for checkpoints in {self.model_dir}'
                + (f' (timeout {timeout} s)' if timeout >= 0 else ''))

    # No timeout_fn: checkpoints_iterator calls it after every checkpoint, not only on a
    # timeout; without one it simply ends when the timeout passes.
    for path in tf.train.checkpoints_iterator(self.model_dir,
                                              timeout=None if timeout < 0 else timeout):
      try:
        checkpoint_layout.restore(self.checkpoint, path, partial=True)
      except tf.errors.NotFoundError:
        # The trainer's CheckpointManager deleted it (keep N) before we got to it.
        self.log_fn(f'[eval] {path} was deleted before it could be evaluated; skipped.')
        continue
      self.controller.evaluate(eval_steps)
      if int(self.global_step.numpy()) >= total_steps:
        self.log_fn(f'[eval] evaluated the final step {total_steps}; stopping.')
        return
    self.log_fn(f'[eval] no new checkpoint in {self.model_dir} within {timeout} s; stopping.')


def run_experiment(config, mode: str, model_dir: str,
                   strategy: Optional[tf.distribute.Strategy] = None, log_fn: Callable = print,
                   command_line: Optional[Sequence[str]] = None,
                   checkpoint_path: Optional[str] = None):
  """Builds an Experiment and runs it; returns the last evaluation results or None."""
  return Experiment(config, mode, model_dir, strategy, log_fn, command_line,
                    checkpoint_path).run()
