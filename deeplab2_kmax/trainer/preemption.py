"""Preemption: a SIGTERM to any worker makes every worker save a checkpoint at the same step and
exit with RESTART_EXIT_CODE; the restarted job resumes from that checkpoint.

    watcher = PreemptionWatcher(strategy, save_fn=controller.save_checkpoint, log_fn=print)
    ...  # before each training loop, on every worker:
    watcher.check()           # returns, or saves and exits the process with status 42
    watcher.close()           # after training: the SIGTERM handler before it is back

The protocol is TensorFlow's (tf.distribute.experimental.PreemptionCheckpointHandler): the
handler installs a SIGTERM handler; the worker that receives the signal publishes, through the
cluster's coordination service, the number of `check()` calls after which every worker saves,
waits until every worker has acknowledged it, and all of them save at that call and exit.
Workers call `check()` at the same points (before each training loop, whose bounds every worker
computes alike), so "the same call" is the same global step. With one worker (MirroredStrategy,
one device) the handler works alone ("local mode"): the save comes before the next loop.

What we set through its TerminationConfig:
- save_fn: our checkpoint (`ckpt-<step>` in the run's CheckpointManager, refused when a
  variable is not finite: trainer/controller.py), not the handler's own numbering.
- exit_fn: a console line, then `sys.exit(RESTART_EXIT_CODE)`.

RESTART_EXIT_CODE is 42, the handler's own default outside Google Cloud (TensorFlow's
BorgTerminationConfig: `sys.exit(42)`); on a Google Cloud GPU VM the handler's default would
be 143, which is also what a process killed by an unhandled SIGTERM reports (128 + 15), so a
cluster manager could not tell "saved, restart me" from "killed before saving". 42 is neither
that, nor 0 (done) nor 1 (our errors: config, data, a loss blow-up). WORKSPACE.md shows how a
Kubernetes Job and a Slurm script restart on it.

The handler counts its calls in a variable it adds to the checkpoint it is given; we give it a
checkpoint of its own that is never written (save_fn saves ours), so our checkpoints keep their
layout. After a preemption every worker restarts, so every count starts at 0 again and they
agree. The handler detects Google Cloud by asking the metadata server (up to 5 s at start
elsewhere); on a Google Cloud CPU VM it does nothing (TensorFlow's limitation), on a Google
Cloud GPU VM it watches maintenance events instead of SIGTERM. TPUStrategy is not covered.

Reaction time: the save comes at the start of the next training loop (steps_per_loop steps, an
evaluation in train_and_eval mode), plus one more loop on the worker that got the signal when
several workers run; the grace period of the cluster manager (Kubernetes: 30 s by default) must
cover that and the checkpoint write.
"""

import os
import signal
import sys
import tempfile
from typing import Callable, Optional

import tensorflow as tf

RESTART_EXIT_CODE = 42


class PreemptionWatcher:
  """TensorFlow's PreemptionCheckpointHandler with our save and exit (module docstring).

  Args:
    strategy: the run's strategy (MultiWorkerMirrored, Mirrored or one device; not TPU).
    save_fn: saves the checkpoint of the current step on this worker and returns its path
      (None when that step was saved already).
    step_fn: the current global step.
    log_fn: receives the console line before the exit.
    on_exit: called before the exit (e.g. to append a metrics record).
  """

  def __init__(self, strategy: tf.distribute.Strategy, save_fn: Callable[[], Optional[str]],
               step_fn: Callable[[], int], log_fn: Callable[[str], None] = print,
               on_exit: Optional[Callable[[int, Optional[str]], None]] = None):
    self._save_fn = save_fn
    self._step_fn = step_fn
    self._log_fn = log_fn
    self._on_exit = on_exit
    self._saved: Optional[str] = None
    self._saved_step: Optional[int] = None
    # The handler replaces the SIGTERM handler; close() puts this one back.
    self._previous_sigterm = signal.getsignal(signal.SIGTERM)
    resolver = (strategy.cluster_resolver
                if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else None)
    # Never written (save_fn saves ours) nor created: the handler restores nothing from it and
    # its call counter starts at 0 on every (re)start of every worker.
    counter_dir = os.path.join(tempfile.gettempdir(), 'deeplab2_kmax_preemption_unused')
    counter = tf.train.CheckpointManager(tf.train.Checkpoint(), counter_dir, max_to_keep=1)
    self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        resolver, counter, termination_config=tf.distribute.experimental.TerminationConfig(
            exit_fn=self._exit, save_fn=self._save))

  def _save(self):
    self._saved_step = self._step_fn()
    self._saved = self._save_fn()

  def _exit(self):
    step = self._saved_step
    where = (f'saved {os.path.basename(self._saved)}' if self._saved else
             f'the checkpoint of step {step} was saved already')
    self._log_fn(f'[train] preemption (SIGTERM to a worker of this job): every worker stopped at '
                 f'step {step}; {where}; exiting with status {RESTART_EXIT_CODE} (restart me): '
                 f'the restarted job resumes from step {step}.')
    if self._on_exit is not None:
      self._on_exit(step, self._saved)
    sys.stdout.flush()
    sys.exit(RESTART_EXIT_CODE)

  def check(self) -> None:
    """Call before each training loop on every worker: saves and exits when a worker of the job
    received SIGTERM (the handler decides at which call); otherwise returns at once."""
    self.handler.save_checkpoint_if_preempted()

  def close(self) -> None:
    """Stops the handler's watcher threads and restores the previous SIGTERM handler."""
    handler, self.handler = self.handler, None
    if handler is not None:
      # What its __del__ does; called here so that it happens now, not at garbage collection.
      handler.__del__()  # pylint: disable=unnecessary-dunder-call
    if signal.getsignal(signal.SIGTERM) is not self._previous_sigterm:
      signal.signal(signal.SIGTERM, self._previous_sigterm)
