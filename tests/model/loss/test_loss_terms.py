"""Each loss term against the plain numpy reference (numpy_reference.py) on tiny inputs:
4x4 pixels, 3 slots, 3 ground-truth masks of which 2 or 3 are real."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.model.layers import xla_elementwise
from deeplab2_kmax.model.loss import instance_discrimination
from deeplab2_kmax.model.loss import mask_id_cross_entropy
from deeplab2_kmax.model.loss import matching
from deeplab2_kmax.model.loss import pq_style
from deeplab2_kmax.model.loss import reduction
from deeplab2_kmax.model.loss import semantic
from deeplab2_kmax.model.loss import slot_softmax
from deeplab2_kmax.model.loss import targets as targets_lib
from tests.model import retained_tensors
from tests.model.loss import numpy_reference as ref

THINGS, STUFF, IGNORE = (1,), (2,), 0
SEMANTIC = np.array([
    [[2, 2, 1, 1], [2, 2, 1, 1], [2, 0, 1, 1], [0, 0, 2, 2]],
    [[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 1, 1], [2, 2, 1, 1]],
])
THING_ID = np.array([
    [[-1, -1, 0, 0], [-1, -1, 0, 0], [-1, -1, 0, 0], [-1, -1, -1, -1]],
    [[0, 0, -1, -1], [0, 0, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]],
])
THING_CLASS = np.array([[1, -1], [1, 1]])  # Image 0: 2 real masks; image 1: 3.


def _case(num_slots=3, seed=0, feature_dim=4):
  rng = np.random.default_rng(seed)
  mask_logits = rng.normal(scale=2.0, size=(2, 16, num_slots))
  class_logits = rng.normal(scale=2.0, size=(2, num_slots, 3))
  feature = rng.normal(size=(2, 16, feature_dim))
  feature /= np.linalg.norm(feature, axis=-1, keepdims=True)
  tf_targets = targets_lib.prepare_mask_targets(
      tf.constant(SEMANTIC), tf.constant(THING_ID), tf.constant(THING_CLASS), (4, 4),
      thing_class_ids=THINGS, stuff_class_ids=STUFF, ignore_label=IGNORE)
  np_targets = [ref.targets(SEMANTIC[b], THING_ID[b], THING_CLASS[b], 1, THINGS, STUFF, IGNORE)
                for b in range(2)]
  return mask_logits, class_logits, feature, tf_targets, np_targets


def _tf_match(tf_targets, mask_logits, class_logits):
  return matching.match(tf_targets, tf.constant(mask_logits, tf.float32),
                        tf.constant(class_logits, tf.float32))


@pytest.mark.parametrize('num_slots', [3, 2, 5])
def test_matching_equals_brute_force(num_slots):
  mask_logits, class_logits, _, tf_targets, np_targets = _case(num_slots)
  result = _tf_match(tf_targets, mask_logits, class_logits)
  for b in range(2):
    slot, dice, sim = ref.match(np_targets[b], mask_logits[b], class_logits[b])
    np.testing.assert_array_equal(result.matched_slot.numpy()[b], slot)
    expected_dice = np.zeros(num_slots)
    expected_prob = np.zeros(3)
    for k, n in enumerate(slot):
      if n >= 0:
        expected_dice[n] = dice[k, n]
        expected_prob[k] = sim[k, n]
    np.testing.assert_allclose(result.matched_mask_dice.numpy()[b], expected_dice, atol=1e-6)
    np.testing.assert_allclose(result.matched_class_prob.numpy()[b], expected_prob, atol=1e-6)
    target = result.slot_class_target.numpy()[b]
    for n in range(num_slots):
      masks = [k for k in range(3) if slot[k] == n]
      expected = np_targets[b]['channel'][masks[0]] if masks else 2  # 2 = void channel.
      assert target[n].argmax() == expected and target[n].sum() == 1


def test_matching_is_stop_gradient():
  mask_logits, class_logits, _, tf_targets, _ = _case()
  logits = tf.Variable(mask_logits, dtype=tf.float32)
  with tf.GradientTape() as tape:
    result = matching.match(tf_targets, logits, tf.constant(class_logits, tf.float32))
    total = tf.reduce_sum(result.matched_mask_dice) + tf.reduce_sum(result.void_ratio)
  assert tape.gradient(total, logits) is None


@pytest.mark.parametrize('num_slots', [3, 2, 5])
def test_slot_targets_give_each_pixel_its_masks_square_row_slot(num_slots):
  mask_logits, class_logits, _, tf_targets, _ = _case(num_slots=num_slots)
  result = _tf_match(tf_targets, mask_logits, class_logits)
  slots = matching.slot_targets(tf_targets, result, num_slots)
  square = result.slot_of_square_row.numpy()
  for b in range(2):
    for p in range(16):
      ks = np.nonzero(tf_targets.pixel_mask_one_hot.numpy()[b, p])[0]
      assert slots.pixel_in_mask.numpy()[b, p] == len(ks)
      if len(ks):
        real = square[b, ks[0]] < num_slots
        assert slots.pixel_slot_is_real.numpy()[b, p] == real
        if real:
          assert slots.pixel_slot.numpy()[b, p] == square[b, ks[0]]
    np.testing.assert_array_equal(slots.mask_slot_is_real.numpy()[b], square[b, :3] < num_slots)
  logits = matching.logit_of_pixel_slot(tf.constant(mask_logits, tf.float32), slots).numpy()
  expected = np.where(slots.pixel_slot_is_real.numpy() > 0,
                      np.take_along_axis(mask_logits, slots.pixel_slot.numpy()[..., None],
                                         axis=2)[..., 0], -99999.0)
  np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_sum_per_mask_equals_one_hot_product():
  _, _, feature, tf_targets, _ = _case(feature_dim=3)
  sums = matching.sum_per_mask(tf.constant(feature, tf.float32), tf_targets).numpy()
  expected = np.einsum('bpk,bpd->bkd', tf_targets.pixel_mask_one_hot.numpy(), feature)
  np.testing.assert_allclose(sums, expected, atol=1e-6)


@pytest.mark.parametrize('num_slots', [3, 2])
def test_pq_style_terms(num_slots):
  mask_logits, class_logits, _, tf_targets, np_targets = _case(num_slots, seed=1)
  result = _tf_match(tf_targets, mask_logits, class_logits)
  class_term = pq_style.class_term(tf.constant(class_logits, tf.float32),
                                   result.slot_class_target, result.slot_is_matched,
                                   result.matched_mask_dice, result.void_ratio).numpy()
  dice_term = pq_style.mask_dice_term(
      tf.constant(mask_logits, tf.float32), tf_targets,
      matching.slot_targets(tf_targets, result, num_slots), result.matched_class_prob).numpy()
  for b in range(2):
    slot, dice, sim = ref.match(np_targets[b], mask_logits[b], class_logits[b])
    np.testing.assert_allclose(
        class_term[b], ref.pq_class_term(np_targets[b], slot, dice, mask_logits[b],
                                         class_logits[b]), rtol=1e-5)
    np.testing.assert_allclose(
        dice_term[b], ref.pq_dice_term(np_targets[b], slot, sim, mask_logits[b]), rtol=1e-5)


def test_class_term_by_hand():
  # One slot matched to class 0 with dice 0.5, one unmatched slot with void ratio 0.2.
  logits = tf.constant([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
  target = tf.constant([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
  value = pq_style.class_term(logits, target, tf.constant([[1.0, 0.0]]),
                              tf.constant([[0.5, 0.0]]), tf.constant([[0.9, 0.2]])).numpy()
  # CE = log 3 for both; weights 0.75 * 0.5 and 0.25 * 0.2; mean over 2 slots.
  np.testing.assert_allclose(value, [np.log(3) * (0.375 + 0.05) / 2], rtol=1e-6)


def test_mask_id_cross_entropy():
  mask_logits, class_logits, _, tf_targets, np_targets = _case(seed=2)
  result = _tf_match(tf_targets, mask_logits, class_logits)
  value = mask_id_cross_entropy.mask_id_cross_entropy(
      tf.constant(mask_logits, tf.float32), matching.slot_targets(tf_targets, result, 3),
      tf_targets.pixel_non_void).numpy()
  for b in range(2):
    slot, _, _ = ref.match(np_targets[b], mask_logits[b], class_logits[b])
    np.testing.assert_allclose(value[b], ref.mask_id_ce(np_targets[b], slot, mask_logits[b]),
                               rtol=1e-5)


def test_mask_id_cross_entropy_with_fewer_slots_than_masks():
  # Masks left without a real slot are trained against a -99999 padding logit (DeepLab2's
  # dense form: logits padded to S columns, permuted, cross-entropy with one-hot rows).
  mask_logits, class_logits, _, tf_targets, _ = _case(num_slots=2, seed=4)
  result = _tf_match(tf_targets, mask_logits, class_logits)
  value = mask_id_cross_entropy.mask_id_cross_entropy(
      tf.constant(mask_logits, tf.float32), matching.slot_targets(tf_targets, result, 2),
      tf_targets.pixel_non_void).numpy()
  one_hot = tf_targets.pixel_mask_one_hot.numpy()
  square = result.slot_of_square_row.numpy()
  padded = np.concatenate([mask_logits, np.full((2, 16, 1), -99999.0)], axis=2)
  for b in range(2):
    permuted = padded[b][:, square[b]]
    log_normaliser = np.log(np.exp(mask_logits[b]).sum(-1))
    losses = [log_normaliser[p] - permuted[p, one_hot[b, p].argmax()]
              for p in range(16)
              if one_hot[b, p].any() and tf_targets.pixel_non_void.numpy()[b, p]]
    np.testing.assert_allclose(value[b], np.mean(losses), rtol=1e-6)


def test_prototype_instance_discrimination():
  _, _, feature, tf_targets, np_targets = _case(seed=3)
  value = instance_discrimination.prototype_instance_discrimination(
      tf.constant(feature, tf.float32), tf_targets).numpy()
  for b in range(2):
    np.testing.assert_allclose(
        value[b], ref.prototype_instance_discrimination(np_targets[b], feature[b]), rtol=1e-5)


def test_pixel_contrastive_on_given_pixels():
  _, _, feature, tf_targets, np_targets = _case(seed=4)
  pixels = np.array([[0, 2, 3, 5, 6, 15], [0, 1, 4, 9, 10, 15]])
  value = instance_discrimination.pixel_contrastive_instance_discrimination(
      tf.constant(feature, tf.float32), tf_targets, sample_k=6,
      sample_indices=tf.constant(pixels, tf.int32)).numpy()
  for b in range(2):
    np.testing.assert_allclose(value[b], ref.pixel_contrastive(np_targets[b], feature[b],
                                                               pixels[b]), rtol=1e-5)


def test_pixel_contrastive_sampling_skips_void_pixels():
  _, _, feature, tf_targets, np_targets = _case(seed=5)
  # Image 0 has 13 non-void pixels: drawing 13 must take exactly those, in any order.
  sampled = instance_discrimination.sample_pixels(tf_targets, 13, 0.6,
                                                  seed=tf.constant([1, 2])).numpy()
  assert set(sampled[0]) == set(np.nonzero(np_targets[0]['non_void_pixel'])[0])
  value = instance_discrimination.pixel_contrastive_instance_discrimination(
      tf.constant(feature, tf.float32), tf_targets, sample_k=13, seed=tf.constant([1, 2]))
  np.testing.assert_allclose(value.numpy()[0], ref.pixel_contrastive(
      np_targets[0], feature[0], sampled[0]), rtol=1e-5)


def test_gumbel_top_k_favours_large_logits():
  logits = tf.constant([[0.0, 3.0, -3.0, 0.0]] * 2000)
  first = instance_discrimination.gumbel_top_k(logits, 1, seed=tf.constant([0, 1])).numpy()
  frequency = np.bincount(first[:, 0], minlength=4) / 2000
  expected = ref.softmax(np.array([0.0, 3.0, -3.0, 0.0]))
  np.testing.assert_allclose(frequency, expected, atol=0.03)


@pytest.mark.parametrize('top_k', [1.0, 0.25])
def test_semantic_loss_with_weights_ignore_and_downsampling(top_k):
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 4, size=(1, 7, 7))
  labels[0, 0, 0] = 255  # Out-of-range ignore label.
  weights = rng.uniform(0.5, 3.0, size=(1, 7, 7))
  logits = rng.normal(size=(1, 4, 4, 4))
  value = semantic.semantic_loss(tf.constant(logits, tf.float32), tf.constant(labels),
                                 tf.constant(weights, tf.float32), 255, top_k).numpy()
  expected = ref.semantic_ce(logits[0], labels[0, ::2, ::2], weights[0, ::2, ::2], 255, top_k)
  np.testing.assert_allclose(value[0], expected, rtol=1e-5)


def test_mean_over_nonzero_by_hand():
  losses = tf.constant([[0.0, 2.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(reduction.mean_over_nonzero(losses).numpy(), [3.0, 0.0])
  np.testing.assert_allclose(reduction.mean_over_nonzero(losses, 0.25).numpy(), [4.0, 0.0])
  with pytest.raises(ValueError, match='top_k_percent'):
    reduction.mean_over_nonzero(losses, 0.0)


def test_pixel_contrastive_gradient_equals_dense_cross_entropy():
  # The loss pools features per mask instead of building the [k, k] target; its gradient must
  # equal that of the definition: softmax cross-entropy against the dense uniform target.
  _, _, feature, tf_targets, _ = _case(seed=4)
  pixels = tf.constant([[0, 2, 3, 5, 6, 15], [0, 1, 4, 9, 10, 15]], tf.int32)
  feature = tf.constant(feature, tf.float32)

  def dense(pixel_feature):
    sampled = tf.gather(pixel_feature, pixels, batch_dims=1)
    masks = tf.gather(tf_targets.pixel_mask_one_hot, pixels, batch_dims=1)
    same = tf.einsum('bik,bjk->bij', masks, masks)
    target = same / tf.maximum(tf.reduce_sum(same, axis=-1, keepdims=True), 1.0)
    cross_entropy = tf.nn.softmax_cross_entropy_with_logits(
        labels=target, logits=tf.einsum('bid,bjd->bij', sampled, sampled) / 0.3)
    return reduction.mean_over_nonzero(cross_entropy, 1.0)

  def pooled(pixel_feature):
    return instance_discrimination.pixel_contrastive_instance_discrimination(
        pixel_feature, tf_targets, sample_k=6, temperature=0.3, sample_indices=pixels)

  gradients = []
  for loss_fn in (dense, pooled):
    with tf.GradientTape() as tape:
      tape.watch(feature)
      value = tf.reduce_sum(loss_fn(feature))
    gradients.append(tape.gradient(value, feature).numpy())
  assert np.abs(gradients[0]).max() > 0
  np.testing.assert_allclose(gradients[1], gradients[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('xla', [False, True])
def test_similarity_log_sum_exp_gradient_and_memory(xla, monkeypatch):
  # The hand-written backward pass equals TF's differentiation of reduce_logsumexp, and keeps
  # no [batch, k, k] tensor from the forward pass (issue #19: 1.8 GB at 641x641, batch 2);
  # with its [batch, k, k] passes as TF ops (small k) and as XLA kernels (large k).
  monkeypatch.setattr(xla_elementwise, 'MIN_ELEMENTS', 0 if xla else 1 << 62)
  rng = np.random.RandomState(8)
  feature = tf.math.l2_normalize(tf.constant(rng.normal(size=(2, 50, 8)), tf.float32), -1)
  upstream = tf.constant(rng.normal(size=(2, 50)), tf.float32)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(feature)
    ours = instance_discrimination.similarity_log_sum_exp(feature, 0.3)
    reference = tf.reduce_logsumexp(tf.einsum('bid,bjd->bij', feature, feature) / 0.3, -1)
    ours_sum, reference_sum = (tf.reduce_sum(v * upstream) for v in (ours, reference))
  np.testing.assert_allclose(ours, reference, rtol=1e-6)
  np.testing.assert_allclose(tape.gradient(ours_sum, feature),
                             tape.gradient(reference_sum, feature), rtol=1e-5, atol=1e-6)
  spec = tf.TensorSpec([2, 50, 8], tf.float32)
  kept = retained_tensors.retained_for_backward(
      lambda f: instance_discrimination.similarity_log_sum_exp(f, 0.3), spec)
  assert not [shape for _, shape in kept if shape == (2, 50, 50)], kept
  kept_by_tf = retained_tensors.retained_for_backward(
      lambda f: tf.reduce_logsumexp(tf.einsum('bid,bjd->bij', f, f) / 0.3, -1), spec)
  assert [shape for _, shape in kept_by_tf if shape == (2, 50, 50)]


def test_slot_softmax_forms_equal_op_by_op_and_keep_only_logits():
  # log_sum_exp and softmax_mass (issue #19) against TF's differentiation of the same formulas,
  # and the memory property: no [batch, P, N] tensor but the logits waits for the backward.
  rng = np.random.RandomState(12)
  logits = tf.constant(rng.normal(0, 3, size=(2, 30, 7)), tf.float32)
  weight = tf.constant(rng.randint(0, 2, size=(2, 30)), tf.float32)
  up_lse = tf.constant(rng.normal(size=(2, 30)), tf.float32)
  up_mass = tf.constant(rng.normal(size=(2, 7)), tf.float32)

  def ours(values):
    lse = slot_softmax.log_sum_exp(values)
    return lse, slot_softmax.softmax_mass(values, lse, weight)

  def reference(values):
    lse = tf.reduce_logsumexp(values, axis=-1)
    return lse, tf.reduce_sum(tf.exp(values - lse[..., None]) * weight[..., None], axis=1)

  results = []
  for function in (ours, reference):
    with tf.GradientTape() as tape:
      tape.watch(logits)
      lse, mass = function(logits)
      value = tf.reduce_sum(lse * up_lse) + tf.reduce_sum(mass * up_mass)
    results.append((lse, mass, tape.gradient(value, logits)))
  for mine, theirs in zip(*results):
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
  spec = tf.TensorSpec([2, 30, 7], tf.float32)
  kept = retained_tensors.retained_for_backward(lambda v: tf.reduce_sum(ours(v)[1]), spec)
  assert [kind for kind, shape in kept if shape == (2, 30, 7)] == ['Placeholder'], kept
  kept_by_tf = retained_tensors.retained_for_backward(
      lambda v: tf.reduce_sum(reference(v)[1]), spec)
  assert len([kind for kind, shape in kept_by_tf if shape == (2, 30, 7)]) >= 2


@pytest.mark.parametrize('shape', [(2, 7, 5), (1, 900, 160)])
def test_pick_slot_equals_gather_and_its_gradient(shape):
  # The per-pixel slot logit with a one-pass gradient (issue #19) against TF's batched gather
  # and its scatter gradient; the larger shape runs the gradient as an XLA kernel.
  rng = np.random.RandomState(shape[1])
  logits = tf.constant(rng.normal(size=shape), tf.float32)
  slot = tf.constant(rng.randint(0, shape[-1], size=shape[:2]), tf.int32)
  upstream = tf.constant(rng.normal(size=shape[:2]), tf.float32)
  results = []
  for pick in (matching.pick_slot,
               lambda t, s: tf.gather(t, s[:, :, None], batch_dims=2)[:, :, 0]):
    with tf.GradientTape() as tape:
      tape.watch(logits)
      picked = pick(logits, slot)
      value = tf.reduce_sum(picked * upstream)
    results.append((picked, tape.gradient(value, logits)))
  np.testing.assert_array_equal(results[0][0], results[1][0])
  np.testing.assert_array_equal(results[0][1], results[1][1])
  assert np.count_nonzero(results[0][1]) == shape[0] * shape[1]
