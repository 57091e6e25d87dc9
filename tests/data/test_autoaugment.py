"""AutoAugment ops against independent numpy implementations; policy table; determinism."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.data.input import autoaugment

# ---- Independent numpy references (uint8 [height, width, 3] in and out) ----


def np_blend(image1, image2, factor):
  """PIL-style blend in float32, truncated to uint8 (DeepLab2's numerics)."""
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  a = image1.astype(np.float32)
  b = image2.astype(np.float32)
  out = a + np.float32(factor) * (b - a)
  return np.clip(out, 0.0, 255.0).astype(np.uint8)


def np_invert(x):
  return (255 - x.astype(np.int32)).astype(np.uint8)


def np_posterize(x, bits):
  unit = 2 ** (8 - bits)
  return ((x.astype(np.int32) // unit) * unit).astype(np.uint8)


def np_solarize(x, threshold):
  return np.where(x.astype(np.int32) < threshold, x, 255 - x).astype(np.uint8)


def np_grey(x):
  """tf.image.rgb_to_grayscale's formula, computed in float64."""
  luma = x.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])
  # TF scales uint8 to [0, 1], weights, then converts back with a factor of 255.5, truncating.
  return np.floor(luma / 255.0 * 255.5).astype(np.uint8)


def np_color(x, factor):
  grey = np.repeat(np_grey(x)[..., None], 3, axis=2)
  return np_blend(grey, x, factor)


def np_contrast(x, factor):
  # DeepLab2's Contrast: a grey of (number of pixels) / 256, clipped to 255.
  grey = min(x.shape[0] * x.shape[1] // 256, 255)
  return np_blend(np.full_like(x, grey), x, factor)


def np_brightness(x, factor):
  return np_blend(np.zeros_like(x), x, factor)


def np_autocontrast(x):
  out = x.copy()
  for c in range(3):
    channel = x[:, :, c]
    low, high = int(channel.min()), int(channel.max())
    if high > low:
      scale = np.float32(255.0) / np.float32(high - low)
      offset = -np.float32(low) * scale
      stretched = channel.astype(np.float32) * scale + offset
      out[:, :, c] = np.clip(stretched, 0, 255).astype(np.uint8)
  return out


def np_equalize(x):
  """PIL's ImageOps.equalize, written from its definition, per channel."""
  out = x.copy()
  for c in range(3):
    channel = x[:, :, c].astype(np.int64)
    histogram = np.bincount(channel.ravel(), minlength=256)
    present = histogram[histogram > 0]
    step = (present.sum() - present[-1]) // 255
    if step == 0:
      continue
    lut = np.zeros(256, np.int64)
    running = step // 2
    for value in range(256):
      lut[value] = min(running // step, 255)
      running += histogram[value]
    out[:, :, c] = lut[channel].astype(np.uint8)
  return out


def np_smooth(x):
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.int64)
  values = x.astype(np.int64)
  out = x.copy()
  height, width = x.shape[:2]
  for i in range(1, height - 1):
    for j in range(1, width - 1):
      window = values[i - 1:i + 2, j - 1:j + 2, :]
      out[i, j, :] = (window * kernel[:, :, None]).sum(axis=(0, 1)) // 13
  return out


def np_sharpness(x, factor):
  return np_blend(np_smooth(x), x, factor)


NP_OPS = {
    'AutoContrast': np_autocontrast,
    'Equalize': np_equalize,
    'Invert': np_invert,
    'Posterize': np_posterize,
    'Solarize': np_solarize,
    'Color': np_color,
    'Contrast': np_contrast,
    'Brightness': np_brightness,
    'Sharpness': np_sharpness,
}


def random_image(seed, shape=(33, 33, 3), low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


def assert_mostly_equal(actual, expected, max_fraction=0.01):
  """Exact except for float rounding of TF's grey conversion: <= 1 level on a few pixels."""
  diff = np.abs(actual.astype(np.int32) - expected.astype(np.int32))
  assert diff.max() <= 1, diff.max()
  assert (diff > 0).mean() <= max_fraction, (diff > 0).mean()


# ---- Single operations ----


def test_invert():
  x = random_image(0)
  np.testing.assert_array_equal(autoaugment.invert(x).numpy(), 255 - x.astype(np.int32))


@pytest.mark.parametrize('bits', [0, 1, 2, 4, 7, 8])
def test_posterize(bits):
  x = random_image(1)
  np.testing.assert_array_equal(autoaugment.posterize(x, bits).numpy(), np_posterize(x, bits))


def test_posterize_keeps_high_bits_only():
  x = np.full((2, 2, 3), 0b10110111, np.uint8)
  assert autoaugment.posterize(x, 2).numpy()[0, 0, 0] == 0b10000000
  assert autoaugment.posterize(x, 0).numpy().max() == 0


@pytest.mark.parametrize('threshold', [0, 35, 128, 179, 255, 256])
def test_solarize(threshold):
  x = random_image(2)
  np.testing.assert_array_equal(
      autoaugment.solarize(x, threshold).numpy(), np_solarize(x, threshold))


def test_solarize_threshold_boundary():
  x = np.array([[[127, 128, 129]]], np.uint8)
  np.testing.assert_array_equal(autoaugment.solarize(x, 128).numpy(), [[[127, 127, 126]]])
  np.testing.assert_array_equal(autoaugment.solarize(x, 256).numpy(), x)


@pytest.mark.parametrize('factor', [0.0, 0.352, 0.5, 1.0, 1.36, 1.9])
def test_brightness(factor):
  x = random_image(3)
  np.testing.assert_array_equal(
      autoaugment.brightness(x, factor).numpy(), np_brightness(x, factor))


def test_brightness_known_values():
  x = np.array([[[0, 100, 200]]], np.uint8)
  # 100 * 0.5 = 50; 200 * 1.9 = 380 -> clipped to 255; 100 * 1.9 = 190.
  np.testing.assert_array_equal(autoaugment.brightness(x, 0.5).numpy(), [[[0, 50, 100]]])
  np.testing.assert_array_equal(autoaugment.brightness(x, 1.9).numpy(), [[[0, 190, 255]]])


@pytest.mark.parametrize('factor', [0.352, 1.0, 1.72, 1.9])
def test_color(factor):
  x = random_image(4)
  assert_mostly_equal(autoaugment.color(x, factor).numpy(), np_color(x, factor))


def test_color_factor_zero_is_grey():
  x = random_image(5)
  out = autoaugment.color(x, 0.0).numpy()
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert_mostly_equal(out[..., 0], np_grey(x))


@pytest.mark.parametrize('shape', [(33, 33, 3), (9, 40, 3), (600, 300, 3)])
@pytest.mark.parametrize('factor', [0.46, 1.9])
def test_contrast(shape, factor):
  x = random_image(6, shape)
  np.testing.assert_array_equal(autoaugment.contrast(x, factor).numpy(), np_contrast(x, factor))


def test_contrast_blends_from_pixel_count_grey():
  # 32x32 = 1024 pixels -> grey 4, whatever the content (DeepLab2's behaviour).
  x = np.full((32, 32, 3), 200, np.uint8)
  # 4 + 0.5 * (200 - 4) = 102.
  np.testing.assert_array_equal(autoaugment.contrast(x, 0.5).numpy(), np.full_like(x, 102))


@pytest.mark.parametrize('low,high', [(0, 256), (40, 90), (100, 101)])
def test_autocontrast(low, high):
  x = random_image(7, low=low, high=high)
  out = autoaugment.autocontrast(x).numpy()
  np.testing.assert_array_equal(out, np_autocontrast(x))
  if high - low > 1:
    np.testing.assert_array_equal(out.min(axis=(0, 1)), [0, 0, 0])
    np.testing.assert_array_equal(out.max(axis=(0, 1)), [255, 255, 255])


def test_autocontrast_per_channel_and_constant_channel():
  x = np.zeros((4, 4, 3), np.uint8)
  x[..., 0] = 77  # constant: unchanged
  x[:2, :, 1], x[2:, :, 1] = 10, 20  # -> 0 and 255
  x[..., 2] = np.arange(16, dtype=np.uint8).reshape(4, 4) * 2 + 50
  out = autoaugment.autocontrast(x).numpy()
  np.testing.assert_array_equal(out[..., 0], 77)
  np.testing.assert_array_equal(out[:2, :, 1], 0)
  np.testing.assert_array_equal(out[2:, :, 1], 255)
  assert out[0, 0, 2] == 0 and out[3, 3, 2] == 255


@pytest.mark.parametrize('seed,low,high,shape', [
    (8, 0, 256, (33, 33, 3)), (9, 30, 60, (33, 33, 3)), (10, 0, 256, (7, 9, 3)),
    (11, 0, 256, (20, 20, 3))])
def test_equalize(seed, low, high, shape):
  x = random_image(seed, shape, low, high)
  np.testing.assert_array_equal(autoaugment.equalize(x).numpy(), np_equalize(x))


def test_equalize_too_few_pixels_is_identity():
  # 7 * 9 = 63 pixels: the step (pixels below the brightest value) // 255 is 0.
  x = random_image(12, (7, 9, 3))
  np.testing.assert_array_equal(autoaugment.equalize(x).numpy(), x)


def test_equalize_matches_pil():
  pil_ops = pytest.importorskip('PIL.ImageOps')
  pil_image = pytest.importorskip('PIL.Image')
  x = random_image(13, (40, 35, 3), 20, 120)
  expected = np.asarray(pil_ops.equalize(pil_image.fromarray(x)))
  np.testing.assert_array_equal(autoaugment.equalize(x).numpy(), expected)


@pytest.mark.parametrize('factor', [0.0, 0.28, 1.0, 1.36, 1.9])
def test_sharpness(factor):
  x = random_image(14)
  np.testing.assert_array_equal(autoaugment.sharpness(x, factor).numpy(), np_sharpness(x, factor))


def test_sharpness_keeps_border_and_smooths_interior():
  x = np.zeros((5, 5, 3), np.uint8)
  x[2, 2] = 130
  smoothed = autoaugment.sharpness(x, 0.0).numpy()
  assert smoothed[2, 2, 0] == 130 * 5 // 13  # centre weight 5/13
  assert smoothed[1, 1, 0] == 130 // 13  # neighbour weight 1/13
  assert smoothed[0, 2, 0] == 0  # border row keeps its original value
  tiny = random_image(15, (2, 1, 3))
  np.testing.assert_array_equal(autoaugment.sharpness(tiny, 1.9).numpy(), tiny)


# ---- Policy table and level -> argument mapping ----

# DeepLab2's numeric encoding: (op index, probability index, level) x 2 per sub-policy.
_REDUCED_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize', 'Color',
                'Contrast', 'Brightness', 'Sharpness')
_PROBABILITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_ENCODED = (8, 2, 7, 7, 1, 10, 1, 0, 9, 6, 1, 10, 8, 1, 9, 5, 1, 9, 4, 1, 7, 1, 3, 9,
            8, 1, 1, 1, 1, 7)


@pytest.mark.parametrize('name,scale', [('simple_classification_policy', 1.0),
                                        ('simple_classification_policy_magnitude_scale_0.2',
                                         0.2)])
def test_policy_table_matches_encoding(name, scale):
  expected = []
  for start in range(0, len(_ENCODED), 6):
    steps = []
    for offset in (0, 3):
      op, prob, level = _ENCODED[start + offset:start + offset + 3]
      steps.append((_REDUCED_OPS[op], _PROBABILITIES[prob], level * scale))
    expected.append(tuple(steps))
  policy = autoaugment.get_policy(name)
  assert len(policy) == 5
  for got_sub, want_sub in zip(policy, expected):
    for got, want in zip(got_sub, want_sub):
      assert got[:2] == want[:2]
      assert got[2] == pytest.approx(want[2])
  assert autoaugment.OPERATIONS == _REDUCED_OPS


def test_level_to_args():
  args = autoaugment.level_to_args
  assert args('Solarize', 7) == (179,)
  assert args('Solarize', 7 * 0.2) == (35,)
  assert args('Posterize', 10) == (4,)
  assert args('Posterize', 5) == (2,)
  assert args('Sharpness', 10)[0] == pytest.approx(1.9)
  assert args('Brightness', 7)[0] == pytest.approx(1.36)
  assert args('Color', 9 * 0.2)[0] == pytest.approx(0.424)
  assert args('Equalize', 9) == ()


def test_unknown_policy_names_valid_ones():
  with pytest.raises(ValueError, match='simple_classification_policy_magnitude_scale_0.2'):
    autoaugment.distort_image(random_image(0), 'v0', tf.constant([1, 2]))
  with pytest.raises(ValueError, match='uint8'):
    autoaugment.distort_image(random_image(0).astype(np.float32),
                              'simple_classification_policy', tf.constant([1, 2]))
  assert autoaugment.POLICY_NAMES == ('simple_classification_policy',
                                      'simple_classification_policy_magnitude_scale_0.2')


# ---- Random application ----


def _expected(image, policy_name, index, apply):
  out = image
  for step, (op_name, _, level) in enumerate(autoaugment.get_policy(policy_name)[index]):
    if apply[step]:
      out = NP_OPS[op_name](out, *autoaugment.level_to_args(op_name, level))
  return out


@pytest.mark.parametrize('policy_name', autoaugment.POLICY_NAMES)
def test_distort_image_applies_the_drawn_steps(policy_name):
  image = random_image(20)
  changed = 0
  for s in range(40):
    seed = tf.constant([s, 7], tf.int64)
    index, apply = autoaugment.sample_decisions(policy_name, seed)
    out = autoaugment.distort_image(image, policy_name, seed).numpy()
    expected = _expected(image, policy_name, int(index), apply.numpy())
    assert_mostly_equal(out, expected)
    changed += int(not np.array_equal(out, image))
  assert changed > 0


def test_decisions_cover_all_sub_policies_with_policy_probabilities():
  draws = 500
  counts = np.zeros(5)
  applied = np.zeros((5, 2))
  for s in range(draws):
    index, apply = autoaugment.sample_decisions('simple_classification_policy',
                                                tf.constant([s, 3], tf.int32))
    counts[int(index)] += 1
    applied[int(index)] += apply.numpy()
  # Uniform over 5 sub-policies: 100 +- 9 each; 60..140 is > 4 sigma.
  assert counts.min() > 60 and counts.max() < 140, counts
  probabilities = np.array([[step[1] for step in sub] for sub in
                            autoaugment.get_policy('simple_classification_policy')])
  rates = applied / counts[:, None]
  np.testing.assert_allclose(rates, probabilities, atol=0.2)
  assert applied[1, 0] == 0  # Equalize with probability 0 never runs.


def test_same_seed_same_output_different_seeds_differ():
  image = random_image(21)
  name = 'simple_classification_policy'
  seed = tf.constant([5, 9], tf.int32)
  first = autoaugment.distort_image(image, name, seed).numpy()
  np.testing.assert_array_equal(autoaugment.distort_image(image, name, seed).numpy(), first)
  outputs = {autoaugment.distort_image(image, name, tf.constant([s, 9])).numpy().tobytes()
             for s in range(30)}
  assert len(outputs) >= 4


def test_dataset_map_matches_eager():
  images = np.stack([random_image(30 + i) for i in range(12)])
  seeds = np.stack([[i, 11] for i in range(12)]).astype(np.int64)
  name = 'simple_classification_policy'
  dataset = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
      lambda image, seed: autoaugment.distort_image(image, name, seed))
  graph = np.stack([x.numpy() for x in dataset])
  eager = np.stack([autoaugment.distort_image(images[i], name, seeds[i]).numpy()
                    for i in range(12)])
  np.testing.assert_array_equal(graph, eager)
  assert graph.dtype == np.uint8 and graph.shape == images.shape
  assert not np.array_equal(graph, images)


def test_unknown_static_shape_in_graph():
  fn = tf.function(lambda image, seed: autoaugment.distort_image(
      image, 'simple_classification_policy_magnitude_scale_0.2', seed),
                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                    tf.TensorSpec([2], tf.int32)])
  image = random_image(40, (17, 25, 3))
  seed = tf.constant([1, 1])
  np.testing.assert_array_equal(
      fn(image, seed).numpy(),
      autoaugment.distort_image(image, 'simple_classification_policy_magnitude_scale_0.2',
                                seed).numpy())
