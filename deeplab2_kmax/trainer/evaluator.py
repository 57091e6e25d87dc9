"""The Orbit evaluator: model -> post-processing (in graph) -> PQ, mIoU and mask AP (on host).

Each eval step returns, per image, the prediction and ground truth at the raw image size
(padded to the batch's largest raw size); `eval_reduce` crops them to each image's size and
feeds the metric accumulators of deeplab2_kmax.evaluation, one set per worker (every local
replica's images); with several workers `eval_end` first adds up every worker's accumulators. `eval_end` returns flat scalars for
TensorBoard (`PQ/All`, `SQ/Things`, `mIoU`, `AP/AP`, ...), and writes the full results as
`<model_dir>/eval/results-<step>.json` (the global step of the evaluated checkpoint). The first
few images (evaluator_options.num_vis_samples, at most 4) go to TensorBoard as input | ground
truth | prediction panels in the dataset's colours.
"""

import json
import os
import time
from typing import Optional

import numpy as np
import orbit
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import visualization
from deeplab2_kmax.evaluation import instance_ap
from deeplab2_kmax.evaluation import miou as miou_lib
from deeplab2_kmax.evaluation import panoptic_quality
from deeplab2_kmax.trainer import strategy as strategy_lib

RESULTS_DIR = 'eval'


def results_path(model_dir: str, step: int) -> str:
  return os.path.join(model_dir, RESULTS_DIR, f'results-{step:08d}.json')


def segment_scores(panoptic: np.ndarray, instance_scores: np.ndarray) -> dict[int, float]:
  """Score of each predicted segment: the mean instance score over its pixels."""
  labels, inverse = np.unique(panoptic, return_inverse=True)
  sums = np.bincount(inverse.ravel(), weights=instance_scores.ravel().astype(np.float64))
  counts = np.bincount(inverse.ravel())
  return {int(label): float(s / c) for label, s, c in zip(labels, sums, counts)}


class Evaluator(orbit.StandardEvaluator):
  """Evaluates `model` on `eval_dataset` (see the module docstring).

  Args:
    config: ExperimentOptions.
    model: built KMaXDeepLab.
    post_processor: PostProcessor (called with the eval batch, so outputs are at raw size).
    descriptor: DatasetDescriptor of the eval split.
    global_step: the step variable (names the results file).
    strategy: tf.distribute strategy.
    eval_dataset: distributed eval dataset.
    model_dir: where results JSON files go (None: not written).
    compute_ap: run COCO mask AP (pycocotools) as well.
    log_fn: receives the metrics table.
  """

  def __init__(self, config, model, post_processor, descriptor, global_step, strategy,
               eval_dataset, model_dir: Optional[str] = None, compute_ap: bool = True,
               log_fn=print):
    use_tf_function = config.evaluator_options.use_tf_function
    super().__init__(eval_dataset, orbit.StandardEvaluatorOptions(
        use_tf_function=use_tf_function, use_tf_while_loop=False,
        recreate_iterator_for_each_eval=True))
    self.model = model
    self.post_processor = post_processor
    self.descriptor = descriptor
    self.global_step = global_step
    self.strategy = strategy
    self.model_dir = model_dir
    self.compute_ap = compute_ap and bool(descriptor.thing_class_ids)
    self.log_fn = log_fn
    self.num_vis = min(4, max(0, config.evaluator_options.num_vis_samples))
    self.last_results = None
    self._start = None

  def eval_begin(self):
    self._start = time.monotonic()
    return {'pq': panoptic_quality.PanopticQualityAccumulator.from_descriptor(self.descriptor),
            'miou': miou_lib.MeanIoU(self.descriptor.num_classes, self.descriptor.ignore_label),
            'ap': instance_ap.InstanceAPAccumulator(self.descriptor) if self.compute_ap else None,
            'images': 0, 'vis': []}

  def _replica_step(self, batch):
    outputs = self.model(batch[common.IMAGE], training=False)
    predictions = self.post_processor(outputs, batch)
    return {common.IMAGE: batch[common.IMAGE],
            common.RESIZED_SIZE: batch[common.RESIZED_SIZE],
            common.PRED_PANOPTIC: predictions[common.PRED_PANOPTIC],
            common.PRED_SEMANTIC: predictions[common.PRED_SEMANTIC],
            common.PRED_INSTANCE_SCORES: predictions[common.PRED_INSTANCE_SCORES],
            common.GT_PANOPTIC_RAW: batch[common.GT_PANOPTIC_RAW],
            common.GT_SEMANTIC_RAW: batch[common.GT_SEMANTIC_RAW],
            common.GT_IS_CROWD_RAW: batch[common.GT_IS_CROWD_RAW],
            common.GT_SIZE_RAW: batch[common.GT_SIZE_RAW]}

  def eval_step(self, iterator):
    return self.strategy.run(self._replica_step, args=(next(iterator),))

  def eval_reduce(self, state, step_outputs):
    for replica in self.strategy.experimental_local_results(
        tf.nest.map_structure(lambda x: x, step_outputs)):
      values = {k: np.asarray(v) for k, v in replica.items()}
      for i in range(values[common.GT_SIZE_RAW].shape[0]):
        height, width = (int(x) for x in values[common.GT_SIZE_RAW][i])
        crop = lambda key, i=i, h=height, w=width: values[key][i, :h, :w]
        gt, pred = crop(common.GT_PANOPTIC_RAW), crop(common.PRED_PANOPTIC)
        crowd = crop(common.GT_IS_CROWD_RAW)
        state['pq'].update_panoptic(gt, pred, gt_is_crowd=crowd)
        state['miou'].update(crop(common.GT_SEMANTIC_RAW), crop(common.PRED_SEMANTIC))
        if state['ap'] is not None:
          state['ap'].update(gt, pred, gt_is_crowd=crowd,
                             scores=segment_scores(pred, crop(common.PRED_INSTANCE_SCORES)))
        state['images'] += 1
        if len(state['vis']) < self.num_vis:
          state['vis'].append(self._panel(values, i, gt, pred))
    return state

  def _panel(self, values, i, gt, pred):
    """input | ground truth | prediction, uint8 [height, 3 * width + gaps, 3] at raw size."""
    resized_h, resized_w = (int(x) for x in values[common.RESIZED_SIZE][i])
    image = values[common.IMAGE][i, :resized_h, :resized_w]
    image = tf.image.resize(image, gt.shape, method='bilinear').numpy()
    image = np.clip(image, 0, 255).astype(np.uint8)
    return visualization.grid([[image, visualization.colorize_panoptic(gt, self.descriptor),
                                visualization.colorize_panoptic(pred, self.descriptor)]])

  def _merge_workers(self, state):
    """The accumulators over every worker's share of the eval set (on every worker).

    Under MultiWorkerMirrored each worker reads its own shard of the eval files (the input
    pipeline splits them), so its accumulators hold its share only; they are gathered through
    the strategy's collectives and added up in task order. PQ and mIoU equal one device's to
    float64 rounding; mask AP too, except where detections tie in score (COCOeval breaks ties
    by image order, and the images are numbered worker by worker here).
    """
    keys = ('pq', 'miou', 'ap', 'images')
    shares = strategy_lib.all_gather_objects(self.strategy, {k: state[k] for k in keys})
    merged = dict(state, **shares[0])
    for share in shares[1:]:
      for key in ('pq', 'miou', 'ap'):
        if merged[key] is not None:
          merged[key].merge(share[key])
      merged['images'] += share['images']
    return merged

  def eval_end(self, state):
    step = int(self.global_step.numpy())
    if strategy_lib.num_workers(self.strategy) > 1:
      state = self._merge_workers(state)
    results = {'step': step, 'num_images': state['images'],
               'panoptic_quality': state['pq'].results(),
               'miou': state['miou'].result()}
    if state['ap'] is not None:
      results['mask_ap'] = state['ap'].result()
    results['seconds'] = time.monotonic() - self._start
    self.last_results = results
    if self.model_dir:
      path = results_path(self.model_dir, step)
      tf.io.gfile.makedirs(os.path.dirname(path))
      with tf.io.gfile.GFile(path, 'w') as f:
        json.dump(results, f, indent=1, default=str)
    self.log_fn(format_results(results))
    for index, panel in enumerate(state['vis']):
      # Runs under Orbit's eval summary writer.
      tf.summary.image(f'panoptic/sample_{index}', panel[np.newaxis], step=step)
    return flat_scalars(results)


def flat_scalars(results) -> dict[str, np.float32]:
  """TensorBoard scalars of a results dict: PQ/SQ/RQ per group, mIoU, AP, AP50, AP75."""
  scalars = {}
  pq = results['panoptic_quality']
  for group in (common.PQ_ALL, common.PQ_THINGS, common.PQ_STUFF):
    for metric in (common.PQ, common.SQ, common.RQ):
      scalars[f'{metric.upper()}/{group}'] = np.float32(pq[group][metric])
  scalars['mIoU'] = np.float32(results['miou'][common.MIOU])
  for key in ('AP', 'AP50', 'AP75'):
    if key in results.get('mask_ap', {}):
      scalars[f'mask_AP/{key}'] = np.float32(results['mask_ap'][key])
  return scalars


def format_results(results) -> str:
  """The metrics table printed after each evaluation (values x 100)."""
  lines = [f'[eval] step {results["step"]}: {results["num_images"]} images in '
           f'{results["seconds"]:.1f} s',
           panoptic_quality.format_table(results['panoptic_quality'])]
  extra = f'mIoU {100 * results["miou"][common.MIOU]:.1f}'
  if 'mask_ap' in results:
    ap = results['mask_ap']
    extra += f'  mask AP {100 * ap["AP"]:.1f}  AP50 {100 * ap["AP50"]:.1f}'
  lines.append(extra)
  return '\n'.join(lines)
