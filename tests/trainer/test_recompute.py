"""trainer_options.recompute (model/recompute.py): the step with recomputed activations equals
the plain step, on the tiny synthetic config with drop path and the ASPP dropout off (random
draws differ between two plain steps too), and with drop path on when its draws are made
deterministic (the recomputation reuses the forward pass's masks).

- Per part and all together: the model's gradient of a fixed objective of all its training
  outputs, in graph mode, from the same weights and images (every trainable variable gets a
  gradient, equal to float32 rounding).
- Batch-norm moving statistics after the forward and backward pass equal the plain pass's
  (updated once, not once more by the recomputation).
- The trainer's whole step (loss with Hungarian matching, all parts recomputed): loss terms,
  gradients and moving statistics; then one applied step through the Orbit loop.
- Drop path: the recomputation replays the forward pass's masks.
- Validation refuses an unknown part, naming the field, the value and the valid names.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.config import loader
from deeplab2_kmax.model import builder
from deeplab2_kmax.model import recompute
from deeplab2_kmax.model.layers import drop_path
from deeplab2_kmax.trainer import runner
from tests.conftest import REPO_ROOT
from tests.trainer.conftest import TINY_OVERRIDE
from tests.trainer.conftest import tiny_config

# Drop path is 1.0 in the synthetic config; the ASPP dropout off; two transformer layers at
# two strides, so a recomputed layer's gradient passes through another one; a third of the
# ResNet blocks (1, 1, 2, 1), to keep the traces short.
_DETERMINISTIC = ('model_options { decoder { aspp_use_only_1x1_proj_conv: true } '
                  'backbone { backbone_layer_multiplier: 0.34 } '
                  'kmax { transformer_decoder { num_blocks: [1, 1, 0] } } } '
                  'trainer_options { steps_per_loop: 1 solver_options { warmup_steps: 0 } }')
# Relative global-norm distance allowed (float32 rounding: the recomputation's op order can
# differ from the forward's in fused kernels); measured values are printed.
_TOLERANCE = 1e-5


def _relative_distance(values, reference):
  difference = np.sqrt(sum(np.sum((v - r) ** 2) for v, r in zip(values, reference)))
  return difference / max(np.sqrt(sum(np.sum(r ** 2) for r in reference)), 1e-30)


def _model_gradients(model, images, parts):
  """Loss and gradients of a fixed objective of every training output, in graph mode."""
  model.set_recompute(parts)
  assert model.encoder.recompute_stages == (recompute.ENCODER in parts)
  variables = model.trainable_variables

  @tf.function
  def step(images):
    with tf.GradientTape() as tape:
      outputs = model(images, training=True)
      flat = tf.nest.flatten(outputs)
      # Fixed, output-specific weights so every output and element counts differently.
      objective = tf.add_n([
          tf.reduce_sum(tf.cast(t, tf.float32) * tf.sin(tf.cast(
              tf.reshape(tf.range(tf.size(t)), tf.shape(t)), tf.float32) * 0.37 + i))
          for i, t in enumerate(flat)])
    return objective, tape.gradient(objective, variables)

  objective, gradients = step(images)
  model.set_recompute([])
  return float(objective), gradients


@pytest.fixture(scope='module')
def tiny_model(synthetic_data_dir):
  config = tiny_config(synthetic_data_dir, _DETERMINISTIC)
  model = builder.build_model(config)
  images = tf.constant(np.random.RandomState(0).uniform(0, 255, (2, 33, 33, 3)), tf.float32)
  weights = [v.numpy() for v in model.variables]
  loss, gradients = _model_gradients(model, images, [])
  moving = _moving_statistics(model)
  # Restore the moving statistics the reference step moved.
  for variable, value in zip(model.variables, weights):
    variable.assign(value)
  return {'model': model, 'images': images, 'weights': weights, 'loss': loss, 'moving': moving,
          'gradients': [tf.convert_to_tensor(g).numpy() for g in gradients]}


# Each part alone is `slow` (CI time): all parts together run in CI, and a part that silently
# ran plain fails there too (the recomputed blocks are counted).
@pytest.mark.parametrize('parts', [
    pytest.param([recompute.ENCODER], marks=pytest.mark.slow),
    pytest.param([recompute.PIXEL_DECODER], marks=pytest.mark.slow),
    pytest.param([recompute.TRANSFORMER_DECODER], marks=pytest.mark.slow),
    list(recompute.PARTS)])
def test_model_gradients_equal_plain(tiny_model, parts, monkeypatch):
  model = tiny_model['model']
  for variable, value in zip(model.variables, tiny_model['weights']):
    variable.assign(value)
  # Count the recomputed blocks (a built part is recomputed, else silently run plain).
  blocks = []
  original = recompute.call
  monkeypatch.setattr(recompute, 'call',
                      lambda fn, inputs: blocks.append(None) or original(fn, inputs))
  loss, gradients = _model_gradients(model, tiny_model['images'], parts)
  # ResNet stages 2..5, the pixel decoder, two transformer layers.
  expected = {recompute.ENCODER: 4, recompute.PIXEL_DECODER: 1, recompute.TRANSFORMER_DECODER: 2}
  assert len(blocks) == sum(expected[part] for part in parts)
  reference = tiny_model['gradients']
  assert all(g is not None for g in gradients)
  gradients = [tf.convert_to_tensor(g).numpy() for g in gradients]
  # Every variable the plain step gives a gradient gets one (none is silently zero).
  for variable, g, r in zip(model.trainable_variables, gradients, reference):
    assert np.any(g != 0) == np.any(r != 0), variable.path
  distance = _relative_distance(gradients, reference)
  print(parts, 'loss', loss, tiny_model['loss'], 'gradient distance', distance)
  assert loss == pytest.approx(tiny_model['loss'], rel=1e-6)
  assert distance < _TOLERANCE, distance
  # The recomputed parts' own variables, each part separately.
  for name, part in (('encoder', model.encoder), ('pixel_decoder', model.pixel_decoder),
                     ('transformer_decoder', model.transformer_decoder)):
    ids = {id(v) for v in part.trainable_variables}
    pairs = [(g, r) for v, g, r in zip(model.trainable_variables, gradients, reference)
             if id(v) in ids]
    assert pairs
    part_distance = _relative_distance([g for g, _ in pairs], [r for _, r in pairs])
    assert part_distance < _TOLERANCE, (name, part_distance)
  # Batch-norm moving statistics: updated once by the forward pass, not again by the
  # recomputation in the backward pass.
  moving = _moving_statistics(model)
  assert len(moving) > 50
  for path, value in tiny_model['moving'].items():
    np.testing.assert_allclose(moving[path], value, rtol=1e-6, atol=1e-9, err_msg=path)


_DROP_PATH = ('model_options { backbone { drop_path_keep_prob: 0.5 } '
              'kmax { pixel_decoder { drop_path_keep_prob: 0.5 } '
              'transformer_decoder_drop_path_keep_prob: 0.5 } }')
_CMT_CONFIG = str(REPO_ROOT / 'configs' / 'synthetic' / 'cmt_r50_os32_synthetic_demo.textproto')


def _variant_config(data_dir, variant):
  """The tiny config with drop path 0.5 in every part: kMaX (ResNet), kMaX with a ConvNeXt
  encoder, or CMT (two layers at two strides: the pixel update is carried between them)."""
  if variant == 'cmt':
    os.environ[common.ENV_SYNTHETIC_DATA_DIR] = str(data_dir)
    to_cmt = lambda text: text.replace('kmax {', 'cmt {')
    config = loader.load_config(_CMT_CONFIG, [to_cmt(TINY_OVERRIDE), to_cmt(_DETERMINISTIC),
                                              to_cmt(_DROP_PATH)])
    assert config.model_options.WhichOneof('meta_architecture') == common.META_CMT
    return config
  overrides = [_DETERMINISTIC, _DROP_PATH]
  if variant == 'convnext':
    overrides.append('model_options { backbone { name: "convnext_tiny" } }')
  return tiny_config(data_dir, *overrides)


# kMaX-ResNet in CI; the ConvNeXt and CMT variants (about 20 s each) are `slow`.
@pytest.mark.parametrize('variant', ['kmax', pytest.param('convnext', marks=pytest.mark.slow),
                                     pytest.param('cmt', marks=pytest.mark.slow)])
def test_drop_path_masks_of_the_forward_pass_are_reused(synthetic_data_dir, monkeypatch,
                                                        variant):
  """Drop path on in all three parts (keep 0.5), with draws made deterministic per trace (a
  Python counter, so the plain and the recomputed traces draw the same masks in the same
  order): the recomputed step's gradient and moving statistics equal the plain one's; the
  gradient does only because the recomputation replays the forward pass's masks (kMaX:
  drawing again, as tf.recompute_grad alone does, gives another gradient)."""
  model = builder.build_model(_variant_config(synthetic_data_dir, variant))
  images = tf.constant(np.random.RandomState(1).uniform(0, 255, (2, 33, 33, 3)), tf.float32)
  weights = [v.numpy() for v in model.variables]
  draws = []

  def uniform(shape):
    draws.append(None)
    # Samples 0 and 1 get (0.1 + 0.37 k) mod 1 and that + 0.5: one of them dropped at keep 0.5.
    values = tf.math.floormod(0.1 + 0.37 * len(draws) + 0.5 * tf.range(2, dtype=tf.float32),
                              1.0)
    return tf.reshape(values[:shape[0]], shape)

  monkeypatch.setattr(drop_path, '_uniform', uniform)

  def gradients(parts):
    for variable, value in zip(model.variables, weights):
      variable.assign(value)
    draws.clear()
    _, result = _model_gradients(model, images, parts)
    return ([tf.convert_to_tensor(g).numpy() for g in result], len(draws),
            _moving_statistics(model))

  reference, plain_draws, plain_moving = gradients([])
  # Every part draws masks (encoder stages 4 and 5 or ConvNeXt blocks, the pixel-decoder
  # stages, 3 (CMT: 4) per transformer layer).
  assert plain_draws >= 10
  recomputed, recomputed_draws, moving = gradients(list(recompute.PARTS))
  assert recomputed_draws == plain_draws
  distance = _relative_distance(recomputed, reference)
  print(variant, 'drop path 0.5, masks replayed: gradient distance', distance)
  assert distance < _TOLERANCE, distance
  for path, value in plain_moving.items():
    np.testing.assert_allclose(moving[path], value, rtol=1e-6, atol=1e-9, err_msg=path)
  if variant != 'kmax':
    return
  # Without the replay the recomputation draws other masks: another gradient.
  monkeypatch.setattr(drop_path, 'replayed_masks', lambda masks: drop_path.recorded_masks([]))
  redrawn, redrawn_draws, _ = gradients(list(recompute.PARTS))
  assert redrawn_draws > plain_draws
  distance = _relative_distance(redrawn, reference)
  print('drop path 0.5, masks drawn again: gradient distance', distance)
  # Measured 0.008 and 0.049 (the initial weights are random); recomputed with the same
  # masks it is 1e-7.
  assert distance > 1e-4, distance


def _moving_statistics(model):
  return {v.path: v.numpy() for v in model.variables
          if 'moving_mean' in v.path or 'moving_variance' in v.path}


@pytest.fixture(scope='module')
def tiny_experiment(synthetic_data_dir, tmp_path_factory):
  """An Experiment with every part recomputed, its initial weights, its first batch (which its
  trainer's dataset now repeats), and the plain step's (recompute off) losses, gradients and
  moving statistics from those weights."""
  config = tiny_config(synthetic_data_dir, _DETERMINISTIC,
                       'trainer_options { recompute: "encoder" recompute: "pixel_decoder" '
                       'recompute: "transformer_decoder" }')
  experiment = runner.Experiment(config, 'train', str(tmp_path_factory.mktemp('recompute')),
                                 log_fn=lambda _: None)
  model, trainer = experiment.model, experiment.trainer
  assert model.encoder.recompute_stages and model.recompute_pixel_decoder
  assert model.transformer_decoder.recompute_layers
  weights = model.get_weights()
  batch = next(iter(trainer.train_dataset))
  batch = {key: value for key, value in batch.items() if value.dtype != tf.string}
  # The applied step reads this batch, with the seed the trainer gives step 0.
  trainer.train_dataset = experiment.strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch).repeat())
  seed = tf.constant([trainer.seed * 1009, 0], tf.int32)
  reference = _trainer_gradients(experiment, weights, batch, seed, [])
  return {'experiment': experiment, 'weights': weights, 'batch': batch, 'seed': seed,
          'reference': reference}


def _trainer_gradients(experiment, weights, batch, seed, parts):
  """The trainer's per-replica gradient function (forward, loss with matching, backward) from
  `weights` with `parts` recomputed: (losses, gradients, moving statistics after it)."""
  model = experiment.model
  model.set_weights(weights)
  model.set_recompute(parts)
  try:
    losses, gradients, bad = tf.function(experiment.trainer._gradients)(batch, seed)  # pylint: disable=protected-access
  finally:
    model.set_recompute(recompute.PARTS)
  assert float(bad) == 0.0
  return ({k: float(v) for k, v in losses.items()},
          [None if g is None else tf.convert_to_tensor(g).numpy() for g in gradients],
          _moving_statistics(model))


def test_train_step_gradients_equal_plain(tiny_experiment):
  plain_losses, plain_gradients, plain_moving = tiny_experiment['reference']
  losses, gradients, moving = _trainer_gradients(
      tiny_experiment['experiment'], tiny_experiment['weights'], tiny_experiment['batch'],
      tiny_experiment['seed'], list(recompute.PARTS))
  for name, value in plain_losses.items():
    assert losses[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
  assert [g is None for g in gradients] == [g is None for g in plain_gradients]
  pairs = [(g, r) for g, r in zip(gradients, plain_gradients) if r is not None]
  distance = _relative_distance([g for g, _ in pairs], [r for _, r in pairs])
  print('train step: loss', losses[common.TOTAL_LOSS], 'gradient distance', distance)
  assert distance < _TOLERANCE, distance
  for path, value in plain_moving.items():
    np.testing.assert_allclose(moving[path], value, rtol=1e-6, atol=1e-9, err_msg=path)


def test_applied_step_updates_moving_statistics_once(tiny_experiment):
  """One step through the Orbit loop and the runner's strategy with every part recomputed:
  the plain step's loss, every variable with a gradient moved, and the moving statistics are
  the plain forward pass's (one update; a second one by the recomputation would show)."""
  experiment = tiny_experiment['experiment']
  model, trainer = experiment.model, experiment.trainer
  plain_losses, plain_gradients, plain_moving = tiny_experiment['reference']
  model.set_weights(tiny_experiment['weights'])
  before = [v.numpy() for v in trainer.train_variables]
  trainer.train(tf.constant(1, tf.int32))
  after = [v.numpy() for v in trainer.train_variables]
  assert trainer.last_logs['losses/total_loss'] == pytest.approx(
      plain_losses[common.TOTAL_LOSS], rel=1e-5)
  moved = [not np.array_equal(b, a) for b, a in zip(before, after)]
  with_gradient = [g is not None and np.any(g != 0) for g in plain_gradients]
  # Every variable with a gradient moved (kernels without one move too: AdamW's decay).
  assert sum(with_gradient) > len(with_gradient) // 3
  assert all(m for m, w in zip(moved, with_gradient) if w)
  stepped = _moving_statistics(model)
  initial = dict(zip([v.path for v in model.variables], tiny_experiment['weights']))
  changed = 0
  for path, value in plain_moving.items():
    np.testing.assert_allclose(stepped[path], value, rtol=1e-6, atol=1e-9, err_msg=path)
    changed += not np.allclose(value, initial[path])
  assert changed > len(plain_moving) // 2


def test_validation_refuses_unknown_part(tiny):
  with pytest.raises(Exception) as error:
    tiny('trainer_options { recompute: "encoder" recompute: "decoder" }')
  message = str(error.value)
  assert 'trainer_options.recompute' in message
  assert '"decoder"' in message
  for name in recompute.PARTS:
    assert name in message
  # The valid names pass.
  config = tiny(f'trainer_options {{ {" ".join(f"recompute: {chr(34)}{p}{chr(34)}" for p in recompute.PARTS)} }}')
  assert list(config.trainer_options.recompute) == list(recompute.PARTS)


def test_validation_refuses_recompute_for_max_deeplab(synthetic_data_dir):
  os.environ[common.ENV_SYNTHETIC_DATA_DIR] = str(synthetic_data_dir)
  path = REPO_ROOT / 'configs' / 'synthetic' / 'max_deeplab_s_os16_synthetic_demo.textproto'
  with pytest.raises(Exception) as error:
    loader.load_config(str(path), ['trainer_options { recompute: "encoder" }'])
  message = str(error.value)
  assert 'trainer_options.recompute' in message and 'max_deeplab' in message
