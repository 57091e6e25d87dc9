"""deeplab2_kmax/precision.py (named apart from tests/trainer/test_precision.py: pytest needs
unique basenames here): CPU flags parsed from fake /proc/cpuinfo files, `auto` resolved
from faked flags, the slow-bfloat16 warning (precision.py and the trainer's runner), the
export command line's per-format precisions, bench/model_forward.py's --precision, and a
bfloat16 serving module against the float32 one at the export tests' tiny shapes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deeplab2_kmax import precision
from tests.conftest import REPO_ROOT
from tests.export import conftest as export_conftest

# The flags line of an AMD EPYC with AVX2 but no AVX-512 (this project's benchmark machine):
# every bfloat16 op is emulated there.
AVX2_FLAGS_LINE = (
    'flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush '
    'mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl '
    'xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid '
    'sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor '
    'lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs '
    'ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap '
    'clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr wbnoinvd arat umip '
    'pku ospke vaes vpclmulqdq rdpid fsrm')
# A Sapphire Rapids: AVX512_BF16 and AMX-BF16.
BF16_FLAGS_LINE = (
    'flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f '
    'avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile '
    'amx_int8')
# A Graviton3 (Neoverse V1): Arm's BF16 extension in its 'Features' line.
ARM_CPUINFO = '''processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8

processor\t: 1
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
'''


def _x86_cpuinfo(flags_line: str, processors: int = 2) -> str:
  return ''.join(f'processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n'
                 f'{flags_line}\nbugs\t\t: sysret_ss_attrs spectre_v1\n\n'
                 for i in range(processors))


@pytest.fixture
def avx2_flags(tmp_path):
  path = tmp_path / 'cpuinfo_avx2'
  path.write_text(_x86_cpuinfo(AVX2_FLAGS_LINE))
  return precision.cpu_flags(str(path))


@pytest.fixture
def bf16_flags(tmp_path):
  path = tmp_path / 'cpuinfo_bf16'
  path.write_text(_x86_cpuinfo(BF16_FLAGS_LINE))
  return precision.cpu_flags(str(path))


@pytest.fixture
def no_gpus(monkeypatch):
  """`auto` decides from the faked CPU flags alone, whatever GPU this machine has."""
  monkeypatch.setattr(precision, 'bf16_gpus', lambda: [])


# --- /proc/cpuinfo -----------------------------------------------------------------------------


def test_cpu_flags_of_an_avx2_only_x86(avx2_flags):
  assert {'avx', 'avx2', 'fma', 'sse4_2', 'vaes'} <= avx2_flags
  assert not any(flag.startswith('avx512') for flag in avx2_flags)
  assert 'sysret_ss_attrs' not in avx2_flags  # the 'bugs' line is not flags
  assert precision.native_bf16_cpu_flags(avx2_flags) == []


def test_cpu_flags_of_an_x86_with_avx512_bf16_and_amx(bf16_flags):
  assert {'avx512_bf16', 'amx_bf16', 'avx512f'} <= bf16_flags
  assert precision.native_bf16_cpu_flags(bf16_flags) == ['amx_bf16', 'avx512_bf16']


def test_cpu_flags_of_an_arm_features_line(tmp_path):
  path = tmp_path / 'cpuinfo_arm'
  path.write_text(ARM_CPUINFO)
  flags = precision.cpu_flags(str(path))
  assert {'asimd', 'sve', 'bf16', 'i8mm', 'svebf16'} <= flags
  assert precision.native_bf16_cpu_flags(flags) == ['bf16']
  assert precision.resolve('auto', flags=flags, gpus=[]) == 'bfloat16'
  described = precision.describe(flags)
  assert described['native_bf16_cpu_flags'] == ['bf16']
  assert {'asimd', 'sve', 'bf16', 'i8mm'} <= set(described['cpu_flags'])


def test_missing_cpuinfo_gives_no_flags_and_float32(tmp_path):
  flags = precision.cpu_flags(str(tmp_path / 'absent'))
  assert flags == frozenset()
  assert precision.resolve('auto', flags=flags, gpus=[]) == 'float32'
  assert precision.describe(flags) == {'cpu_flags': [], 'native_bf16_cpu_flags': []}


def test_describe_lists_simd_and_bf16_flags(avx2_flags, bf16_flags):
  described = precision.describe(avx2_flags)
  assert {'avx', 'avx2', 'fma', 'sse4_1', 'sse4_2'} <= set(described['cpu_flags'])
  assert 'fpu' not in described['cpu_flags']
  assert described['native_bf16_cpu_flags'] == []
  assert described['cpu_flags'] == sorted(described['cpu_flags'])
  assert precision.describe(bf16_flags)['native_bf16_cpu_flags'] == ['amx_bf16', 'avx512_bf16']


# --- resolve -----------------------------------------------------------------------------------


def test_auto_is_float32_on_avx2_only_and_bfloat16_with_avx512_bf16(avx2_flags, bf16_flags):
  assert precision.resolve('auto', flags=avx2_flags, gpus=[]) == 'float32'
  assert precision.resolve('auto', flags=bf16_flags, gpus=[]) == 'bfloat16'
  # Each flag alone suffices.
  assert precision.resolve('auto', flags=avx2_flags | {'avx512_bf16'}, gpus=[]) == 'bfloat16'
  assert precision.resolve('auto', flags=avx2_flags | {'amx_bf16'}, gpus=[]) == 'bfloat16'


def test_auto_is_bfloat16_with_an_ampere_gpu_on_any_cpu(avx2_flags):
  assert precision.resolve('auto', flags=avx2_flags,
                           gpus=['/physical_device:GPU:0']) == 'bfloat16'


def test_auto_reads_this_machines_flags_by_default(monkeypatch, avx2_flags, bf16_flags,
                                                   no_gpus):
  monkeypatch.setattr(precision, 'cpu_flags', lambda cpuinfo=precision.CPUINFO: avx2_flags)
  assert precision.resolve('auto') == 'float32'
  assert precision.describe()['cpu_flags'] == precision.describe(avx2_flags)['cpu_flags']
  monkeypatch.setattr(precision, 'cpu_flags', lambda cpuinfo=precision.CPUINFO: bf16_flags)
  assert precision.resolve('auto') == 'bfloat16'


@pytest.mark.parametrize('requested', ['float32', 'bfloat16'])
def test_explicit_precisions_pass_through_whatever_the_flags(requested, avx2_flags, bf16_flags):
  for flags in (avx2_flags, bf16_flags, frozenset()):
    assert precision.resolve(requested, flags=flags, gpus=[]) == requested
    assert precision.resolve(requested, flags=flags, gpus=['/physical_device:GPU:0']) == requested


@pytest.mark.parametrize('requested', ['float16', 'bf16', 'mixed_bfloat16', ''])
def test_unknown_precision_raises_naming_it(requested):
  with pytest.raises(ValueError, match=f'"{requested}" is unknown') as error:
    precision.resolve(requested, flags=frozenset(), gpus=[])
  assert 'float32, bfloat16, auto' in str(error.value)


# --- slow_bf16_warning -------------------------------------------------------------------------


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'bfloat16'])
def test_slow_bf16_warning_on_a_cpu_without_native_bf16(policy, avx2_flags):
  message = precision.slow_bf16_warning(policy, on_accelerator=False, flags=avx2_flags)
  assert message is not None
  assert f'"{policy}"' in message and 'float32' in message
  # Not on an accelerator, nor on a CPU that has bfloat16 arithmetic.
  assert precision.slow_bf16_warning(policy, on_accelerator=True, flags=avx2_flags) is None
  assert precision.slow_bf16_warning(policy, on_accelerator=False,
                                     flags=avx2_flags | {'avx512_bf16'}) is None
  assert precision.slow_bf16_warning(policy, on_accelerator=False, flags={'bf16'}) is None


@pytest.mark.parametrize('policy', ['float32', 'mixed_float16'])
def test_no_slow_bf16_warning_for_other_policies(policy, avx2_flags):
  assert precision.slow_bf16_warning(policy, on_accelerator=False, flags=avx2_flags) is None


# --- the training run's warning (trainer/runner.py) --------------------------------------------


@pytest.fixture
def warnings_logged(monkeypatch):
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  logged = []
  monkeypatch.setattr(runner.logging, 'warning', lambda message, *args: logged.append(message))
  return logged


def test_training_on_an_avx2_cpu_warns_once_for_bfloat16(avx2_flags, bf16_flags,
                                                          warnings_logged):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  cpu = tf.distribute.OneDeviceStrategy('/cpu:0')
  assert not runner.on_accelerator(cpu)
  message = runner.warn_if_slow_bf16('mixed_bfloat16', cpu, flags=avx2_flags)
  assert message and 'mixed_bfloat16' in message
  assert warnings_logged == [message]
  assert runner.warn_if_slow_bf16('float32', cpu, flags=avx2_flags) is None
  assert runner.warn_if_slow_bf16('mixed_float16', cpu, flags=avx2_flags) is None
  assert runner.warn_if_slow_bf16('mixed_bfloat16', cpu, flags=bf16_flags) is None
  assert warnings_logged == [message]


def test_a_mirrored_cpu_strategy_warns_too(avx2_flags, warnings_logged):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  strategy = tf.distribute.MirroredStrategy(
      devices=[d.name for d in tf.config.list_logical_devices('CPU')])
  assert not runner.on_accelerator(strategy)
  assert runner.warn_if_slow_bf16('mixed_bfloat16', strategy, flags=avx2_flags)
  assert len(warnings_logged) == 1


def test_a_bfloat16_experiment_on_this_cpu_warns_once(synthetic_data_dir, tmp_path, monkeypatch,
                                                      avx2_flags, warnings_logged):
  """Experiment (what deeplab2_kmax.train runs) warns once when built, not per replica or loop;
  the flags are faked so that the test means the same on a CPU with native bfloat16."""
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  from tests.trainer.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(precision, 'cpu_flags', lambda cpuinfo=precision.CPUINFO: avx2_flags)
  config = tiny_config(synthetic_data_dir,
                       'trainer_options { mixed_precision_policy: "mixed_bfloat16" }')
  runner.Experiment(config, 'train', str(tmp_path / 'bf16'), log_fn=lambda _: None)
  assert len(warnings_logged) == 1 and 'mixed_bfloat16' in warnings_logged[0]
  runner.Experiment(tiny_config(synthetic_data_dir), 'train', str(tmp_path / 'fp32'),
                    log_fn=lambda _: None)
  assert len(warnings_logged) == 1


def test_gpu_and_tpu_replicas_count_as_accelerators():
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top

  class FakeStrategy:
    def __init__(self, *devices):
      self.extended = type('Extended', (), {'worker_devices': devices})()

  assert runner.on_accelerator(FakeStrategy('/job:localhost/replica:0/task:0/device:GPU:0'))
  assert runner.on_accelerator(FakeStrategy('/job:worker/replica:0/task:0/device:TPU:0',
                                            '/job:worker/replica:0/task:0/device:TPU:1'))
  assert not runner.on_accelerator(FakeStrategy('/job:localhost/replica:0/task:0/device:CPU:0'))


# --- the export command line -------------------------------------------------------------------


def test_export_auto_is_float32_on_a_cpu_without_native_bf16(avx2_flags, no_gpus):
  from deeplab2_kmax.export import cli  # pylint: disable=g-import-not-at-top
  assert cli.format_precisions(['saved_model'], 'auto', avx2_flags) == {'saved_model': 'float32'}


def test_export_auto_is_bfloat16_for_the_saved_model_only(bf16_flags, no_gpus):
  from deeplab2_kmax.export import cli  # pylint: disable=g-import-not-at-top
  assert cli.format_precisions(['saved_model', 'onnx', 'litert'], 'auto', bf16_flags) == {
      'saved_model': 'bfloat16', 'onnx': 'float32', 'litert': 'float32'}


@pytest.mark.parametrize('requested', ['float32', 'auto'])
def test_export_onnx_and_litert_are_float32_always(requested, avx2_flags, bf16_flags, no_gpus):
  from deeplab2_kmax.export import cli  # pylint: disable=g-import-not-at-top
  for flags in (avx2_flags, bf16_flags):
    assert cli.format_precisions(['onnx', 'litert'], requested, flags) == {
        'onnx': 'float32', 'litert': 'float32'}


def test_export_explicit_precisions(avx2_flags, no_gpus):
  from deeplab2_kmax.export import cli  # pylint: disable=g-import-not-at-top
  # An explicit bfloat16 SavedModel is exported even where it is slow (the user asked).
  assert cli.format_precisions(['saved_model'], 'bfloat16', avx2_flags) == {
      'saved_model': 'bfloat16'}
  for name in ('onnx', 'litert'):
    with pytest.raises(ValueError, match=f'--format={name}'):
      cli.format_precisions(['saved_model', name], 'bfloat16', avx2_flags)


# --- bench/model_forward.py --------------------------------------------------------------------


def _run_model_forward(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, str(REPO_ROOT / 'bench' / 'model_forward.py'),
                         f'--config_file={export_conftest.DEMO_CONFIG}',
                         f'--config_override={export_conftest.TINY_OVERRIDE}', *args],
                        capture_output=True, text=True, env=env, timeout=300, check=False)


def test_model_forward_prints_the_resolved_precision_and_flags():
  result = _run_model_forward('--crop=65', '--calls=1', '--precision=auto')
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(result.stdout.strip().splitlines()[-1])
  # The subprocess sees this machine's flags and GPUs, as the test process does.
  resolved = precision.resolve('auto')
  assert line['precision'] == resolved
  assert line['dtype'] == {'float32': 'fp32', 'bfloat16': 'bf16'}[resolved]
  assert line['precision_requested'] == 'auto'
  assert {k: line[k] for k in ('cpu_flags', 'native_bf16_cpu_flags')} == precision.describe()
  assert line['bf16_gpus'] == precision.bf16_gpus()


def test_model_forward_refuses_precision_and_dtype_together():
  result = _run_model_forward('--precision=float32', '--dtype=bf16')
  assert result.returncode != 0
  assert 'give --precision or --dtype, not both' in result.stderr


# --- a bfloat16 serving module -----------------------------------------------------------------


def test_bfloat16_serving_module_agrees_with_float32(tmp_path):
  """The tiny export model (tests/export/conftest.py) built under mixed_bfloat16 with the
  float32 model's weights: same outputs, float32 scores, and the same panoptic id on most
  pixels. Measured (2026-12-07, 2 CPU cores): 0.989 of the 4 x 65 x 65 pixels agree (0.966 to
  0.989 on single images of other seeds); bfloat16's 8-bit mantissa flips the arg-max of the
  sharpened mask logits near segment borders. The bound leaves room for other CPUs' kernels."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.export import serving_module as serving_lib  # pylint: disable=g-import-not-at-top
  config = export_conftest.tiny_export_config(tmp_path / 'data')
  keras.utils.set_random_seed(11)
  float32 = serving_lib.build_serving_module(config, precision='float32')
  export_conftest.sharpen_max_head(float32.model)
  bfloat16 = serving_lib.build_serving_module(config, precision='bfloat16')
  assert bfloat16.model.dtype_policy.name == 'mixed_bfloat16'
  # Variables stay float32 under the mixed policy, in the same order: copy them across (the
  # dropout seed generators alone are numbered differently, being the second model's).
  weights = [v for v in float32.model.variables if 'seed_generator' not in v.path]
  targets = [v for v in bfloat16.model.variables if 'seed_generator' not in v.path]
  assert [v.path for v in targets] == [v.path for v in weights]
  for target, weight in zip(targets, weights):
    assert target.dtype == 'float32', target.path
    target.assign(weight.numpy())
  images = tf.constant(export_conftest.sample_images(5, (4, 65, 65)))
  assert images.dtype == tf.uint8
  want = {k: v.numpy() for k, v in float32.serve_images(images).items()}
  got = {k: v.numpy() for k, v in bfloat16.serve_images(images).items()}
  assert sorted(got) == sorted(want)
  for key, value in got.items():
    assert value.dtype == want[key].dtype, key
    assert value.shape == want[key].shape, key
  for key in (common.PRED_INSTANCE_SCORES, common.PRED_SEMANTIC_SCORES,
              serving_lib.SEGMENT_SCORES):
    assert got[key].dtype == np.float32, key
    assert np.all(np.isfinite(got[key])), key
  # The float32 prediction holds several segments, or agreement would prove little.
  assert len(np.unique(want[common.PRED_PANOPTIC])) >= 2
  agreement = float(np.mean(got[common.PRED_PANOPTIC] == want[common.PRED_PANOPTIC]))
  print(f'bfloat16 vs float32 panoptic agreement: {agreement:.4f}')
  assert agreement >= 0.9, agreement
