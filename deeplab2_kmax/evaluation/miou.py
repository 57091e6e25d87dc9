"""Mean intersection-over-union of semantic predictions, with an ignore label.

A confusion matrix over train ids is accumulated over the dataset; per class
IoU = TP / (TP + FP + FN), and mIoU is the mean over classes with TP + FP + FN > 0 (the rule of
DeepLab2's Keras MeanIoU). GT pixels of the ignore label are left out. The ignore label is not
averaged even where it is a train id (COCO's 0), and a predicted value outside the classes
(e.g. a VOID prediction of 255) counts as a miss of the GT class.
"""

from typing import Any

import numpy as np

from deeplab2_kmax import common


class MeanIoU:
  """Streaming mIoU: `update(gt, pred)` per image, `result()` at the end."""

  def __init__(self, num_classes: int, ignore_label: int):
    self.num_classes = num_classes
    self.ignore_label = ignore_label
    self.reset()

  def reset(self) -> None:
    # Rows: GT class; columns: predicted class, plus one column for "no class".
    self.confusion = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

  def update(self, gt_semantic: np.ndarray, pred_semantic: np.ndarray) -> None:
    """Adds one image.

    Args:
      gt_semantic: `[height, width]` integer train ids (ignore label allowed).
      pred_semantic: `[height, width]` integer predicted train ids.
    """
    gt = np.asarray(gt_semantic).astype(np.int64).ravel()
    pred = np.asarray(pred_semantic).astype(np.int64).ravel()
    if np.shape(gt_semantic) != np.shape(pred_semantic):
      raise ValueError(f'prediction {np.shape(pred_semantic)} and ground truth '
                       f'{np.shape(gt_semantic)} differ in size')
    keep = gt != self.ignore_label
    gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= self.num_classes):
      bad = gt[(gt < 0) | (gt >= self.num_classes)][0]
      raise ValueError(f'ground-truth label {bad} is neither a class in [0, {self.num_classes}) '
                       f'nor the ignore label {self.ignore_label}')
    pred = np.where((pred >= 0) & (pred < self.num_classes), pred, self.num_classes)
    self.confusion += np.bincount(gt * (self.num_classes + 1) + pred,
                                  minlength=self.num_classes * (self.num_classes + 1)).reshape(
                                      self.confusion.shape)

  def merge(self, other: 'MeanIoU') -> None:
    """Adds the images `other` has seen (e.g. another worker's share of the dataset)."""
    if other.confusion.shape != self.confusion.shape:
      raise ValueError(f'cannot merge mIoU over {other.num_classes} classes into one over '
                       f'{self.num_classes}')
    self.confusion += other.confusion

  def result(self) -> dict[str, Any]:
    """`{'miou': mean, 'per_class': {train_id: IoU}}` over classes with TP + FP + FN > 0."""
    tp = np.diag(self.confusion[:, :self.num_classes]).astype(np.float64)
    gt_total = self.confusion.sum(axis=1)
    pred_total = self.confusion[:, :self.num_classes].sum(axis=0)
    union = gt_total + pred_total - tp
    per_class = {}
    for class_id in range(self.num_classes):
      if class_id == self.ignore_label or union[class_id] == 0:
        continue
      per_class[class_id] = float(tp[class_id] / union[class_id])
    miou = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return {common.MIOU: miou, common.PER_CLASS: per_class}
