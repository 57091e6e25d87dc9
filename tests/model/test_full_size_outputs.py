"""Output shapes of the full COCO kMaX-R50 at crop 641 against DeepLab2's (slow on CPU)."""

import json
import os

import numpy as np
import pytest

from deeplab2_kmax import common
from deeplab2_kmax.model import builder
from tests.conftest import upstream_reference



@pytest.mark.slow
def test_train_and_eval_output_shapes_at_641(coco_r50_options):
  model = builder.build_model(coco_r50_options(), crop_size=(641, 641))
  with open(upstream_reference('train_output_shapes.json')) as f:
    reference = json.load(f)
  outputs = model(np.zeros((2, 641, 641, 3), np.float32), training=True)
  shapes = {}
  for key, value in outputs.items():
    if key == common.PRED_AUXILIARY_OUTPUTS:
      for index, prediction in enumerate(value):
        for name, tensor in prediction.items():
          shapes[f'{key}[{index}].{name}'] = [list(tensor.shape), tensor.dtype.name]
    else:
      shapes[key] = [list(value.shape), value.dtype.name]
  assert shapes == reference
  eval_outputs = model(np.zeros((1, 641, 641, 3), np.float32), training=False)
  assert {k: list(v.shape) for k, v in eval_outputs.items()} == {
      common.PRED_SEMANTIC_LOGITS: [1, 161, 161, 134],
      common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE: [1, 161, 161, 128],
      common.PRED_TRANSFORMER_CLASS_LOGITS: [1, 128, 134],
      common.PRED_PIXEL_SPACE_MASK_LOGITS: [1, 161, 161, 128],
  }
