"""Config loading: strict parsing, ${VAR} substitution, overrides, validation messages, CLI."""

import subprocess
import sys
import textwrap

import pytest

from deeplab2_kmax.config import loader
from deeplab2_kmax.config import validation
from deeplab2_kmax.model.pixel_decoder import kmax as kmax_pixel_decoder
from tests.conftest import REPO_ROOT

SYNTHETIC_CONFIG = REPO_ROOT / 'configs/synthetic/kmax_r50_os32_synthetic.textproto'
ENV = {'SYNTHETIC_DATA_DIR': '/data/synthetic'}


def write(tmp_path, text, name='config.textproto'):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


def test_loads_synthetic_config_with_environment():
  config = loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV)
  assert list(config.train_dataset_options.file_pattern) == ['/data/synthetic/train-*.tfrecord']
  assert config.model_options.WhichOneof('meta_architecture') == 'kmax'


def test_misspelled_field_names_file_line_column_and_suggests(tmp_path):
  path = write(tmp_path, '''\
      experiment_name: "x"
      train_dataset_options {
        crop_sise: 65
      }
      ''')
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(path, validate=False)
  message = str(info.value)
  assert message.startswith(f'{path}:3:3: ')
  assert '"crop_sise"' in message and 'did you mean "crop_size"' in message


def test_wrong_type_names_location(tmp_path):
  path = write(tmp_path, 'train_dataset_options {\n  batch_size: "eight"\n}\n')
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(path, validate=False)
  assert str(info.value).startswith(f'{path}:2:')
  assert 'integer' in str(info.value)


def test_repeated_scalar_is_an_error(tmp_path):
  path = write(tmp_path, 'experiment_name: "a"\nexperiment_name: "b"\n')
  with pytest.raises(loader.ConfigError, match=r':2:\d+: .*experiment_name'):
    loader.load_config(path, validate=False)


def test_missing_environment_variable_is_named(tmp_path):
  path = write(tmp_path, 'experiment_name: "x"\nmodel_options { initial_checkpoint: '
                         '"${INIT_CKPT}/model" }\n')
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(path, environ={}, validate=False)
  assert str(info.value).startswith(f'{path}:2:')
  assert '${INIT_CKPT}' in str(info.value) and 'not set' in str(info.value)


def test_environment_default_escape_and_comments():
  text = ('# ${NOT_SET_BUT_IN_A_COMMENT}\n'
          'experiment_name: "${NAME:-fallback}-$${literal}"  # ${ALSO_IGNORED}\n')
  assert loader.substitute_environment(text, 'f', {}) == (
      '# ${NOT_SET_BUT_IN_A_COMMENT}\n'
      'experiment_name: "fallback-${literal}"  # ${ALSO_IGNORED}\n')
  assert 'experiment_name: "given-' in loader.substitute_environment(text, 'f', {'NAME': 'given'})


def test_override_replaces_repeated_fields_and_merges_messages():
  config = loader.load_config(
      str(SYNTHETIC_CONFIG), environ=ENV,
      overrides=['train_dataset_options { crop_size: [65, 97] batch_size: 2 }',
                 'model_options { kmax { num_cluster_centers: 3 } }'])
  assert list(config.train_dataset_options.crop_size) == [65, 97]   # replaced, not appended
  assert config.train_dataset_options.batch_size == 2
  assert config.train_dataset_options.dataset == 'synthetic_panoptic'   # untouched
  assert config.model_options.kmax.num_cluster_centers == 3
  assert config.model_options.kmax.pixel_space_head.output_channels == 32   # merged


def test_override_switches_oneof():
  config = loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV, validate=False,
                              overrides=['model_options { cmt { } }'])
  assert config.model_options.WhichOneof('meta_architecture') == 'cmt'


def test_override_errors_name_the_override():
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV,
                       overrides=['', 'trainer_options { steps: 3 }'])
  assert str(info.value).startswith('--config_override[1]:1:')


def test_invalid_crop_points_at_the_line_and_suggests_size(tmp_path):
  text = SYNTHETIC_CONFIG.read_text().replace('crop_size: [129, 129]', 'crop_size: [640, 129]',
                                              1)
  path = write(tmp_path, text)
  expected_line = text.splitlines().index('  crop_size: [640, 129]') + 1
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(path, environ=ENV)
  assert str(info.value) == (f'{path}:{expected_line}: train_dataset_options.crop_size: 640 is '
                             'not of the form k*32+1 required by the encoders (nearest valid '
                             'size: 641)')


def test_several_problems_are_reported_together():
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV, num_replicas=3, overrides=[
        'evaluator_options { pixel_confidence_threshold: 1.5 }',
        'model_options { kmax { auxiliary_semantic_head { output_channels: 9 } } }'])
  message = str(info.value)
  assert message.startswith('4 problems in the config:')   # both batch sizes
  assert 'batch_size: 8 is not divisible by the 3 replicas' in message
  assert 'pixel_confidence_threshold: 1.5 is not in [0, 1]' in message
  assert ('output_channels: is 9 but dataset "synthetic_panoptic" has 7 classes' in message)


@pytest.mark.parametrize('override, expected', [
    ('train_dataset_options { max_thing_id: 256 }', 'below the panoptic label divisor (256)'),
    ('train_dataset_options { dataset_descriptor { class_names: ["a", "b"] '
     'class_has_instances: [true] } }', 'has 1 entries but class_names has 2'),
    ('train_dataset_options { dataset: "kitti" }', '"kitti" is not a built-in dataset'),
    ('model_options { kmax { pixel_decoder { dims: [1, 2] } } }', 'gives 4 decoder stages'),
    ('model_options { kmax { transformer_decoder { strides: [64] num_blocks: [1] } } }',
     '64 is not a pixel-decoder stride'),
    ('trainer_options { solver_options { optimizer: "lamb" } }', '"lamb" is unknown'),
    ('model_options { backbone { name: "vgg16" } }', '"vgg16" is not supported'),
])
def test_semantic_checks(override, expected):
  with pytest.raises(loader.ConfigError, match=None) as info:
    loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV, overrides=[override])
  assert expected in str(info.value)


@pytest.mark.parametrize('stride, dims, expected', [
    # DeepLab2's defaults exist for 4 and 2 only; validation says so before the builder would.
    (8, [], 'high_resolution_output_stride 8 has no default decoder'),
    (8, [64, 32, 16], None),
    (2, [], None),
])
def test_pixel_decoder_stages_follow_the_decoder(stride, dims, expected):
  config = loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV)
  kmax = config.model_options.kmax
  kmax.high_resolution_output_stride = stride
  for name in ('dims', 'num_blocks', 'block_types'):
    kmax.pixel_decoder.ClearField(name)
  kmax.pixel_decoder.dims.extend(dims)
  kmax.pixel_decoder.num_blocks.extend([1] * len(dims))
  kmax.pixel_decoder.block_types.extend(['axial'] * len(dims))
  problems = [f'{p.field}: {p.message}' for p in validation.find_problems(config)]
  if expected is None:
    assert not problems
  else:
    # One problem per empty field, each naming the stages the stride gives.
    assert len(problems) == 3 and all(expected in p for p in problems), problems
    assert all(f'strides {kmax_pixel_decoder.stage_strides(stride)}' in p for p in problems)


def test_inline_dataset_descriptor_validates():
  config = loader.load_config(str(SYNTHETIC_CONFIG), environ=ENV, overrides=[
      'train_dataset_options { dataset_descriptor { name: "street" class_names: ["void", "road", '
      '"car"] class_has_instances: [false, false, true] colors: ["#000000", "#804080", '
      '"#00008e"] ignore_label: 0 panoptic_label_divisor: 1000 } }',
      'eval_dataset_options { dataset_descriptor { name: "street" class_names: ["void", '
      '"road", "car"] class_has_instances: [false, false, true] ignore_label: 0 '
      'panoptic_label_divisor: 1000 } }',
      'model_options { kmax { auxiliary_semantic_head { output_channels: 3 } } }'])
  assert config.train_dataset_options.WhichOneof('dataset_source') == 'dataset_descriptor'


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'deeplab2_kmax.config', *args],
                        capture_output=True, text=True, cwd=REPO_ROOT,
                        env={'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(REPO_ROOT),
                             **(env or {})}, timeout=120)


def test_cli_prints_effective_config():
  result = run_cli(f'--config_file={SYNTHETIC_CONFIG}',
                   '--config_override=train_dataset_options { batch_size: 2 }',
                   env={'SYNTHETIC_DATA_DIR': '/d'})
  assert result.returncode == 0, result.stderr
  assert 'batch_size: 2' in result.stdout and '"/d/train-*.tfrecord"' in result.stdout


def test_cli_failure_is_one_line_without_traceback(tmp_path):
  result = run_cli(f'--config_file={SYNTHETIC_CONFIG}')   # SYNTHETIC_DATA_DIR unset
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines() == [
      f'error: {SYNTHETIC_CONFIG}:97:18: environment variable ${{SYNTHETIC_DATA_DIR}} is not '
      'set (it sets train_dataset_options.file_pattern, eval_dataset_options.file_pattern); '
      'export SYNTHETIC_DATA_DIR=... before running, or write '
      '${SYNTHETIC_DATA_DIR:-default}']


COCO_R50_CONFIG = REPO_ROOT / 'configs/coco/kmax_deeplab/kmax_meta_r50_os32.textproto'


def _line_of(path, text: str) -> int:
  return next(number for number, line in enumerate(path.read_text().splitlines(), start=1)
              if text in line)


def test_hostile_inference_does_not_need_the_variables_it_does_not_read(tmp_path):
  # Export and predict read neither the data files nor the initial checkpoint (issue 18).
  config = loader.load_config(str(COCO_R50_CONFIG), environ={},
                              unread_fields=loader.INFERENCE_UNREAD_FIELDS)
  assert list(config.eval_dataset_options.file_pattern) == [
      '<unset COCO_TFRECORD_DIR>/val*.tfrecord']
  assert config.eval_dataset_options.dataset == 'coco_panoptic'
  # A training run reads them: the error names the variable, file:line:column and fields.
  line = _line_of(COCO_R50_CONFIG, '${COCO_TFRECORD_DIR}')
  with pytest.raises(loader.ConfigError) as info:
    loader.load_config(str(COCO_R50_CONFIG), environ={})
  assert str(info.value) == (
      f'{COCO_R50_CONFIG}:{line}:18: environment variable ${{COCO_TFRECORD_DIR}} is not set '
      '(it sets train_dataset_options.file_pattern, eval_dataset_options.file_pattern); '
      'export COCO_TFRECORD_DIR=... before running, or write ${COCO_TFRECORD_DIR:-default}')
  # ... unless an override replaces every field the variable sets.
  replaced = loader.load_config(str(COCO_R50_CONFIG), environ={}, overrides=[
      'train_dataset_options { file_pattern: "/a/*" } '
      'eval_dataset_options { file_pattern: "/b/*" }'])
  assert list(replaced.train_dataset_options.file_pattern) == ['/a/*']
  # A variable in a field inference does read is still an error for it, naming the field.
  path = write(tmp_path, COCO_R50_CONFIG.read_text().replace(
      'experiment_name: "kmax_meta_r50_os32_coco"', 'experiment_name: "${RUN_NAME}"'))
  with pytest.raises(loader.ConfigError, match=r'\$\{RUN_NAME\} is not set \(it sets '
                     r'experiment_name\)'):
    loader.load_config(path, environ={}, unread_fields=loader.INFERENCE_UNREAD_FIELDS)
  # A placeholder that cannot parse (a number) is reported as the variable, not a type error.
  path = write(tmp_path, 'train_dataset_options {\n  batch_size: ${BATCH}\n}\n', 'n.textproto')
  with pytest.raises(loader.ConfigError, match=rf'^{path}:2:15: environment variable '
                     r'\$\{BATCH\} is not set'):
    loader.load_config(path, environ={}, validate=False)


def test_hostile_load_from_flags_for_inference(monkeypatch):
  """The call export and predict make: `load_from_flags(inference=True)`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import flags as config_flags  # pylint: disable=g-import-not-at-top
  if 'config_file' not in flags.FLAGS:
    config_flags.define_config_flags(required=False)
  flags.FLAGS.mark_as_parsed()
  for name in ('COCO_TFRECORD_DIR', 'INIT_CHECKPOINT'):
    monkeypatch.delenv(name, raising=False)
  with flagsaver.flagsaver(config_file=str(COCO_R50_CONFIG), config_override=[]):
    config = config_flags.load_from_flags(inference=True)
    assert config.model_options.backbone.name == 'resnet50'
    with pytest.raises(loader.ConfigError, match=r'\$\{COCO_TFRECORD_DIR\} is not set'):
      config_flags.load_from_flags()
