"""Helpers for the evaluation tests (imported by name; pytest puts this folder on sys.path)."""

import os

from deeplab2_kmax.data import datasets

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shared_dir() -> str:
  """`shared/` beside the repository, or $DEEPLAB2_KMAX_SHARED_DIR."""
  return os.environ.get('DEEPLAB2_KMAX_SHARED_DIR', os.path.join(_REPO_ROOT, '..', 'shared'))


def make_descriptor(num_classes, things=(), ignore_label=255, label_divisor=256,
                    category_ids=None, name='test'):
  """A small DatasetDescriptor; class i is named "c<i>"."""
  return datasets.DatasetDescriptor(
      name=name,
      class_names=tuple(f'c{i}' for i in range(num_classes)),
      class_has_instances=tuple(i in things for i in range(num_classes)),
      colors=datasets.generate_palette(num_classes),
      ignore_label=ignore_label,
      panoptic_label_divisor=label_divisor,
      category_ids=tuple(category_ids) if category_ids is not None else tuple(range(num_classes)))
