"""Panoptic copy-paste on hand-made 8x8 labels."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.input import copy_paste

DIVISOR = 1000
IGNORE = 255
THINGS = (11, 12)
VOID = IGNORE * DIVISOR  # 255000
PADDING = VOID + 1  # 255001

# Pasted sample: three thing instances, one crowd region, one stuff, void and padding.
A, B, C = 11 * DIVISOR + 1, 12 * DIVISOR + 2, 11 * DIVISOR + 3
CROWD = 12 * DIVISOR  # thing class, instance 0
STUFF = 5 * DIVISOR
PASTE_LABEL = np.array([
    [A, A, A, A, B, B, B, B],
    [A, A, A, A, B, B, B, B],
    [C, C, C, C, STUFF, STUFF, STUFF, STUFF],
    [C, C, CROWD, CROWD, STUFF, STUFF, STUFF, STUFF],
    [STUFF, STUFF, STUFF, STUFF, STUFF, STUFF, STUFF, STUFF],
    [STUFF, STUFF, STUFF, STUFF, STUFF, STUFF, STUFF, STUFF],
    [VOID, VOID, VOID, VOID, VOID, VOID, VOID, VOID],
    [PADDING, PADDING, PADDING, PADDING, PADDING, PADDING, PADDING, PADDING],
], np.int32)[..., None]
THING_SEGMENTS = (A, B, C, CROWD)
# Base sample: stuff class 3 with one thing instance of class 11 (instance 1, like A).
BASE_LABEL = np.full((8, 8, 1), 3 * DIVISOR, np.int32)
BASE_LABEL[5:8, 5:8] = 11 * DIVISOR + 1

_rng = np.random.default_rng(0)
BASE_IMAGE = _rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
PASTE_IMAGE = _rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)


def run_paste(seed, thing='random', stuff='random', void='none', **overrides):
  kwargs = dict(seed=tf.constant(seed, tf.int64), thing_option=thing, stuff_option=stuff,
                void_option=void, ignore_label=IGNORE, label_divisor=DIVISOR,
                thing_class_ids=THINGS)
  kwargs.update(overrides)
  base_label = kwargs.pop('label', BASE_LABEL)
  paste_label = kwargs.pop('paste_label', PASTE_LABEL)
  image, label = copy_paste.paste(BASE_IMAGE, base_label, PASTE_IMAGE, paste_label, **kwargs)
  return image.numpy(), label.numpy()


def expected_for(kept_ids, base_label=BASE_LABEL, paste_label=PASTE_LABEL):
  """Independent expectation when exactly the segments `kept_ids` are pasted."""
  mask = np.isin(paste_label, list(kept_ids))
  instance = paste_label % DIVISOR
  renumbered = np.where(instance == 0, paste_label,
                        (paste_label // DIVISOR) * DIVISOR + DIVISOR - 1 - instance)
  label = np.where(mask, renumbered, base_label)
  image = np.where(mask, PASTE_IMAGE, BASE_IMAGE)
  return image, label


def pasted_ids(image):
  """The pasted segment ids, read back from which image pixels changed."""
  changed = np.any(image != BASE_IMAGE, axis=-1)
  return set(np.unique(PASTE_LABEL[..., 0][changed]).tolist()), changed


@pytest.mark.parametrize('seed', [[0, 0], [1, 2], [7, 3], [123, 9]])
def test_all_things_only(seed):
  image, label = run_paste(seed, thing='all', stuff='none', void='none')
  want_image, want_label = expected_for(THING_SEGMENTS)
  np.testing.assert_array_equal(label, want_label)
  np.testing.assert_array_equal(image, want_image)


@pytest.mark.parametrize('seed', [[0, 0], [1, 2], [7, 3]])
def test_all_stuff_no_things(seed):
  image, label = run_paste(seed, thing='none', stuff='all', void='none')
  want_image, want_label = expected_for([STUFF])
  np.testing.assert_array_equal(label, want_label)
  np.testing.assert_array_equal(image, want_image)


@pytest.mark.parametrize('seed', [[0, 0], [5, 5]])
def test_everything_all_still_drops_padding(seed):
  image, label = run_paste(seed, thing='all', stuff='all', void='all')
  want_image, want_label = expected_for([A, B, C, CROWD, STUFF, VOID])
  np.testing.assert_array_equal(label, want_label)
  np.testing.assert_array_equal(image, want_image)
  np.testing.assert_array_equal(label[7], BASE_LABEL[7])  # the padding row


def test_renumbering_values():
  _, label = run_paste([0, 0], thing='all', stuff='none', void='none')
  assert label[0, 0, 0] == 11 * DIVISOR + 998  # A: instance 1 -> 1000 - 1 - 1
  assert label[0, 4, 0] == 12 * DIVISOR + 997  # B: instance 2
  assert label[2, 0, 0] == 11 * DIVISOR + 996  # C: instance 3
  assert label[3, 2, 0] == CROWD  # instance 0 stays 0
  assert label[6, 6, 0] == 11 * DIVISOR + 1  # base instance untouched (void row not pasted)


def test_none_everywhere_pastes_nothing():
  for s in range(10):
    image, label = run_paste([s, 1], thing='none', stuff='none', void='none')
    np.testing.assert_array_equal(label, BASE_LABEL)
    np.testing.assert_array_equal(image, BASE_IMAGE)


def test_random_pastes_whole_segments_and_follows_the_label():
  frequency = {segment: 0 for segment in (A, B, C, CROWD, STUFF, VOID)}
  nothing = 0
  draws = 300
  for s in range(draws):
    image, label = run_paste([s, 4], thing='random', stuff='random', void='random')
    kept, changed = pasted_ids(image)
    assert PADDING not in kept
    # Whole segments: every pixel of a kept id changed, none of the others did.
    np.testing.assert_array_equal(changed, np.isin(PASTE_LABEL[..., 0], list(kept)))
    want_image, want_label = expected_for(kept)
    np.testing.assert_array_equal(label, want_label)
    np.testing.assert_array_equal(image, want_image)
    for segment in kept:
      frequency[segment] += 1
    nothing += not kept
  # Each of the 7 distinct ids is kept with probability E[k] / 7 = 1/2 (k uniform in 0..7).
  for segment, count in frequency.items():
    assert 0.38 < count / draws < 0.62, (segment, count)
  # DeepLab2's scheme keeps none of the 6 pastable ids with probability
  # P(k=0) + P(k=1) / 7 = 1/8 + 1/56 = 1/7 (a per-segment coin would give 1/64).
  assert 0.08 < nothing / draws < 0.21, nothing


def test_sample_kept_segments_count_is_uniform():
  counts = np.zeros(6)
  positions = np.zeros(5)
  draws = 600
  for s in range(draws):
    keep = copy_paste.sample_kept_segments(tf.constant(5), tf.constant([s, 0])).numpy()
    counts[keep.sum()] += 1
    positions += keep
  # Uniform over 0..5: 100 each, std ~9.
  assert counts.min() > 60 and counts.max() < 140, counts
  # Each position kept with probability 1/2.
  assert np.all(np.abs(positions / draws - 0.5) < 0.08), positions


def test_same_seed_same_result_and_seeds_differ():
  first = run_paste([3, 8], void='random')
  again = run_paste([3, 8], void='random')
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  outcomes = {run_paste([s, 8], void='random')[1].tobytes() for s in range(20)}
  assert len(outcomes) >= 5


def test_dataset_map_matches_eager():
  seeds = np.array([[s, 2] for s in range(10)], np.int64)
  options = dict(thing_option='random', stuff_option='random', void_option='random',
                 ignore_label=IGNORE, label_divisor=DIVISOR,
                 thing_class_ids=tf.constant(THINGS))

  def fn(seed):
    return copy_paste.paste(BASE_IMAGE, BASE_LABEL, PASTE_IMAGE, PASTE_LABEL, seed=seed,
                            **options)

  graph = list(tf.data.Dataset.from_tensor_slices(seeds).map(fn))
  assert len({label.numpy().tobytes() for _, label in graph}) >= 3
  for seed, (image, label) in zip(seeds, graph):
    eager_image, eager_label = fn(tf.constant(seed))
    np.testing.assert_array_equal(image.numpy(), eager_image.numpy())
    np.testing.assert_array_equal(label.numpy(), eager_label.numpy())
    assert image.dtype == tf.float32 and label.dtype == tf.int32
    assert image.shape == (8, 8, 3) and label.shape == (8, 8, 1)


@pytest.mark.parametrize('thing_ids', [THINGS, list(THINGS), np.array(THINGS),
                                       tf.constant(THINGS), tf.constant(THINGS, tf.int64)])
def test_thing_class_ids_forms(thing_ids):
  _, label = run_paste([1, 1], thing='all', stuff='none', void='none',
                       thing_class_ids=thing_ids)
  np.testing.assert_array_equal(label, expected_for(THING_SEGMENTS)[1])


def test_no_thing_classes_makes_them_stuff():
  _, label = run_paste([1, 1], thing='all', stuff='none', void='none', thing_class_ids=())
  np.testing.assert_array_equal(label, BASE_LABEL)
  _, label = run_paste([1, 1], thing='none', stuff='all', void='none', thing_class_ids=())
  np.testing.assert_array_equal(label, expected_for([A, B, C, CROWD, STUFF])[1])


def test_coco_style_ignore_zero():
  # ignore_label 0, divisor 256: void is 0 and padding is 1.
  paste_label = np.array([[[0], [1]], [[256 * 7 + 2], [256 * 30]]], np.int32)
  base_label = np.full((2, 2, 1), 256 * 40, np.int32)
  image, label = copy_paste.paste(
      BASE_IMAGE[:2, :2], base_label, PASTE_IMAGE[:2, :2], paste_label, seed=[4, 4],
      thing_option='all', stuff_option='all', void_option='all', ignore_label=0,
      label_divisor=256, thing_class_ids=tf.range(1, 10))
  np.testing.assert_array_equal(label[..., 0].numpy(),
                                [[0, 256 * 40], [256 * 7 + 253, 256 * 30]])
  np.testing.assert_array_equal(image.numpy()[0, 1], BASE_IMAGE[0, 1])
  np.testing.assert_array_equal(image.numpy()[1, 0], PASTE_IMAGE[1, 0])


def test_instance_id_too_large_is_reported():
  bad = BASE_LABEL.copy()
  bad[0, 0] = 11 * DIVISOR + 500  # 500 >= 1000 // 2
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'(?s)base label.*500.*11500'):
    run_paste([0, 0], label=bad)
  bad_paste = PASTE_LABEL.copy()
  bad_paste[0, 0] = 12 * DIVISOR + 777
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'(?s)pasted label.*777'):
    run_paste([0, 0], paste_label=bad_paste)
  # The limit itself minus one is fine.
  ok = BASE_LABEL.copy()
  ok[0, 0] = 11 * DIVISOR + 499
  run_paste([0, 0], label=ok)


def test_instance_id_too_large_fails_inside_dataset_map():
  bad = BASE_LABEL.copy()
  bad[0, 0] = 11 * DIVISOR + 600
  dataset = tf.data.Dataset.from_tensors(tf.constant([1, 2], tf.int64)).map(
      lambda seed: copy_paste.paste(
          BASE_IMAGE, bad, PASTE_IMAGE, PASTE_LABEL, seed=seed, thing_option='none',
          stuff_option='none', void_option='none', ignore_label=IGNORE, label_divisor=DIVISOR,
          thing_class_ids=THINGS))
  with pytest.raises(tf.errors.InvalidArgumentError, match='600'):
    list(dataset)


def test_invalid_arguments():
  with pytest.raises(ValueError, match='thing_option "some".*random, none, all'):
    run_paste([0, 0], thing='some')
  with pytest.raises(ValueError, match='void_option'):
    run_paste([0, 0], void='All')
  with pytest.raises(ValueError, match='thing_class_ids'):
    run_paste([0, 0], thing_class_ids=[[11, 12]])
  with pytest.raises(ValueError, match='same dtype'):
    copy_paste.paste(BASE_IMAGE, BASE_LABEL, PASTE_IMAGE.astype(np.float64), PASTE_LABEL,
                     seed=[0, 0], thing_option='all', stuff_option='all', void_option='none',
                     ignore_label=IGNORE, label_divisor=DIVISOR, thing_class_ids=THINGS)
  with pytest.raises(ValueError, match='height, width'):
    copy_paste.paste(BASE_IMAGE, BASE_LABEL, PASTE_IMAGE[:4], PASTE_LABEL, seed=[0, 0],
                     thing_option='all', stuff_option='all', void_option='none',
                     ignore_label=IGNORE, label_divisor=DIVISOR, thing_class_ids=THINGS)
