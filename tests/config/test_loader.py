"""Config loading: strict parsing, ${VAR} substitution, overrides, validation messages, CLI."""

import subprocess
import sys
import textwrap

import pytest

from deeplab2_kmax.config import loader
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
      'set; export SYNTHETIC_DATA_DIR=... before running, or write '
      '${SYNTHETIC_DATA_DIR:-default}']
