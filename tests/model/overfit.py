"""Overfitting one synthetic image: a reusable end-to-end check of model + loss +
post-processing + PQ for any mask-transformer meta-architecture.

    result = overfit_one_image(experiment_options, steps=150)
    assert result.loss_reduction >= 0.8 and result.pq >= 0.9

The experiment options give the model (any meta-architecture `build_model` accepts), the loss
options and the evaluator options (post-processing). The scene comes from
data/synthetic/scenes.py at the train crop size; no augmentation, no drop path is the caller's
choice (set the keep probabilities to 1 in the options). The model is trained with Adam on the
same single example for `steps` steps, then run in inference mode and post-processed; PQ is
the official-rules PQ of evaluation/panoptic_quality.py against the scene's ground truth.
"""

import dataclasses
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.data.input import sample_generator
from deeplab2_kmax.data.synthetic import scenes as synthetic_scenes
from deeplab2_kmax.evaluation import panoptic_quality
from deeplab2_kmax.model import builder
from deeplab2_kmax.model.loss import builder as loss_builder
from deeplab2_kmax.model.post_processing import post_processor as post_processor_lib


@dataclasses.dataclass
class OverfitResult:
  """losses: total loss (float) of every step, before that step's update; pq: PQ (0..1) of the
  post-processed inference prediction after training; panoptic_pred / panoptic_gt: int32
  [height, width] maps; seconds: wall time of the training loop (compilation included)."""
  losses: list
  pq: float
  pq_results: dict
  panoptic_pred: np.ndarray
  panoptic_gt: np.ndarray
  seconds: float

  @property
  def loss_reduction(self) -> float:
    """1 - final / initial total loss; the final loss is the mean of the last 5 steps."""
    return 1.0 - float(np.mean(self.losses[-5:])) / self.losses[0]


def synthetic_batch(descriptor, crop_size, max_thing_id: int, scene_seeds, max_things: int = 3):
  """Synthetic scenes (no void blob) as one training batch.

  Returns:
    (batch: dict of [len(scene_seeds), ...] tensors with the keys the loss reads plus the image,
     panoptic ground truths: int32 [len(scene_seeds), height, width]).
  """
  height, width = crop_size
  examples, labels = [], []
  for scene_seed in scene_seeds:
    scene = synthetic_scenes.generate_scene(scene_seed, height, width, max_things=max_things,
                                            void_probability=0.0)
    label = scene.panoptic(descriptor.panoptic_label_divisor)
    targets, _ = sample_generator.panoptic_targets(
        tf.constant(label), label_divisor=descriptor.panoptic_label_divisor,
        ignore_label=descriptor.ignore_label, thing_class_ids=descriptor.thing_class_ids,
        max_thing_id=max_thing_id)
    targets[common.IMAGE] = tf.constant(scene.image, tf.float32)
    examples.append(targets)
    labels.append(label)
  batch = {key: tf.stack([example[key] for example in examples]) for key in examples[0]}
  return batch, np.stack(labels)


def overfit_one_image(experiment_options, *, steps: int = 150, learning_rate: float = 1e-2,
                      scene_seed: int = 0, seed: int = 0, jit_compile: bool = False,
                      build_model: Callable = builder.build_model,
                      log_every: Optional[int] = None) -> OverfitResult:
  """Trains a model on one synthetic image and scores its prediction.

  Args:
    experiment_options: config_pb2.ExperimentOptions with model_options, trainer_options.
      loss_options, train_dataset_options (dataset, crop_size, max_thing_id) and
      evaluator_options.
    steps: optimisation steps.
    learning_rate: Adam's learning rate (constant).
    scene_seed: which synthetic scene.
    seed: TF random seed (initialisation, pixel sampling of the loss).
    jit_compile: compile the gradient computation with XLA.
    build_model: (experiment_options, crop_size=...) -> built Keras model whose training call
      returns the loss's inputs and whose inference call returns the post-processor's.
    log_every: print the loss terms every so many steps (debugging).

  Returns:
    OverfitResult.
  """
  keras.utils.set_random_seed(seed)
  descriptor = builder.dataset_descriptor(experiment_options)
  dataset_options = experiment_options.train_dataset_options
  crop_size = tuple(dataset_options.crop_size)
  batch, panoptic_gt = synthetic_batch(descriptor, crop_size, dataset_options.max_thing_id,
                                       [scene_seed])
  panoptic_gt = panoptic_gt[0]
  model = build_model(experiment_options, crop_size=crop_size)
  loss = loss_builder.build_loss(experiment_options, descriptor)
  optimizer = keras.optimizers.Adam(learning_rate)
  optimizer.build(model.trainable_variables)

  def gradients(batch, step_seed):
    with tf.GradientTape() as tape:
      outputs = model(batch[common.IMAGE], training=True)
      losses = loss(batch, outputs, seed=step_seed)
      total = tf.reduce_sum(losses[common.TOTAL_LOSS])
    return losses, tape.gradient(total, model.trainable_variables)

  gradients_fn = tf.function(gradients, jit_compile=jit_compile)

  @tf.function
  def train_step(batch, step_seed):
    losses, grads = gradients_fn(batch, step_seed)
    optimizer.apply(grads, model.trainable_variables)
    return losses

  history = []
  start = time.monotonic()
  for step in range(steps):
    losses = train_step(batch, tf.constant([seed, step], tf.int32))
    history.append(float(losses[common.TOTAL_LOSS][0]))
    if log_every and step % log_every == 0:
      print(step, {k: round(float(v[0]), 4) for k, v in losses.items()
                   if not k.startswith(common.AUXILIARY_LOSS_PREFIX)})
  seconds = time.monotonic() - start

  processor = post_processor_lib.PostProcessor.from_options(
      experiment_options.evaluator_options, descriptor, crop_size)
  outputs = model(batch[common.IMAGE], training=False)
  panoptic_pred = processor(outputs)[common.PRED_PANOPTIC].numpy()[0]
  accumulator = panoptic_quality.PanopticQualityAccumulator.from_descriptor(descriptor)
  accumulator.update_panoptic(panoptic_gt, panoptic_pred)
  results = accumulator.results()
  pq = float(results[panoptic_quality.ALL][panoptic_quality.PQ])
  return OverfitResult(losses=history, pq=pq,
                       pq_results=results, panoptic_pred=panoptic_pred, panoptic_gt=panoptic_gt,
                       seconds=seconds)
