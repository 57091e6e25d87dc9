"""The Orbit trainer: one distributed optimisation step per batch, loss metrics per loop.

Per replica, the per-example loss terms ([per-replica batch]) are summed and divided by the
*global* batch, so the cross-replica sum of gradients is the gradient of the global-batch
mean whatever the replica count. A step whose loss has a NaN/Inf term, or whose global-batch
total loss is above trainer_options.loss_upper_bound (when positive), is a blow-up: it is not
applied, and the loop end raises NonFiniteLossError (NaN/Inf) or LossAboveBoundError naming the
first such step of the loop and its loss, before a checkpoint is saved. The controller
(trainer/controller.py) either stops with it, naming the last checkpoint whose values are all
finite, or recovers from that checkpoint (trainer_options.recovery_max_trials).

Each loop end leaves its console line in `last_line` (`[train] step 40/1000 loss ... lr ...
images/s elapsed ... ETA ...`; the controller prints it) and returns the loop's scalars. It also
counts the thing instances of each training crop: the first loop that met a crop with more
things than the model has mask slots (num_cluster_centers, MaX-DeepLab's num_mask_slots) warns
once through `log_fn`, naming both numbers, since every unmatched thing then adds its full
mask-ID cross-entropy and the loss reaches thousands.

Under `mixed_float16` the objective is multiplied by a dynamic loss scale and the gradients
divided by it (trainer/loss_scale.py, Keras LossScaleOptimizer's rule, kept here because the
runner drives one or two optimizers itself): a step whose loss is finite but whose gradients
overflow is skipped and halves the scale; loss_scale.GROWTH_STEPS good steps in a row double
it. Only a non-finite loss, or an overflow at a scale already at 1, stops training. Gradient
clipping sees the unscaled gradients, so clip_gradient_norm means the same in every precision.

A skipped step (overflow, or a non-finite loss) leaves the weights and every optimizer variable
untouched, the optimizers' `iterations` included (as LossScaleOptimizer does: Adam's bias
correction counts applied updates only); the global step still advances, so the learning-rate
schedule, which reads the global step, moves on by one. Batch-norm moving statistics come from
the forward pass and are updated either way, as in Keras.

With trainer_options.save_images_steps > 0, each step keeps its first (up to
MAX_IMAGE_SAMPLES) images and ground-truth panoptic maps of the first replica; a loop that
reaches a multiple of save_images_steps writes them to TensorBoard with the model's prediction
(inference mode, post-processed at the crop size) as `panoptic/sample_<i>`: input | ground truth
| prediction panels in the dataset's colours.

With trainer_options.jit_compile the per-replica forward, loss and backward are one XLA
cluster (the Hungarian matching included); the optimizer update stays outside it.

trainer_options.recompute is the model's business (model/recompute.py, set by the model
builder): the parts it names recompute their activations inside `tape.gradient` of this step,
with the forward pass's drop-path masks and without a second batch-norm update.
"""

import time
from typing import Optional

import keras
import numpy as np
import orbit
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import progress
from deeplab2_kmax import visualization
from deeplab2_kmax.trainer import loss_scale as loss_scale_lib
from deeplab2_kmax.trainer import optimizer as optimizer_lib

# Training image panels written per save_images_steps.
MAX_IMAGE_SAMPLES = 2


class LossBlowUpError(RuntimeError):
  """A training step's loss was NaN/Inf or above loss_upper_bound; str(error) names the step.

  Attributes:
    step: the global step of the first such step of the loop (its update was not applied).
    loss: that step's global-batch total loss (NaN/Inf, or the value above the bound).
  """

  def __init__(self, message: str, step: int = -1, loss: float = float('nan')):
    super().__init__(message)
    self.step = step
    self.loss = loss


class NonFiniteLossError(LossBlowUpError):
  """Training met a NaN/Inf loss; str(error) names the step."""


class LossAboveBoundError(LossBlowUpError):
  """Training met a finite loss above trainer_options.loss_upper_bound."""


def mask_slots(model_options) -> tuple[str, int]:
  """(config field, value) of the model's number of mask slots: kMaX's and CMT's
  num_cluster_centers, MaX-DeepLab's num_mask_slots."""
  meta = model_options.WhichOneof('meta_architecture')
  options = getattr(model_options, meta)
  name = 'num_mask_slots' if meta == 'max_deeplab' else 'num_cluster_centers'
  return f'model_options.{meta}.{name}', int(getattr(options, name))


class Trainer(orbit.StandardTrainer):
  """Trains `model` with `loss` (see the module docstring).

  Args:
    config: ExperimentOptions.
    model: built KMaXDeepLab (variables exist).
    loss: MaskTransformerLoss; called (batch, outputs, seed) -> dict of [batch] tensors.
    optimizer_groups: from optimizer.build_optimizers (built).
    global_step: int64 tf.Variable, the step counter of checkpoints and schedules.
    strategy: the tf.distribute strategy everything was built under.
    train_dataset: distributed dataset of training batches.
    log_fn: receives warnings (default print); the loop's line is left in `last_line`.
    post_processor: PostProcessor at the training crop; with `descriptor`, needed for the
      image summaries of trainer_options.save_images_steps (else none are written).
    descriptor: DatasetDescriptor of the training split (its colours).
    loss_scale: DynamicLossScale under mixed_float16, the one in the training checkpoint
      (default: a new one, not checkpointed); ignored in other precisions.
  """

  def __init__(self, config, model, loss, optimizer_groups, global_step, strategy,
               train_dataset, log_fn=print, post_processor=None, descriptor=None,
               loss_scale: Optional[loss_scale_lib.DynamicLossScale] = None):
    trainer_options = config.trainer_options
    super().__init__(train_dataset, orbit.StandardTrainerOptions(use_tf_function=True,
                                                                 use_tf_while_loop=False))
    self.config = config
    self.model = model
    self.loss = loss
    self.groups = optimizer_groups
    self.global_step = global_step
    self.strategy = strategy
    self.solver = trainer_options.solver_options
    self.global_batch = config.train_dataset_options.batch_size
    self.total_steps = self.solver.training_number_of_steps
    self.seed = trainer_options.seed
    self.log_fn = log_fn
    self.term_names = tuple(loss.loss_terms) + (common.TOTAL_LOSS,)
    self._group_of = {}
    for index, group in enumerate(optimizer_groups):
      for variable in group.variables:
        self._group_of[id(variable)] = index
    self.train_variables = [v for g in optimizer_groups for v in g.variables]
    policy = trainer_options.mixed_precision_policy
    self.loss_scaled = policy == 'mixed_float16'
    with strategy.scope():
      # Loss sums and the step count of the current loop (cross-replica sums).
      self._sums = {name: tf.Variable(0.0, trainable=False, name=f'sum_{name}')
                    for name in self.term_names}
      self._count = tf.Variable(0.0, trainable=False, name='loop_steps')
      # First step of the loop whose loss blew up (-1: none) and that step's total loss.
      self.bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name='bad_step')
      self.bad_loss = tf.Variable(0.0, trainable=False, name='bad_loss')
      # trainer_options.loss_upper_bound (0: no bound, only a NaN/Inf loss is a blow-up). A
      # variable rather than a constant traced into the step, so that it can change without
      # tracing the step again (tests/trainer/test_recovery.py does).
      self.loss_upper_bound = tf.Variable(float(trainer_options.loss_upper_bound),
                                          trainable=False, name='loss_upper_bound')
      self.dynamic_loss_scale = self.loss_scale = self.good_steps = None
      if self.loss_scaled:
        self.dynamic_loss_scale = loss_scale or loss_scale_lib.DynamicLossScale()
        # Its variables: the scale and the finite-gradient steps since it last changed.
        self.loss_scale = self.dynamic_loss_scale.value
        self.good_steps = self.dynamic_loss_scale.good_steps
      # Most thing instances in one training crop of the current loop.
      self.max_things = tf.Variable(0, dtype=tf.int32, trainable=False, name='max_things',
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.mask_slots_field, self.num_mask_slots = mask_slots(config.model_options)
    self._warned_things = False
    self.images_steps = trainer_options.save_images_steps
    self.post_processor = post_processor
    self.descriptor = descriptor
    self._vis = None
    if self.images_steps > 0 and post_processor is not None and descriptor is not None:
      per_replica = self.global_batch // strategy.num_replicas_in_sync
      count = min(MAX_IMAGE_SAMPLES, per_replica)
      height, width = config.train_dataset_options.crop_size
      with strategy.scope():
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self._vis = {
            common.IMAGE: tf.Variable(tf.zeros([count, height, width, 3]), trainable=False,
                                      name='vis_image', aggregation=first),
            common.GT_PANOPTIC: tf.Variable(tf.zeros([count, height, width], tf.int32),
                                            trainable=False, name='vis_panoptic',
                                            aggregation=first)}
      self._predict_fn = tf.function(self._predict)
    self._gradients_fn = (tf.function(self._gradients, jit_compile=True)
                          if trainer_options.jit_compile else self._gradients)
    self._loop_start = None
    self._loop_start_step = 0
    self._run_start = None
    self._run_start_step = None
    self.last_logs = {}
    self.last_line = ''

  # ---- Step ----

  def _gradients(self, batch, seed):
    with tf.GradientTape() as tape:
      outputs = self.model(batch[common.IMAGE], training=True)
      losses = self.loss(batch, outputs, seed=seed)
      scaled = {name: tf.reduce_sum(losses[name]) / self.global_batch
                for name in self.term_names}
      objective = scaled[common.TOTAL_LOSS]
      if self.loss_scaled:
        objective = objective * self.loss_scale
    gradients = tape.gradient(objective, self.train_variables)
    if self.loss_scaled:
      gradients = [None if g is None else g / self.loss_scale for g in gradients]
    bad = tf.reduce_sum(losses[common.NON_FINITE_LOSS_COUNT])
    return scaled, gradients, bad

  def _replica_step(self, batch):
    context = tf.distribute.get_replica_context()
    seed = tf.stack([tf.cast(self.seed, tf.int64) * 1009 + tf.cast(
        context.replica_id_in_sync_group, tf.int64), self.global_step])
    if self._vis is not None:
      self._keep_images(batch)
    things = tf.constant(0, tf.int32)
    if common.GT_THING_ID_CLASS in batch:
      # thing_id_class_gt: int [batch, max_thing_id], -1 padding after the crop's things.
      things = tf.reduce_max(tf.reduce_sum(
          tf.cast(batch[common.GT_THING_ID_CLASS] >= 0, tf.int32), axis=-1))
    # Strings (image names) cannot enter an XLA-compiled step, and the loss does not read them.
    batch = {key: value for key, value in batch.items() if value.dtype != tf.string}
    scaled, gradients, bad = self._gradients_fn(batch, tf.cast(seed, tf.int32))
    overflow = tf.cast(tf.logical_not(tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None])), tf.float32)
    num_replicas = self.strategy.num_replicas_in_sync
    # This replica's share of the global-batch mean; the sum over replicas is the step's loss.
    total_loss = tf.cast(scaled[common.TOTAL_LOSS], tf.float32)
    if num_replicas > 1:
      bad, overflow, total_loss = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                     [bad, overflow, total_loss])
    if self.loss_scaled:
      # A finite loss with overflowing gradients only skips the step (see module docstring).
      stop = tf.logical_or(bad > 0, self.dynamic_loss_scale.update(overflow))
      bad = tf.cast(stop, tf.float32)
    else:
      bad = bad + tf.cast(overflow > 0, tf.float32)
    # The loss builder leaves non-finite per-example terms out of the total (and counts them):
    # report such a step's loss as NaN. A finite loss above a positive bound blows up too.
    total_loss = tf.where(bad > 0, tf.constant(np.nan, tf.float32), total_loss)
    bound = self.loss_upper_bound.read_value()
    bad = bad + tf.cast(tf.logical_and(bound > 0, total_loss > bound), tf.float32)
    if self.solver.use_gradient_clipping:
      # `gradients` are unscaled already (_gradients divides by the loss scale).
      if num_replicas > 1:
        # Clip the summed gradient; the optimizer sums again, so hand it the per-replica share.
        gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
      gradients, _ = optimizer_lib.clip_gradients(self.solver, gradients)
      if num_replicas > 1:
        gradients = [g / num_replicas for g in gradients]
    # The same on every replica: `bad` and `overflow` are all-reduced.
    ok = tf.logical_and(tf.equal(bad, 0.0), tf.equal(overflow, 0.0))
    present = [i for i, g in enumerate(gradients) if g is not None]

    def apply(values):
      """Runs each optimizer on the (non-None) gradients `values`; replica context."""
      for index, group in enumerate(self.groups):
        pairs = [(g, self.train_variables[i]) for g, i in zip(values, present)
                 if self._group_of[id(self.train_variables[i])] == index]
        if pairs:
          group.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

    values = [gradients[i] for i in present]
    if num_replicas == 1 or tf.__internal__.distribute.strategy_supports_no_merge_call():
      tf.cond(ok, lambda: apply(values), lambda: None)
    else:
      # The optimizers merge_call (MirroredStrategy, MultiWorkerMirrored on CPUs), which a
      # cond in replica context cannot contain: decide in cross-replica context and apply per
      # replica from there, as Keras' LossScaleOptimizer does. Applying zeroed gradients
      # instead would still decay Adam's moments, apply AdamW's weight decay and count an
      # iteration.
      def cross_replica(strategy, ok, values):
        first_ok = strategy.experimental_local_results(ok)[0]
        tf.cond(first_ok,
                lambda: strategy.extended.call_for_each_replica(apply, args=(values,)),
                lambda: None)

      context.merge_call(cross_replica, args=(ok, values))
    return scaled, bad, things, total_loss

  def _keep_images(self, batch):
    for key, variable in self._vis.items():
      variable.assign(tf.cast(batch[key][:variable.shape[0]], variable.dtype))

  def _predict(self, images):
    outputs = self.model(images, training=False)
    return self.post_processor(outputs)[common.PRED_PANOPTIC]

  def _write_images(self, step: int):
    """Writes input | ground truth | prediction panels of the kept images at `step`."""
    images = self._vis[common.IMAGE].read_value()
    predictions = self._predict_fn(images).numpy()
    pixels = np.clip(images.numpy(), 0, 255).astype(np.uint8)
    ground_truth = self._vis[common.GT_PANOPTIC].numpy()
    # Orbit records only at its summary interval; these have their own.
    with tf.summary.record_if(True):
      for index in range(pixels.shape[0]):
        panel = visualization.grid([[
            pixels[index], visualization.colorize_panoptic(ground_truth[index], self.descriptor),
            visualization.colorize_panoptic(predictions[index], self.descriptor)]])
        tf.summary.image(f'panoptic/sample_{index}', panel[np.newaxis], step=step)

  def train_loop_begin(self):
    for variable in self._sums.values():
      variable.assign(0.0)
    self._count.assign(0.0)
    self.max_things.assign(0)
    # A recovered blow-up of an earlier loop is history.
    self.bad_step.assign(-1)
    self._loop_start = time.monotonic()
    self._loop_start_step = int(self.global_step.numpy())
    if self._run_start is None:
      self._run_start = self._loop_start
      self._run_start_step = self._loop_start_step

  def train_step(self, iterator):
    scaled, bad, things, total_loss = self.strategy.run(self._replica_step,
                                                        args=(next(iterator),))
    # ReduceOp has no MAX: this worker's replicas (a warning needs no more).
    self.max_things.assign(tf.maximum(self.max_things, tf.reduce_max(
        tf.stack(self.strategy.experimental_local_results(things)))))
    for name in self.term_names:
      self._sums[name].assign_add(self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                                       scaled[name], axis=None))
    # Every replica holds the same all-reduced count, so their mean is that count.
    bad = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, bad, axis=None)
    total_loss = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, total_loss, axis=None)
    first_bad = tf.logical_and(bad > 0, self.bad_step < 0)
    # The step being trained is global_step + 1 (the variable counts finished steps).
    self.bad_loss.assign(tf.where(first_bad, total_loss, self.bad_loss))
    self.bad_step.assign(tf.where(first_bad, self.global_step + 1, self.bad_step))
    self._count.assign_add(1.0)
    self.global_step.assign_add(1)

  def train_loop_end(self):
    bad_step = int(self.bad_step.numpy())
    if bad_step >= 0:
      loss = float(self.bad_loss.numpy())
      bound = float(self.loss_upper_bound.numpy())
      fix = ('lower solver_options.base_learning_rate or enable use_gradient_clipping')
      # (A float16 gradient overflow at loss scale 1 also stops a step with a finite loss.)
      if not (np.isfinite(loss) and 0 < bound < loss):
        raise NonFiniteLossError(
            f'non-finite (NaN/Inf) loss at step {bad_step}; training stopped and the update was '
            f'not applied ({fix}).', step=bad_step, loss=loss)
      raise LossAboveBoundError(
          f'loss {loss:.6g} at step {bad_step} is above trainer_options.loss_upper_bound '
          f'({bound:g}); training stopped and the update was not applied '
          f'({fix}, or raise loss_upper_bound if such losses are normal for this run).',
          step=bad_step, loss=loss)
    count = max(float(self._count.numpy()), 1.0)
    step = int(self.global_step.numpy())
    elapsed = time.monotonic() - self._loop_start
    images_per_second = (step - self._loop_start_step) * self.global_batch / max(elapsed, 1e-9)
    logs = {f'losses/{name}': float(self._sums[name].numpy()) / count
            for name in self.term_names}
    for group in self.groups:
      suffix = '' if group.name == 'main' else f'_{group.name}'
      logs[f'learning_rate{suffix}'] = float(group.learning_rate().numpy())
    logs['images_per_second'] = images_per_second
    if self.loss_scaled:
      logs['loss_scale'] = float(self.loss_scale.numpy())
    max_things = int(self.max_things.numpy())
    logs['max_things_per_crop'] = float(max_things)
    if max_things > self.num_mask_slots and not self._warned_things:
      self._warned_things = True
      self.log_fn(f'[train] warning: a training crop of the loop ending at step {step} has '
                  f'{max_things} thing instances but the model has only {self.num_mask_slots} '
                  f'mask slots ({self.mask_slots_field}); the unmatched things make the mask-ID '
                  f'loss explode (to thousands). Set {self.mask_slots_field} to at least '
                  f'{max_things} (stuff segments take slots too).')
    run_elapsed = time.monotonic() - self._run_start
    done = step - self._run_start_step
    eta = ((self.total_steps - step) * run_elapsed / done) if done > 0 else float('nan')
    eta_text = progress.format_duration(eta) if done > 0 else '?'
    self.last_line = (f'[train] step {step}/{self.total_steps} loss '
                      f'{logs["losses/" + common.TOTAL_LOSS]:.6f} lr '
                      f'{logs["learning_rate"]:.2e} {images_per_second:.1f} images/s elapsed '
                      f'{progress.format_duration(run_elapsed)} ETA {eta_text}')
    self.last_logs = logs
    if self._vis is not None and (step // self.images_steps >
                                  self._loop_start_step // self.images_steps):
      self._write_images(step)
    return {k: np.float32(v) for k, v in logs.items()}
