"""AutoAugment with DeepLab2's reduced policy, as stateless TensorFlow ops.

`distort_image` picks one sub-policy uniformly at random and applies each of its operations
with that operation's probability, as DeepLab2's `autoaugment_utils` does. All randomness comes
from stateless ops driven by a `seed` tensor of shape [2], so the same seed gives the same
image bit for bit, eagerly and inside `tf.data.Dataset.map`.

The policy (Cubuk et al., "AutoAugment", CVPR 2019; "RandAugment", CVPR 2020) draws from the
reduced operation space AutoContrast, Equalize, Invert, Posterize, Solarize, Color, Contrast,
Brightness and Sharpness. A magnitude level in [0, 10] maps to an operation argument:

| operation                                | argument for level L        |
|------------------------------------------|-----------------------------|
| Posterize                                | bits = int(L / 10 * 4)      |
| Solarize                                 | threshold = int(L / 10 * 256) |
| Color, Contrast, Brightness, Sharpness   | factor = L / 10 * 1.8 + 0.1 |
| AutoContrast, Equalize, Invert           | (none)                      |

The "_magnitude_scale_0.2" policy multiplies every level by 0.2 before that mapping.

Numerics follow DeepLab2 (float32 blends truncated to uint8), with two notes:
- Contrast blends towards a grey level of `height * width / 256` (clipped to 255), not the
  mean grey value: DeepLab2's Contrast sums the histogram's counts instead of weighting them by
  intensity (the known AutoAugment Contrast bug, tensorflow/models#8328). We keep it, since
  the published kMaX-DeepLab results were trained with it.
- Sharpness smooths with the integer kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in exact
  integer arithmetic (floor of the weighted sum / 13). DeepLab2 convolves with a float32 kernel,
  whose rounding can land one grey level lower where the sum is an exact multiple of 13
  (about 0.1-0.4% of pixels of a random image end up one level apart after the blend).
- Solarize compares in int32, so threshold 256 (level 10) leaves the image unchanged as in PIL;
  DeepLab2 casts 256 to uint8 (0) and inverts every pixel. No shipped policy reaches level 10.
"""

import tensorflow as tf

# Policy names accepted by distort_image (also AugmentationOptions.autoaugment_policy_name).
SIMPLE_CLASSIFICATION_POLICY = 'simple_classification_policy'
SIMPLE_CLASSIFICATION_POLICY_MAGNITUDE_SCALE_0_2 = (
    'simple_classification_policy_magnitude_scale_0.2')
POLICY_NAMES = (SIMPLE_CLASSIFICATION_POLICY, SIMPLE_CLASSIFICATION_POLICY_MAGNITUDE_SCALE_0_2)

# The largest magnitude level an AutoAugment controller predicts.
MAX_LEVEL = 10.0

# DeepLab2's "simple_classification_policy": five sub-policies of two
# (operation, probability, magnitude level) steps each.
_SIMPLE_CLASSIFICATION_SUB_POLICIES = (
    (('Sharpness', 0.4, 7), ('Brightness', 0.2, 10)),
    (('Equalize', 0.0, 9), ('Contrast', 0.2, 10)),
    (('Sharpness', 0.2, 9), ('Color', 0.2, 9)),
    (('Solarize', 0.2, 7), ('Equalize', 0.6, 9)),
    (('Sharpness', 0.2, 1), ('Equalize', 0.2, 7)),
)

_MAGNITUDE_SCALES = {
    SIMPLE_CLASSIFICATION_POLICY: 1.0,
    SIMPLE_CLASSIFICATION_POLICY_MAGNITUDE_SCALE_0_2: 0.2,
}


def _check_policy_name(policy_name):
  if policy_name not in _MAGNITUDE_SCALES:
    raise ValueError(f'unknown AutoAugment policy "{policy_name}"; valid policies are '
                     f'{", ".join(POLICY_NAMES)}')


def get_policy(policy_name: str):
  """The sub-policies of a named policy.

  Returns:
    A tuple of sub-policies; each is a tuple of (operation name, probability, level) with the
    level already multiplied by the policy's magnitude scale.

  Raises:
    ValueError: if `policy_name` is not one of POLICY_NAMES.
  """
  _check_policy_name(policy_name)
  scale = _MAGNITUDE_SCALES[policy_name]
  # Scale as a Python float product, like DeepLab2, so the derived arguments are identical
  # (e.g. 7 * 0.2 = 1.4000000000000001, whose Solarize threshold is int(35.84...) = 35).
  return tuple(
      tuple((name, probability, level * scale) if scale != 1.0 else (name, probability, level)
            for name, probability, level in sub_policy)
      for sub_policy in _SIMPLE_CLASSIFICATION_SUB_POLICIES)


def _enhance_factor(level):
  return (level / MAX_LEVEL) * 1.8 + 0.1


def level_to_args(op_name: str, level) -> tuple:
  """The extra arguments of operation `op_name` for magnitude `level` (see module table)."""
  if op_name in ('AutoContrast', 'Equalize', 'Invert'):
    return ()
  if op_name == 'Posterize':
    return (int((level / MAX_LEVEL) * 4),)
  if op_name == 'Solarize':
    return (int((level / MAX_LEVEL) * 256),)
  if op_name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (_enhance_factor(level),)
  raise ValueError(f'unknown AutoAugment operation "{op_name}"; valid operations are '
                   f'{", ".join(OPERATIONS)}')


# ---- Operations: uint8 [height, width, 3] in, uint8 [height, width, 3] out ----


def blend(image1, image2, factor: float):
  """Linear blend `image1 + factor * (image2 - image1)` in float32, clipped, cast to uint8.

  factor 0 gives image1 and 1 gives image2; factors above 1 extrapolate away from image1. The
  float-to-uint8 cast truncates, as in DeepLab2.
  """
  if factor == 0.0:
    return tf.convert_to_tensor(image1)
  if factor == 1.0:
    return tf.convert_to_tensor(image2)
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  # Interpolation (0 < factor < 1) stays inside [0, 255]; clipping only matters when
  # extrapolating, and is a no-op otherwise.
  blended = image1 + factor * (image2 - image1)
  return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def invert(image):
  """255 - pixel."""
  return 255 - tf.convert_to_tensor(image)


def posterize(image, bits: int):
  """Keeps the `bits` most significant bits of every pixel (0 <= bits <= 8)."""
  if not 0 <= bits <= 8:
    raise ValueError(f'Posterize bits must be in [0, 8], got {bits}')
  # A mask rather than a shift right then left: a shift by 8 is undefined for uint8, and
  # bits = 0 must give black.
  mask = (0xFF << (8 - bits)) & 0xFF
  return tf.bitwise.bitwise_and(tf.convert_to_tensor(image), tf.constant(mask, tf.uint8))


def solarize(image, threshold: int = 128):
  """Inverts the pixels at or above `threshold` (threshold 256 leaves the image unchanged)."""
  image = tf.convert_to_tensor(image)
  # Compare in int32: a threshold of 256 does not fit in uint8.
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def color(image, factor: float):
  """PIL ImageEnhance.Color: blends from the grey version of the image."""
  degenerate = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return blend(degenerate, image, factor)


def contrast(image, factor: float):
  """DeepLab2's Contrast: blends from a constant grey of min(height * width / 256, 255).

  PIL's Contrast blends from the mean grey value; DeepLab2 (and the TF AutoAugment code it
  derives from) uses the histogram's total count / 256 instead. Kept for fidelity, see the
  module docstring.
  """
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  num_pixels = tf.cast(shape[0] * shape[1], tf.float32)
  grey = tf.cast(tf.clip_by_value(num_pixels / 256.0, 0.0, 255.0), tf.uint8)
  degenerate = tf.fill(shape, grey)
  return blend(degenerate, image, factor)


def brightness(image, factor: float):
  """PIL ImageEnhance.Brightness: blends from black."""
  return blend(tf.zeros_like(image), image, factor)


def autocontrast(image):
  """Per channel, stretches [min, max] linearly to [0, 255]; constant channels are unchanged."""
  image = tf.convert_to_tensor(image)
  low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)
  high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)
  stretchable = high > low
  # A dummy range of 1 for constant channels avoids inf / nan in the branch tf.where drops.
  scale = 255.0 / tf.where(stretchable, high - low, 1.0)
  offset = -low * scale
  stretched = tf.cast(image, tf.float32) * scale + offset
  stretched = tf.cast(tf.clip_by_value(stretched, 0.0, 255.0), tf.uint8)
  return tf.where(stretchable, stretched, image)


def _equalize_channel(channel):
  """PIL ImageOps.equalize on one uint8 [height, width] channel."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(values, minlength=256, maxlength=256, dtype=tf.int32)
  # The step leaves out the pixels of the brightest present value, so the values below it
  # spread over [0, 255].
  brightest_count = histogram[tf.reduce_max(values)]
  step = (tf.reduce_sum(histogram) - brightest_count) // 255
  safe_step = tf.maximum(step, 1)
  lut = (tf.cumsum(histogram) + safe_step // 2) // safe_step
  # Each value maps to the cumulative count of the values strictly below it.
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], axis=0), 0, 255)
  # step 0 (fewer than 255 pixels below the brightest value) leaves the channel unchanged;
  # safe_step only keeps the unused branch free of a division by zero.
  equalized = tf.where(step > 0, tf.gather(lut, values), values)
  return tf.cast(equalized, tf.uint8)


def equalize(image):
  """PIL ImageOps.equalize, per channel."""
  image = tf.convert_to_tensor(image)
  return tf.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=2)


def _smooth(image):
  """PIL's SMOOTH filter, kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, floor-rounded.

  Border pixels (where the 3x3 window leaves the image) keep their value.
  """
  image = tf.convert_to_tensor(image)
  values = tf.cast(image, tf.int32)
  shape = tf.shape(values)
  height, width = shape[0], shape[1]
  padded = tf.pad(values, [[1, 1], [1, 1], [0, 0]])
  # Window sum (weight 1 each) plus 4 more times the centre gives the weight 5 in the middle.
  total = 4 * values
  for dy in range(3):
    for dx in range(3):
      total += padded[dy:dy + height, dx:dx + width, :]
  smoothed = tf.cast(total // 13, tf.uint8)
  rows = tf.range(height)[:, tf.newaxis, tf.newaxis]
  cols = tf.range(width)[tf.newaxis, :, tf.newaxis]
  interior = ((rows > 0) & (rows < height - 1)) & ((cols > 0) & (cols < width - 1))
  return tf.where(interior, smoothed, image)


def sharpness(image, factor: float):
  """PIL ImageEnhance.Sharpness: blends from the smoothed image."""
  image = tf.convert_to_tensor(image)
  return blend(_smooth(image), image, factor)


_OPERATIONS = {
    'AutoContrast': autocontrast,
    'Equalize': equalize,
    'Invert': invert,
    'Posterize': posterize,
    'Solarize': solarize,
    'Color': color,
    'Contrast': contrast,
    'Brightness': brightness,
    'Sharpness': sharpness,
}
# DeepLab2's reduced operation space, in its order (indices of its numeric policy encoding).
OPERATIONS = ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize', 'Color',
              'Contrast', 'Brightness', 'Sharpness')


def apply_operation(image, op_name: str, level):
  """Applies operation `op_name` at magnitude `level` (no randomness)."""
  if op_name not in _OPERATIONS:
    raise ValueError(f'unknown AutoAugment operation "{op_name}"; valid operations are '
                     f'{", ".join(OPERATIONS)}')
  return _OPERATIONS[op_name](image, *level_to_args(op_name, level))


# ---- Random policy application ----


def sample_decisions(policy_name: str, seed):
  """The random choices distort_image makes for `seed`.

  Returns:
    (sub_policy_index, apply): an int32 scalar in [0, number of sub-policies) and a bool
    [steps per sub-policy] tensor, True where that step of the chosen sub-policy is applied.
  """
  policy = get_policy(policy_name)
  num_steps = max(len(sub_policy) for sub_policy in policy)
  index_seed, apply_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  index = tf.random.stateless_uniform([], index_seed, minval=0, maxval=len(policy),
                                      dtype=tf.int32)
  uniforms = tf.random.stateless_uniform([num_steps], apply_seed, dtype=tf.float32)
  # The chosen sub-policy's step probabilities, gathered so one tensor serves every branch.
  probabilities = tf.constant(
      [[step[1] for step in sub_policy] + [0.0] * (num_steps - len(sub_policy))
       for sub_policy in policy], tf.float32)
  # u < p holds with probability p (never for p = 0, always for p = 1).
  apply = uniforms < tf.gather(probabilities, index)
  return index, apply


def distort_image(image, policy_name: str, seed):
  """Applies a randomly chosen sub-policy of `policy_name` to `image`.

  Args:
    image: uint8 [height, width, 3].
    policy_name: one of POLICY_NAMES.
    seed: int32 or int64 [2], the stateless seed; the same seed gives the same output.

  Returns:
    uint8 [height, width, 3].

  Raises:
    ValueError: for an unknown policy name or an image that is not uint8 with 3 channels.
  """
  _check_policy_name(policy_name)
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f'AutoAugment needs a uint8 image, got {image.dtype.name}')
  if image.shape.rank is not None and (image.shape.rank != 3 or image.shape[-1] not in
                                       (None, 3)):
    raise ValueError(f'AutoAugment needs an image of shape [height, width, 3], got '
                     f'{image.shape}')
  policy = get_policy(policy_name)
  index, apply = sample_decisions(policy_name, seed)

  def make_branch(sub_policy):
    def branch():
      result = image
      for step, (op_name, probability, level) in enumerate(sub_policy):
        if probability <= 0.0:
          continue  # Never applied; skip building it.
        op = lambda x, op_name=op_name, level=level: apply_operation(x, op_name, level)
        result = tf.cond(apply[step], lambda x=result, op=op: op(x), lambda x=result: x)
      return result
    return branch

  distorted = tf.switch_case(index, [make_branch(sub_policy) for sub_policy in policy])
  return tf.ensure_shape(distorted, image.shape)
