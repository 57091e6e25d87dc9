"""Drives a run's Orbit trainer and evaluator: training loops, checkpoints, summaries and what
the user reads.

    controller = RunController(trainer, evaluator, global_step, manager, checkpoint,
                               steps_per_loop=20, checkpoint_interval=100, summary_interval=20,
                               total_steps=1000, summary_dir='runs/x', metrics_path=...)
    controller.train_and_evaluate(eval_interval=500)

It does what orbit.Controller did for us, differently where a user noticed:

- Console: one line per training loop (`[train] step 40/1000 loss ... lr ... images/s ... ETA`,
  plus `; saved ckpt-40` when the loop saved), the eval table after each evaluation, and a note
  before the first (silent) step, which traces and compiles. Orbit printed each loop's output
  dict twice (print and absl log): ~45 lines per loop.
- Every loop's scalars, and every evaluation's, go to `<model_dir>/metrics.jsonl` (one JSON
  object per line: `mode` "train" or "eval", `step`, `wall_time`, then the scalars under their
  TensorBoard names) and to TensorBoard (`train/` when a loop reaches a multiple of the
  summary interval; `eval/` after each evaluation).
- Checkpoints are numbered by the step they hold and written on multiples of the checkpoint
  interval (loops end there) and at the final step; Orbit saved at the first loop end and
  then every interval after it (interval 2: ckpt-1, ckpt-3).
- A checkpoint is written only when every variable it holds is finite (a diverging run can
  overflow a batch-norm moving variance to Inf while its loss stays finite). Otherwise training
  stops with NonFiniteStateError naming the variables and the last checkpoint whose variables
  are all finite; a non-finite loss (trainer.NonFiniteLossError), or one above
  trainer_options.loss_upper_bound (trainer.LossAboveBoundError), names that checkpoint too.
- Blow-up recovery (recovery_max_trials > 0): instead of stopping at such a loss, the last
  checkpoint whose variables are all finite is restored and training goes on from its step
  with the batches that follow the ones already read: the batches read since that checkpoint
  (the bad one among them) are skipped. The console says so (`[train] recovery 1/3: ...`) and
  metrics.jsonl gets a `"mode": "recovery"` record; the blow-up after the last allowed
  recovery stops training with the trainer's error, which then says how many recoveries were
  made. A fresh run with recovery saves its start step first (ckpt-0) so that a blow-up before
  the first interval checkpoint has one to return to.
- Preemption (trainer/preemption.py): with a `preemption` watcher set, every training loop
  starts with its check, where TensorFlow's PreemptionCheckpointHandler may save (through
  save_checkpoint) and exit with status 42 after a SIGTERM to any worker; metrics.jsonl then
  ends with a `"mode": "preemption"` record of the step saved.
- Train records of metrics.jsonl carry `first_step` as well as `step`: the loop trained the
  global steps first_step..step, so a run's records (the chief's in model_dir; each other
  worker's in its scratch folder) show which steps were trained, and after a resume or a
  recovery which ones were trained again.
"""

import json
import math
import os
import time
from typing import Callable, Optional

from absl import logging
import numpy as np
import orbit
import tensorflow as tf

from deeplab2_kmax.checkpoint import layout as checkpoint_layout
from deeplab2_kmax.trainer import checkpoints
from deeplab2_kmax.trainer import trainer as trainer_lib

METRICS_FILE = 'metrics.jsonl'
# Non-finite variables named in a NonFiniteStateError.
MAX_NAMED_VARIABLES = 3


class NonFiniteStateError(RuntimeError):
  """The variables to checkpoint hold a NaN or an Inf; nothing was saved."""


def loop_end(step: int, total_steps: int, steps_per_loop: int, *intervals: int) -> int:
  """The step the training loop starting after `step` ends at: steps_per_loop steps later,
  cut at the next multiple of each interval (checkpoints, evaluations) and at total_steps."""
  end = min(total_steps, step + steps_per_loop)
  for interval in intervals:
    if interval and interval > 0:
      end = min(end, (step // interval + 1) * interval)
  return end


def _json_value(value):
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsLog:
  """Appends one JSON object per line to `path` (None: writes nothing)."""

  def __init__(self, path: Optional[str]):
    self.path = path

  def append(self, mode: str, step: int, scalars: dict) -> None:
    if not self.path:
      return
    record = {'mode': mode, 'step': int(step), 'wall_time': round(time.time(), 3)}
    record.update({name: _json_value(value) for name, value in scalars.items()
                   if np.ndim(value) == 0})
    line = json.dumps(record) + '\n'
    try:
      if '://' in self.path:
        # Object stores (gs://) cannot append: rewrite the file.
        previous = (tf.io.gfile.GFile(self.path).read() if tf.io.gfile.exists(self.path)
                    else '')
        with tf.io.gfile.GFile(self.path, 'w') as f:
          f.write(previous + line)
      else:
        with open(self.path, 'a', encoding='utf-8') as f:
          f.write(line)
    except (OSError, tf.errors.OpError) as error:
      logging.warning('cannot write %s (%s); metrics go to TensorBoard only from now on.',
                      self.path, error)
      self.path = None


class RunController:
  """Runs training loops and evaluations (see the module docstring).

  Args:
    trainer: trainer.Trainer, or None (evaluation only).
    evaluator: evaluator.Evaluator, or None (training only).
    global_step: the run's int64 step variable.
    manager: tf.train.CheckpointManager of the run (None: no checkpoints are written).
    checkpoint: the tf.train.Checkpoint the manager saves.
    steps_per_loop: training steps per loop (one console line each).
    checkpoint_interval: save on multiples of this step count (0: only at the end).
    summary_interval: write training scalars to TensorBoard when a loop reaches a multiple.
    total_steps: the final training step.
    summary_dir: TensorBoard folder (train/ and eval/ below it); None writes none (non-chief
      workers).
    metrics_path: the JSON lines file (None: none).
    log_fn: receives the console lines.
    recovery_max_trials: blow-ups recovered from before one stops training (0: the first one
      does; see the module docstring).
  """

  def __init__(self, trainer, evaluator, global_step: tf.Variable,
               manager: Optional[tf.train.CheckpointManager],
               checkpoint: Optional[tf.train.Checkpoint], *, steps_per_loop: int,
               checkpoint_interval: int, summary_interval: int, total_steps: int,
               summary_dir: Optional[str], metrics_path: Optional[str],
               log_fn: Callable[[str], None] = print, recovery_max_trials: int = 0):
    self.trainer = trainer
    self.evaluator = evaluator
    self.global_step = global_step
    self.manager = manager
    self.checkpoint = checkpoint
    self.recovery_max_trials = max(0, recovery_max_trials)
    # Blow-ups recovered from by this process.
    self.recoveries = 0
    # preemption.PreemptionWatcher, set by the runner for training (None: SIGTERM kills).
    self.preemption = None
    self.variables = checkpoint_layout.named_variables(checkpoint) if checkpoint is not None else {}
    self.steps_per_loop = max(1, steps_per_loop)
    self.checkpoint_interval = max(0, checkpoint_interval)
    self.summary_interval = max(1, summary_interval)
    self.total_steps = total_steps
    self.log_fn = log_fn
    self.metrics = MetricsLog(metrics_path)
    directory = (lambda sub: os.path.join(summary_dir, sub)) if summary_dir else (lambda _: None)
    self.train_summaries = orbit.utils.SummaryManager(directory('train'), tf.summary.scalar,
                                                      global_step=global_step)
    self.eval_summaries = orbit.utils.SummaryManager(directory('eval'), tf.summary.scalar,
                                                     global_step=global_step)
    # The newest checkpoint known to hold only finite values: (path, step) or None.
    self.last_finite = None
    self._last_saved_step = None
    self._first_loop_done = False

  def note_restored(self, path: Optional[str]) -> None:
    """Records the checkpoint the run resumed from (after it was restored into the
    variables): it is the last finite one if its values are all finite."""
    if not path:
      return
    step = int(self.global_step.numpy())
    self._last_saved_step = step
    bad = checkpoints.non_finite_variables(self.variables)
    if bad:
      self.log_fn(f'[train] warning: {path} holds non-finite values in {len(bad)} variables '
                  f'({", ".join(bad[:MAX_NAMED_VARIABLES])}); training from it will diverge.')
    else:
      self.last_finite = (path, step)

  def last_finite_text(self) -> str:
    if self.last_finite is None:
      return 'No checkpoint with all-finite variables was written by this run.'
    path, step = self.last_finite
    return f'The last checkpoint whose variables are all finite is {path} (step {step}).'

  # ---- Checkpoints ----

  def save_checkpoint(self) -> Optional[str]:
    """Saves `ckpt-<step>` unless this step is saved already; returns its path or None.

    Raises:
      NonFiniteStateError: a variable holds a NaN or an Inf (nothing is written).
    """
    if self.manager is None:
      return None
    step = int(self.global_step.numpy())
    if step == self._last_saved_step:
      return None
    bad = checkpoints.non_finite_variables(self.variables)
    if bad:
      more = ', ...' if len(bad) > MAX_NAMED_VARIABLES else ''
      raise NonFiniteStateError(
          f'non-finite values (NaN/Inf) at step {step} in {len(bad)} '
          f'variable{"s" if len(bad) > 1 else ""} ({", ".join(bad[:MAX_NAMED_VARIABLES])}'
          f'{more}); the checkpoint of step {step} was not written and training stopped. '
          f'{self.last_finite_text()} Lower solver_options.base_learning_rate or enable '
          f'use_gradient_clipping, then resume.')
    path = self.manager.save(checkpoint_number=step, check_interval=False)
    self._last_saved_step = step
    self.last_finite = (path, step)
    return path

  # ---- Training ----

  def note_preemption(self, step: int, path: Optional[str]) -> None:
    """The metrics record of a preemption save (PreemptionWatcher's on_exit); `path`: the
    checkpoint written then (None: that step was saved already)."""
    del path  # metrics.jsonl holds numbers; the console line names the file.
    self.metrics.append('preemption', step, {})

  def _train_loop(self, end: int) -> None:
    if self.preemption is not None:
      # Every worker checks here, before the same loop: a preemption saves this step.
      self.preemption.check()
    start = int(self.global_step.numpy())
    if not self._first_loop_done:
      self.log_fn('[train] tracing and compiling the first step (about a minute on CPU)…')
    try:
      with self.train_summaries.summary_writer().as_default():
        output = self.trainer.train(tf.constant(end - start, tf.int32))
    except trainer_lib.LossBlowUpError as error:
      self._first_loop_done = True
      if self.recoveries < self.recovery_max_trials and self.last_finite is not None:
        self._recover(error, start)
        return
      made = (f' This was the blow-up after {self.recoveries} recover'
              f'{"y" if self.recoveries == 1 else "ies"} (trainer_options.recovery_max_trials: '
              f'{self.recovery_max_trials}).' if self.recovery_max_trials else '')
      raise type(error)(f'{error}{made} {self.last_finite_text()}', step=error.step,
                        loss=error.loss) from None
    self._first_loop_done = True
    step = int(self.global_step.numpy())
    scalars = {name: float(value) for name, value in (output or {}).items()}
    self.metrics.append('train', step, {'first_step': start + 1, **scalars})
    if step // self.summary_interval > start // self.summary_interval:
      self.train_summaries.write_summaries(output or {})
      self.train_summaries.flush()
    saved = None
    if self.checkpoint_interval and step % self.checkpoint_interval == 0:
      saved = self.save_checkpoint()
    line = self.trainer.last_line
    if saved:
      line += f'; saved {os.path.basename(saved)}'
    self.log_fn(line)

  def _recover(self, error: 'trainer_lib.LossBlowUpError', loop_start: int) -> None:
    """Restores the last all-finite checkpoint after `error` (a blow-up in the loop that
    started at global step `loop_start`); the data iterator stays where it is, so the batches
    read since that checkpoint are skipped."""
    self.recoveries += 1
    path, step = self.last_finite
    reached = int(self.global_step.numpy())
    checkpoint_layout.restore(self.checkpoint, path)
    # Not rewritten: that step's checkpoint is on disk already.
    self._last_saved_step = step
    what = ('non-finite (NaN/Inf) loss' if isinstance(error, trainer_lib.NonFiniteLossError)
            else f'loss {error.loss:.6g} above trainer_options.loss_upper_bound')
    skipped = reached - step
    steps = f'step {reached}' if skipped == 1 else f'steps {step + 1}-{reached}'
    self.log_fn(f'[train] recovery {self.recoveries}/{self.recovery_max_trials}: {what} at '
                f'step {error.step} (its update was not applied); restored '
                f'{os.path.basename(path)} (step {step}) and skipped the {skipped} batch'
                f'{"es" if skipped != 1 else ""} read since it ({steps} of the interrupted '
                f'loop); training goes on from step {step}.')
    self.metrics.append('recovery', step, {'bad_step': error.step, 'loss': error.loss,
                                           'restored_step': step, 'reached_step': reached,
                                           'skipped_batches': skipped,
                                           'trial': self.recoveries})

  def train(self, until_step: Optional[int] = None, eval_interval: int = 0,
            save_at_end: bool = True) -> None:
    """Trains to `until_step` (default total_steps), loops cut at checkpoint multiples and
    multiples of eval_interval; then saves (unless saved at this step already)."""
    until_step = self.total_steps if until_step is None else until_step
    step = int(self.global_step.numpy())
    if self.recovery_max_trials and self.last_finite is None and step < until_step:
      # Blow-up recovery needs a checkpoint to return to before the first interval one.
      path = self.save_checkpoint()
      if path:
        self.log_fn(f'[train] saved {os.path.basename(path)} (start step: blow-up recovery '
                    f'returns to it until a later checkpoint is written)')
    while step < until_step:
      self._train_loop(loop_end(step, until_step, self.steps_per_loop,
                                self.checkpoint_interval, eval_interval))
      step = int(self.global_step.numpy())
    if save_at_end:
      self._save_final()

  def _save_final(self) -> None:
    path = self.save_checkpoint()
    if path:
      self.log_fn(f'[train] saved {os.path.basename(path)} (final step)')

  # ---- Evaluation ----

  def evaluate(self, steps: int = -1):
    """One evaluation (the evaluator prints its table); returns its flat scalars."""
    with self.eval_summaries.summary_writer().as_default():
      output = self.evaluator.evaluate(tf.constant(steps, tf.int32))
    output = {name: np.asarray(value) for name, value in (output or {}).items()}
    self.eval_summaries.write_summaries(output)
    self.eval_summaries.flush()
    self.metrics.append('eval', int(self.global_step.numpy()), output)
    return output

  def train_and_evaluate(self, eval_steps: int = -1, eval_interval: int = 0):
    """Trains to total_steps, evaluating at every multiple of eval_interval and at the end."""
    step = int(self.global_step.numpy())
    output = None
    interval = eval_interval if eval_interval > 0 else self.total_steps
    while step < self.total_steps:
      target = min(self.total_steps, (step // interval + 1) * interval)
      self.train(target, eval_interval=interval, save_at_end=False)
      output = self.evaluate(eval_steps)
      step = int(self.global_step.numpy())
    self._save_final()
    return output
