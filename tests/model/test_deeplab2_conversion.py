"""DeepLab2 <-> our checkpoint conversion (checkpoint/deeplab2_conversion.py) and transparent restore.

The full-size test synthesises a DeepLab2-layout checkpoint with every key and shape of
../shared/reference/upstream-kmax-r50/checkpoint_variables.txt (random values); the shared
COCO kMaX-R50 fixture is used and its weights are put back afterwards. Axial-ResNet and ConvNeXt
(and class-count changes) are covered on tiny models.
"""


import re

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax.model import builder
from deeplab2_kmax.checkpoint import deeplab2_key_map
from deeplab2_kmax.checkpoint import deeplab2_conversion
from deeplab2_kmax.checkpoint import initial_checkpoint
from tests.model.conftest import TINY_TEXTPROTO
from tests.model.conftest import parse
from tests.model.test_kmax_r50_parity import upstream_variable_shapes

IMAGES = np.random.RandomState(0).uniform(0, 255, (1, 65, 65, 3)).astype(np.float32)


def _random_value(key, shape, rng):
  if 'moving_variance' in key:
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  return rng.normal(0.0, 0.1, shape).astype(np.float32)


@pytest.fixture(scope='module')
def upstream_r50():
  """{DeepLab2 key: random value of the listed shape} for every variable of the listing."""
  rng = np.random.RandomState(1)
  return {key: _random_value(key, shape, rng)
          for key, shape in upstream_variable_shapes().items()}


@pytest.fixture
def r50_model(coco_r50_model):
  """The shared COCO kMaX-R50, restored to its weights after the test."""
  saved = [variable.numpy() for variable in coco_r50_model.weights]
  yield coco_r50_model
  for variable, value in zip(coco_r50_model.weights, saved):
    variable.assign(value)


def test_synthesised_deeplab2_checkpoint_converts_runs_and_round_trips(
    upstream_r50, r50_model, tmp_path):
  path = deeplab2_conversion.write_deeplab2_checkpoint(upstream_r50,
                                                   str(tmp_path / 'deeplab2' / 'ckpt'))
  written = dict(tf.train.list_variables(path))
  assert set(written) - {'_CHECKPOINTABLE_OBJECT_GRAPH'} == set(upstream_r50)
  assert deeplab2_conversion.is_deeplab2_layout(written)

  report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(path), r50_model, source=path)
  assert (report.unmapped, report.unused, report.mismatched) == ([], [], [])
  assert len(report.values) == len(upstream_r50) == 1184
  report.check()
  # Spot checks of the mapping against the listing's own keys.
  np.testing.assert_array_equal(
      report.values['encoder/stem.conv.kernel'],
      upstream_r50['encoder/_stem/_conv/kernel' + deeplab2_key_map.CHECKPOINT_SUFFIX])
  np.testing.assert_array_equal(
      report.values['predictor/transformer_class_head.conv.bias'],
      upstream_r50['transformer_class_head/_conv/bias' + deeplab2_key_map.CHECKPOINT_SUFFIX])

  # Our checkpoint, restored by the runner's initial-checkpoint path: every variable.
  ours = deeplab2_conversion.write_our_checkpoint(report.values, str(tmp_path / 'ours' / 'ckpt'))
  assert not deeplab2_conversion.is_deeplab2_layout(dict(tf.train.list_variables(ours)))
  table = initial_checkpoint.restore_initial_checkpoint(r50_model, ours, log_fn=None)
  assert len(table['restored']) == 1184 and table['missing'] == []
  outputs = r50_model(IMAGES, training=False)
  for key in (common.PRED_PIXEL_SPACE_MASK_LOGITS, common.PRED_TRANSFORMER_CLASS_LOGITS,
              common.PRED_SEMANTIC_LOGITS):
    assert np.all(np.isfinite(outputs[key])), key
  assert outputs[common.PRED_TRANSFORMER_CLASS_LOGITS].shape == (1, 128, 134)

  # ours -> DeepLab2 layout -> ours is exact, key for key.
  exported = deeplab2_conversion.to_deeplab2(r50_model)
  assert set(exported) == set(upstream_r50)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, upstream_r50[key], err_msg=key)
  again = deeplab2_conversion.from_deeplab2(_ValuesReader(exported), r50_model)
  assert set(again.values) == set(report.values)
  for key, value in again.values.items():
    np.testing.assert_array_equal(value, report.values[key], err_msg=key)


class _ValuesReader:
  """{key: value} with the two methods of a checkpoint reader that the converter uses."""

  def __init__(self, values):
    self.values = values

  def get_variable_to_shape_map(self):
    return {key: list(value.shape) for key, value in self.values.items()}

  def get_tensor(self, key):
    return self.values[key]


def _tiny(backbone='resnet50', num_classes=7):
  text = TINY_TEXTPROTO.replace('name: "resnet50"', f'name: "{backbone}"').replace(
      'output_channels: 7', f'output_channels: {num_classes}')
  return builder.build_model(parse(text), crop_size=(65, 65))


@pytest.fixture(scope='module')
def tiny_models():
  """Tiny kMaX models by backbone, built on first use, once per module."""
  models = {}

  def get(backbone):
    if backbone not in models:
      models[backbone] = _tiny(backbone)
    return models[backbone]
  return get


def _zero(model):
  for variable in model.weights:
    variable.assign(tf.zeros_like(variable))


def _randomise(model, seed=0):
  rng = np.random.RandomState(seed)
  for variable in model.weights:
    variable.assign(_random_value(variable.path, variable.shape, rng))


@pytest.mark.parametrize('backbone', ['axial_resnet50', 'convnext_tiny'])
def test_round_trip_through_deeplab2_layout(backbone, tiny_models, tmp_path):
  model = tiny_models(backbone)
  _randomise(model)
  exported = deeplab2_conversion.to_deeplab2(model)
  if backbone == 'convnext_tiny':
    # DeepLab2's ConvNeXt keeps Keras-2 Sequential keys and grouped-conv depthwise kernels.
    key = ('encoder/stages/0/layer_with_weights-0/depthwise_conv/kernel'
           + deeplab2_key_map.CHECKPOINT_SUFFIX)
    ours = deeplab2_key_map.model_variable_paths(model)[
        'encoder/convnext_block_0_0/depthwise_conv/kernel'].numpy()
    assert exported[key].shape == (7, 7, 1, ours.shape[2])
    np.testing.assert_array_equal(exported[key][:, :, 0, :], ours[:, :, :, 0])
  else:
    assert any('/_attention/_height_axis/qkv_kernel' in key for key in exported)
  path = deeplab2_conversion.write_deeplab2_checkpoint(exported, str(tmp_path / 'ckpt'))
  # Equal variables give equal outputs: comparing them spares two forward passes.
  expected = [variable.numpy() for variable in model.weights]
  _zero(model)
  report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(path), model)
  assert (report.unmapped, report.unused, report.mismatched) == ([], [], [])
  assert deeplab2_conversion.assign(model, report.values) == len(model.weights)
  for variable, want in zip(model.weights, expected):
    np.testing.assert_array_equal(variable.numpy(), want, err_msg=variable.path)


def test_imagenet_encoder_checkpoint_maps_into_the_encoder(tiny_models, tmp_path):
  model = tiny_models('convnext_tiny')
  _randomise(model, seed=3)
  expected = deeplab2_key_map.model_variable_paths(model)
  expected = {path: variable.numpy() for path, variable in expected.items()}
  # An encoder's own save_weights file: keys start below the encoder, plus a classifier.
  encoder_only = {key[len('encoder/'):]: value
                  for key, value in deeplab2_conversion.to_deeplab2(model).items()
                  if key.startswith('encoder/')}
  classifier = 'head/kernel' + deeplab2_key_map.CHECKPOINT_SUFFIX
  encoder_only[classifier] = np.zeros((4, 10), np.float32)
  path = deeplab2_conversion.write_deeplab2_checkpoint(encoder_only, str(tmp_path / 'ckpt'))
  fresh = model
  _zero(fresh)
  report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(path), fresh,
                                             encoder_only=True)
  report.check()
  assert report.unused == [classifier]
  # Optimizer slots of a training checkpoint are neither assigned nor reported.
  slot = ('stages/0/layer_with_weights-0/layer_scale/.OPTIMIZER_SLOT/optimizer/m'
          + deeplab2_key_map.CHECKPOINT_SUFFIX)
  with_slot = deeplab2_conversion.from_deeplab2(
      _ValuesReader({**encoder_only, slot: np.zeros(4)}), fresh, encoder_only=True)
  assert with_slot.unused == [classifier] and len(with_slot.values) == len(report.values)
  assert report.problems == [] and all(not k.startswith('encoder/') for k in report.unmapped)
  assert {k for k in report.values} == {
      k for k in deeplab2_conversion.our_variable_keys(fresh).values() if k.startswith('encoder/')}
  # As backbone.pretrained_weights of a fresh training run (the runner's restore step).
  from deeplab2_kmax.protos import model_pb2  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  options = model_pb2.ModelOptions()
  options.backbone.pretrained_weights = path
  lines = []
  runner._restore_pretrained(fresh, options, lines.append)  # pylint: disable=protected-access
  assert 'DeepLab2 layout, converted' in lines[-1] and '0 model variables not restored' in (
      lines[-1])
  for path_, variable in deeplab2_key_map.model_variable_paths(fresh).items():
    want = expected[path_] if path_.startswith('encoder/') else np.zeros(variable.shape)
    np.testing.assert_array_equal(variable.numpy(), want, err_msg=path_)


def test_fine_tuning_to_another_class_count(tiny_models, tmp_path):
  source = tiny_models('resnet50')
  _randomise(source, seed=5)
  path = deeplab2_conversion.write_deeplab2_checkpoint(deeplab2_conversion.to_deeplab2(source),
                                                   str(tmp_path / 'ckpt'))
  target = _tiny(num_classes=5)
  reader = tf.train.load_checkpoint(path)
  strict = deeplab2_conversion.from_deeplab2(reader, target, source=path)
  with pytest.raises(deeplab2_conversion.ConversionError, match='allow the class-dependent'):
    strict.check()
  report = deeplab2_conversion.from_deeplab2(reader, target, allow_class_mismatch=True)
  report.check()
  # Exactly the class-dependent layers: the two main heads and one auxiliary class head per
  # transformer-decoder layer (3 here), kernel and bias each.
  assert len(report.allowed) == len(report.unmapped) == len(report.mismatched) == 2 * (2 + 3)
  assert all(deeplab2_conversion.is_class_dependent(key) for key in report.allowed)
  # The transparent path: initial_checkpoint names the DeepLab2 checkpoint itself.
  table = initial_checkpoint.restore_initial_checkpoint(
      target, path, restore_semantic_last_layer=False, restore_instance_last_layer=False,
      log_fn=None)
  assert sorted(table['missing']) == sorted(report.allowed)
  assert len(table['restored']) == len(target.weights) - len(report.allowed)


def test_convert_command_line(tiny_models, tmp_path, capsys):
  from deeplab2_kmax.model_zoo import __main__ as cli  # pylint: disable=g-import-not-at-top
  from tests.model.conftest import TINY_TEXTPROTO as text  # pylint: disable=g-import-not-at-top
  model = tiny_models('resnet50')
  _randomise(model, seed=7)
  source = deeplab2_conversion.write_deeplab2_checkpoint(deeplab2_conversion.to_deeplab2(model),
                                                     str(tmp_path / 'dl2'))
  config = tmp_path / 'tiny.textproto'
  config.write_text(text)
  output = str(tmp_path / 'ours' / 'ckpt')
  assert cli.main(['convert', f'--from={source}', f'--config_file={config}',
                   f'--output={output}']) == 0
  assert f'assigned {len(model.weights)} variables, 0 unassigned' in capsys.readouterr().out
  values = deeplab2_conversion.read_our_checkpoint(output)
  expected = deeplab2_conversion.our_variable_keys(model)
  variables = deeplab2_key_map.model_variable_paths(model)
  assert set(values) == set(expected.values())
  for path, key in expected.items():
    np.testing.assert_array_equal(values[key], variables[path].numpy(), err_msg=key)
  # The reverse gives DeepLab2's keys and values back.
  back = str(tmp_path / 'back' / 'ckpt')
  assert cli.main(['convert', '--to_deeplab2', f'--from={output}', f'--config_file={config}',
                   f'--output={back}']) == 0
  reader = tf.train.load_checkpoint(back)
  for key, value in deeplab2_conversion.to_deeplab2(model).items():
    np.testing.assert_array_equal(reader.get_tensor(key), value, err_msg=key)
  # Another class count is refused with the fix in the message (the allowed case is
  # test_fine_tuning_to_another_class_count).
  config.write_text(text.replace('output_channels: 7', 'output_channels: 5'))
  assert cli.main(['convert', f'--from={source}', f'--config_file={config}',
                   f'--output={output}-5']) == 2
  assert 'allow the class-dependent last layers' in capsys.readouterr().err


def test_hostile_checkpoint_of_another_architecture_is_refused_with_a_summary(
    tiny_models, tmp_path, capsys, caplog):
  # Issue 18: a ResNet-50 kMaX checkpoint given for a ConvNeXt config. The refusal is a short
  # summary (counts, the first few variables of each kind, a file listing them all), not
  # thousands of variable lines or TensorFlow warnings.
  import gc  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.model_zoo import __main__ as cli  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.checkpoint import layout as checkpoint_layout  # pylint: disable=g-import-not-at-top
  from tests.model.conftest import TINY_TEXTPROTO as text  # pylint: disable=g-import-not-at-top
  resnet, convnext = tiny_models('resnet50'), tiny_models('convnext_tiny')
  source = deeplab2_conversion.write_deeplab2_checkpoint(deeplab2_conversion.to_deeplab2(resnet),
                                             str(tmp_path / 'dl2'))
  config = tmp_path / 'convnext.textproto'
  config.write_text(text.replace('name: "resnet50"', 'name: "convnext_tiny"'))
  assert cli.main(['convert', f'--from={source}', f'--config_file={config}',
                   f'--output={tmp_path / "ours" / "ckpt"}']) == 2
  captured = capsys.readouterr()
  error = captured.err.strip().splitlines()
  assert error[0].startswith(f'error: {source}: ') and 'model variables get no value' in error[0]
  # Headline, at most 5 variables and an '... and N more' per kind (3 kinds), the listing.
  assert len(error) <= 1 + 3 * 6 + 1 and 'unmapped' not in captured.out, captured.err
  listing = re.search(r'\(every variable: (\S+)\)$', error[-1]).group(1)
  kinds = [line.split()[0] for line in open(listing).read().splitlines()[1:]]
  report = deeplab2_conversion.from_deeplab2(tf.train.load_checkpoint(source), convnext)
  assert kinds.count('unused') == len(report.unused) > 0
  assert kinds.count('shape') + kinds.count('unmapped') == len(report.unmapped) > 20
  # A missing --from: one line, before any model is built.
  assert cli.main(['convert', f'--from={tmp_path / "nothing"}', f'--config_file={config}',
                   f'--output={tmp_path / "x"}']) == 2
  assert capsys.readouterr().err.startswith(
      f'error: --from {tmp_path / "nothing"} does not exist; give a checkpoint prefix')

  # The export's restore (restore_model_weights) of a training checkpoint of the ResNet model.
  path = checkpoint_layout.make_checkpoint(resnet, [], tf.Variable(3, dtype=tf.int64)).write(
      str(tmp_path / 'run' / 'ckpt-3'))
  caplog.set_level('WARNING', logger='tensorflow')
  with pytest.raises(checkpoint_layout.CheckpointMismatchError) as info:
    checkpoint_layout.restore_model_weights(convnext, path)
  gc.collect()   # TensorFlow warns about unrestored values when its restore status dies.
  message = str(info.value)
  lines = message.splitlines()
  assert lines[0].startswith(f'checkpoint {path} does not fit the configured model: ')
  shapes = lambda model: {f'{component}/{key}': tuple(variable.shape)
                          for component, items in checkpoint_layout.model_items(model).items()
                          for key, variable in items.items()}
  saved, wanted = shapes(resnet), shapes(convnext)
  missing = set(wanted) - set(saved)
  reshaped = {key for key in set(wanted) & set(saved) if wanted[key] != saved[key]}
  assert missing and reshaped
  assert (f'{len(wanted) - len(missing) - len(reshaped)} model variables match, '
          f'{len(missing)} are missing from it, {len(reshaped)} have another shape, '
          f'{len(set(saved) - set(wanted))} of its variables are not in the model') in lines[0]
  assert lines[0].endswith('use the config it was trained (or converted) with.')
  assert len(lines) <= 1 + 3 * 6 + 1 and lines[-1].startswith('  (every variable: ')
  assert not [r for r in caplog.records if 'could not be found' in r.getMessage()]
