"""The assembled loss: key sets, weights, shared matching for auxiliary outputs, end-to-end
values against the numpy reference, NaN guard, mixed precision, tf.function/XLA, builder."""

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from deeplab2_kmax import common
from deeplab2_kmax.data import datasets
from deeplab2_kmax.model.loss import builder
from deeplab2_kmax.model.loss import mask_transformer_loss
from deeplab2_kmax.protos import config_pb2
from deeplab2_kmax.protos import trainer_pb2
from tests.model.loss import numpy_reference as ref

# 0 = ignore, 1 = thing, 2 = stuff; class head width 3 (thing, stuff, void).
DESCRIPTOR = datasets.DatasetDescriptor(
    name='tiny', class_names=('void', 'thing', 'stuff'), class_has_instances=(False, True, False),
    colors=((0, 0, 0),) * 3, ignore_label=0, panoptic_label_divisor=256, category_ids=(0, 1, 2))
ALL_TERMS = '''
pq_style_loss { weight: 3.0 }
mask_id_cross_entropy_loss { weight: 0.3 }
instance_discrimination_loss { weight: 1.0 }
semantic_loss { weight: 1.0 }
'''
# 7x7 labels; the 4x4 outputs keep every second pixel.
SEMANTIC = np.array([[
    [2, 9, 2, 9, 1, 9, 1], [9] * 7, [2, 9, 2, 9, 1, 9, 1], [9] * 7,
    [2, 9, 0, 9, 1, 9, 1], [9] * 7, [0, 9, 0, 9, 2, 9, 2]]])
THING_ID = np.where(SEMANTIC == 1, 0, -1)
THING_CLASS = np.array([[1, -1]])


def _options(text):
  return text_format.Parse(text, trainer_pb2.LossOptions())


def _ground_truth():
  return {common.GT_SEMANTIC: tf.constant(SEMANTIC), common.GT_THING_ID_MASK:
          tf.constant(THING_ID), common.GT_THING_ID_CLASS: tf.constant(THING_CLASS),
          common.SEMANTIC_LOSS_WEIGHT: tf.ones([1, 7, 7])}


def _head(rng, dtype=tf.float32):
  feature = rng.normal(size=(1, 4, 4, 4))
  feature /= np.linalg.norm(feature, axis=-1, keepdims=True)
  mask_logits = rng.normal(size=(1, 4, 4, 3)) * 2
  class_logits = rng.normal(size=(1, 3, 3)) * 2
  return {common.PRED_PIXEL_SPACE_MASK_LOGITS: tf.constant(mask_logits, dtype),
          common.PRED_TRANSFORMER_CLASS_LOGITS: tf.constant(class_logits, dtype),
          common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE: tf.constant(feature, dtype)}


def _outputs(num_aux=0, seed=0, dtype=tf.float32):
  rng = np.random.default_rng(seed)
  outputs = _head(rng, dtype)
  outputs[common.PRED_SEMANTIC_LOGITS] = tf.constant(rng.normal(size=(1, 4, 4, 3)), dtype)
  outputs[common.PRED_AUXILIARY_OUTPUTS] = [_head(rng, dtype) for _ in range(num_aux)]
  return outputs


def test_key_sets_follow_options():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR,
                                                   num_aux_outputs=2)
  result = loss(_ground_truth(), _outputs(num_aux=2))
  per_output = ['pq_style_loss_class_term', 'pq_style_loss_mask_dice_term',
                'mask_id_cross_entropy_loss', 'instance_discrimination_loss']
  expected = set(per_output + [f'aux_{i}{t}' for i in range(2) for t in per_output]
                 + ['semantic_loss'])
  assert set(loss.loss_terms) == expected
  assert set(result) == expected | {'total_loss', 'non_finite_loss_count'}
  assert all(value.shape == (1,) and value.dtype == tf.float32 for value in result.values())
  only_pq = mask_transformer_loss.MaskTransformerLoss(_options('pq_style_loss {}'), DESCRIPTOR)
  assert set(only_pq(_ground_truth(), _outputs())) == {
      'pq_style_loss_class_term', 'pq_style_loss_mask_dice_term', 'total_loss',
      'non_finite_loss_count'}


def test_end_to_end_values_weights_and_total():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR)
  outputs = _outputs()
  result = {k: v.numpy()[0] for k, v in loss(_ground_truth(), outputs).items()}
  t = ref.targets(SEMANTIC[0], THING_ID[0], THING_CLASS[0], 2, (1,), (2,), 0)
  mask_logits = outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(16, 3)
  class_logits = outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].numpy()[0]
  feature = outputs[common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE].numpy().reshape(16, 4)
  slot, dice, sim = ref.match(t, mask_logits, class_logits)
  expected = {
      'pq_style_loss_class_term': 3.0 * ref.pq_class_term(t, slot, dice, mask_logits,
                                                          class_logits),
      'pq_style_loss_mask_dice_term': 3.0 * ref.pq_dice_term(t, slot, sim, mask_logits),
      'mask_id_cross_entropy_loss': 0.3 * ref.mask_id_ce(t, slot, mask_logits),
      'instance_discrimination_loss': ref.prototype_instance_discrimination(t, feature),
      'semantic_loss': ref.semantic_ce(outputs[common.PRED_SEMANTIC_LOGITS].numpy()[0],
                                       SEMANTIC[0, ::2, ::2], np.ones((4, 4)), 0),
  }
  for name, value in expected.items():
    np.testing.assert_allclose(result[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(result['total_loss'], sum(expected.values()), rtol=1e-5)
  assert result['non_finite_loss_count'] == 0


def test_auxiliary_outputs_reuse_the_final_matching():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR,
                                                   num_aux_outputs=1)
  outputs = _outputs(num_aux=1, seed=3)
  result = {k: v.numpy()[0] for k, v in loss(_ground_truth(), outputs).items()}
  t = ref.targets(SEMANTIC[0], THING_ID[0], THING_CLASS[0], 2, (1,), (2,), 0)
  final_logits = outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(16, 3)
  final_class = outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].numpy()[0]
  aux = outputs[common.PRED_AUXILIARY_OUTPUTS][0]
  aux_logits = aux[common.PRED_PIXEL_SPACE_MASK_LOGITS].numpy().reshape(16, 3)
  aux_class = aux[common.PRED_TRANSFORMER_CLASS_LOGITS].numpy()[0]
  # Matching, dice and void-ratio weights come from the final output.
  slot, dice, sim = ref.match(t, final_logits, final_class)
  aux_slot, _, _ = ref.match(t, aux_logits, aux_class)
  assert not np.array_equal(slot, aux_slot)  # Otherwise the test would not tell.
  np.testing.assert_allclose(result['aux_0pq_style_loss_mask_dice_term'],
                             3.0 * ref.pq_dice_term(t, slot, sim, aux_logits), rtol=1e-5)
  np.testing.assert_allclose(result['aux_0mask_id_cross_entropy_loss'],
                             0.3 * ref.mask_id_ce(t, slot, aux_logits), rtol=1e-5)
  # Class term: aux class logits, final-output weights (void ratio of the final masks).
  np.testing.assert_allclose(result['aux_0pq_style_loss_class_term'],
                             3.0 * ref.pq_class_term(t, slot, dice, final_logits, aux_class),
                             rtol=1e-5)


def test_non_finite_terms_are_zeroed_and_counted():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR)
  outputs = _outputs()
  semantic_logits = outputs[common.PRED_SEMANTIC_LOGITS].numpy()
  semantic_logits[0, 0, 0, 0] = np.nan
  outputs[common.PRED_SEMANTIC_LOGITS] = tf.constant(semantic_logits)
  result = loss(_ground_truth(), outputs)
  assert result['semantic_loss'].numpy()[0] == 0.0
  assert result['non_finite_loss_count'].numpy()[0] == 1.0
  others = sum(result[k].numpy()[0] for k in loss.loss_terms if k != 'semantic_loss')
  np.testing.assert_allclose(result['total_loss'].numpy()[0], others, rtol=1e-6)


def test_mixed_precision_inputs_give_float32_losses():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR)
  full = loss(_ground_truth(), _outputs(seed=5))
  half = loss(_ground_truth(), _outputs(seed=5, dtype=tf.bfloat16))
  for name in loss.loss_terms:
    assert half[name].dtype == tf.float32
    np.testing.assert_allclose(half[name].numpy(), full[name].numpy(), rtol=0.05, err_msg=name)


def test_pixel_contrastive_runs_compiled_and_is_reproducible_with_a_seed():
  loss = mask_transformer_loss.MaskTransformerLoss(
      _options('instance_discrimination_loss { weight: 2.0 } pq_style_loss {}'), DESCRIPTOR,
      num_aux_outputs=1, sample_k=8)
  call = tf.function(lambda gt, out, seed: loss(gt, out, seed), jit_compile=True)
  outputs = _outputs(num_aux=1)
  first = call(_ground_truth(), outputs, tf.constant([4, 2]))
  second = call(_ground_truth(), outputs, tf.constant([4, 2]))
  np.testing.assert_array_equal(first['total_loss'].numpy(), second['total_loss'].numpy())
  assert np.isfinite(first['instance_discrimination_loss'].numpy()).all()
  assert first['aux_0instance_discrimination_loss'].numpy()[0] > 0


def test_gradients_reach_all_prediction_inputs():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR,
                                                   num_aux_outputs=1)
  outputs = _outputs(num_aux=1)
  variables = {k: tf.Variable(v) for k, v in outputs.items()
               if k != common.PRED_AUXILIARY_OUTPUTS}
  aux_variables = {k: tf.Variable(v)
                   for k, v in outputs[common.PRED_AUXILIARY_OUTPUTS][0].items()}
  with tf.GradientTape() as tape:
    result = loss(_ground_truth(), dict(variables, **{
        common.PRED_AUXILIARY_OUTPUTS: [aux_variables]}))
  grads = tape.gradient(result['total_loss'],
                        list(variables.values()) + list(aux_variables.values()))
  assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in grads)


def test_errors_name_the_problem():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR,
                                                   num_aux_outputs=2)
  with pytest.raises(ValueError, match='expects 2 auxiliary outputs.*returned 1'):
    loss(_ground_truth(), _outputs(num_aux=1))
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR)
  outputs = _outputs()
  outputs[common.PRED_TRANSFORMER_CLASS_LOGITS] = tf.zeros([1, 3, 4])
  with pytest.raises(ValueError, match='4 channels.*3 \\(void last\\)'):
    loss(_ground_truth(), outputs)
  with pytest.raises(ValueError, match='top_k_percent'):
    mask_transformer_loss.MaskTransformerLoss(
        _options('semantic_loss { top_k_percent: 1.5 }'), DESCRIPTOR)


def test_build_loss_from_experiment_config():
  experiment = text_format.Parse('''
    model_options { kmax { instance_discrimination_sample_k: 8 } }
    trainer_options { loss_options { pq_style_loss { weight: 3.0 }
                                     instance_discrimination_loss {} } }
    train_dataset_options { max_thing_id: 2 }''', config_pb2.ExperimentOptions())
  loss = builder.build_loss(experiment, DESCRIPTOR)
  assert len(loss.loss_terms) == 3 * 7  # Two PQ terms + instance discrimination, 1 + 6 outputs.
  assert builder.build_loss(experiment, DESCRIPTOR, num_aux_outputs=0).loss_terms == (
      'pq_style_loss_class_term', 'pq_style_loss_mask_dice_term',
      'instance_discrimination_loss')
  experiment.model_options.max_deeplab.SetInParent()
  assert builder.default_num_aux_outputs(experiment.model_options) == 0


def test_top_k_semantic_and_mask_id_losses_compile_with_xla():
  loss = mask_transformer_loss.MaskTransformerLoss(_options('''
      mask_id_cross_entropy_loss { top_k_percent: 0.5 }
      semantic_loss { top_k_percent: 0.2 }'''), DESCRIPTOR)
  eager = loss(_ground_truth(), _outputs())
  compiled = tf.function(loss, jit_compile=True)(_ground_truth(), _outputs())
  for name in loss.loss_terms:
    np.testing.assert_allclose(compiled[name].numpy(), eager[name].numpy(), rtol=1e-5)


def test_nan_mask_logits_do_not_stall_the_matching():
  loss = mask_transformer_loss.MaskTransformerLoss(_options(ALL_TERMS), DESCRIPTOR)
  outputs = _outputs()
  outputs[common.PRED_PIXEL_SPACE_MASK_LOGITS] = tf.fill([1, 4, 4, 3], np.nan)
  result = loss(_ground_truth(), outputs)
  assert result['non_finite_loss_count'].numpy()[0] >= 1
  assert np.isfinite(result['total_loss'].numpy()).all()
