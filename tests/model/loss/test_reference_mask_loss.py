"""CMT's reference-mask approximation loss against a numpy reference, and its wiring."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.config import validation
from deeplab2_kmax.model.loss import mask_transformer_loss
from tests.model.conftest import TINY_TEXTPROTO
from tests.model.conftest import parse
from tests.model.loss import numpy_reference as ref
from tests.model.loss.test_mask_transformer_loss import DESCRIPTOR
from tests.model.loss.test_mask_transformer_loss import SEMANTIC
from tests.model.loss.test_mask_transformer_loss import THING_CLASS
from tests.model.loss.test_mask_transformer_loss import THING_ID
from tests.model.loss.test_mask_transformer_loss import _ground_truth
from tests.model.loss.test_mask_transformer_loss import _options
from tests.model.loss.test_mask_transformer_loss import _outputs


def _numpy_reference_mask_loss(t, slot, reference_logits):
  """mean over matched masks k of 1 - dice(R[:, slot[k]] on non-void pixels, g_k)."""
  values = []
  for k, n in enumerate(slot):
    if n < 0:
      continue
    g = t['masks'][:, k]
    r = np.exp(reference_logits[:, n]) * t['non_void_pixel']
    values.append(1.0 - (g * r).sum() / ((g.sum() + r.sum()) / 2 + 1e-5))
  return np.mean(values) if values else 0.0


def test_reference_mask_loss_uses_the_final_matching():
  loss = mask_transformer_loss.MaskTransformerLoss(
      _options('pq_style_loss { weight: 3.0 } reference_mask_loss { weight: 0.5 }'),
      DESCRIPTOR, num_aux_outputs=2)
  outputs = _outputs(num_aux=2, seed=3)
  rng = np.random.default_rng(7)
  reference = [-rng.uniform(0, 3, size=(1, 4, 4, 3)) for _ in range(2)]
  for aux, logits in zip(outputs[common.PRED_AUXILIARY_OUTPUTS], reference):
    aux[common.PRED_REFERENCE_MASK_LOGITS] = tf.constant(logits, tf.float32)
  result = {k: v.numpy()[0] for k, v in loss(_ground_truth(), outputs).items()}
  assert set(result) - {common.TOTAL_LOSS, common.NON_FINITE_LOSS_COUNT} == set(
      loss.loss_terms)
  assert 'aux_1reference_mask_loss' in result and common.REFERENCE_MASK_LOSS not in result
  t = ref.targets(SEMANTIC[0], THING_ID[0], THING_CLASS[0], 2, (1,), (2,), 0)
  slot, _, _ = ref.match(
      t, outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(16, 3),
      outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].numpy()[0])
  assert (slot >= 0).sum() == 2
  for index, logits in enumerate(reference):
    expected = 0.5 * _numpy_reference_mask_loss(t, slot, logits.reshape(16, 3))
    np.testing.assert_allclose(result[f'aux_{index}reference_mask_loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(
      result[common.TOTAL_LOSS],
      sum(v for k, v in result.items() if k not in (common.TOTAL_LOSS,
                                                     common.NON_FINITE_LOSS_COUNT)), rtol=1e-6)


def test_perfect_reference_masks_give_zero_loss_and_the_gradient_reaches_them():
  loss = mask_transformer_loss.MaskTransformerLoss(
      _options('pq_style_loss { weight: 1.0 } reference_mask_loss { weight: 1.0 }'),
      DESCRIPTOR, num_aux_outputs=1)
  outputs = _outputs(num_aux=1, seed=3)
  t = ref.targets(SEMANTIC[0], THING_ID[0], THING_CLASS[0], 2, (1,), (2,), 0)
  slot, _, _ = ref.match(
      t, outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(16, 3),
      outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].numpy()[0])
  perfect = np.full((16, 3), -50.0)
  for k, n in enumerate(slot):
    if n >= 0:
      perfect[:, n] = np.where(t['masks'][:, k] > 0, 0.0, -50.0)
  logits = tf.Variable(perfect.reshape(1, 4, 4, 3), dtype=tf.float32)
  with tf.GradientTape() as tape:
    outputs[common.PRED_AUXILIARY_OUTPUTS][0][common.PRED_REFERENCE_MASK_LOGITS] = logits
    value = loss(_ground_truth(), outputs)['aux_0reference_mask_loss']
  assert float(value[0]) == pytest.approx(0.0, abs=1e-4)
  logits.assign(np.zeros((1, 4, 4, 3)))  # R = 1 everywhere: dice < 1, a useful gradient
  with tf.GradientTape() as tape:
    value = loss(_ground_truth(), outputs)['aux_0reference_mask_loss']
  assert float(value[0]) > 0.1
  assert float(tf.norm(tape.gradient(value, logits))) > 0


def test_missing_reference_masks_and_a_kmax_config_are_errors():
  loss = mask_transformer_loss.MaskTransformerLoss(
      _options('reference_mask_loss { weight: 1.0 }'), DESCRIPTOR, num_aux_outputs=1)
  with pytest.raises(ValueError, match='auxiliary output 0 has no "reference_mask_logits"'):
    loss(_ground_truth(), _outputs(num_aux=1))
  kmax = parse(TINY_TEXTPROTO + 'trainer_options { loss_options { reference_mask_loss {} } }')
  problems = validation.find_problems(kmax)
  assert any(p.field == 'trainer_options.loss_options.reference_mask_loss'
             and '(kmax)' in p.message for p in problems)
  cmt = parse(TINY_TEXTPROTO.replace('kmax {', 'cmt {')
              + 'trainer_options { loss_options { reference_mask_loss {} } }')
  assert not [p for p in validation.find_problems(cmt) if 'reference_mask_loss' in p.field]
