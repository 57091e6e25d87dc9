"""Numeric precision for serving and benchmarks, chosen from what the hardware computes natively.

bfloat16 only pays where the hardware has bfloat16 arithmetic. Measured on kMaX-R50 at 641x641
(docs/benchmarks.md): 1.6-1.8x faster than float32 on a CPU with AVX512_BF16, but 2.3x *slower*
on an AVX2-only CPU, where every bfloat16 op is emulated through float32 conversions.

`auto` therefore picks bfloat16 only when the CPU reports a native bfloat16 instruction set in
its flags (x86: avx512_bf16 or amx_bf16; Arm: bf16), or a GPU of compute capability >= 8.0
(Ampere and newer) is visible; everything else gets float32. Nothing is guessed from the CPU's
model name.
"""

import os
from typing import Iterable, Optional

PRECISIONS = ('float32', 'bfloat16', 'auto')
# The Keras dtype policy a resolved precision builds the model with.
KERAS_POLICIES = {'float32': 'float32', 'bfloat16': 'mixed_bfloat16'}
# /proc/cpuinfo flags naming native bfloat16 arithmetic: x86 AVX512_BF16 and AMX-BF16 (Intel
# Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later), Arm's BF16 extension
# (Neoverse V1/N2, e.g. AWS Graviton3).
NATIVE_BF16_CPU_FLAGS = frozenset({'avx512_bf16', 'amx_bf16', 'bf16'})
# Compute capability from which GPUs have bfloat16 tensor cores.
MIN_BF16_GPU_CAPABILITY = (8, 0)
CPUINFO = '/proc/cpuinfo'


def cpu_flags(cpuinfo: str = CPUINFO) -> frozenset:
  """The CPU feature flags of /proc/cpuinfo ('flags' on x86, 'Features' on Arm); empty where
  the file does not exist (macOS, Windows)."""
  if not os.path.exists(cpuinfo):
    return frozenset()
  flags = set()
  with open(cpuinfo, encoding='utf-8', errors='replace') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key.strip().lower() in ('flags', 'features'):
        flags.update(value.split())
  return frozenset(flags)


def native_bf16_cpu_flags(flags: Iterable[str]) -> list:
  """The flags among `flags` that name native bfloat16 arithmetic, sorted."""
  return sorted(NATIVE_BF16_CPU_FLAGS.intersection(flags))


def bf16_gpus() -> list:
  """Names of the visible GPUs with native bfloat16 (compute capability >= 8.0)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (keeps this module light)
  names = []
  for device in tf.config.list_physical_devices('GPU'):
    capability = tf.config.experimental.get_device_details(device).get('compute_capability')
    if capability and tuple(capability) >= MIN_BF16_GPU_CAPABILITY:
      names.append(device.name)
  return names


def resolve(precision: str, flags: Optional[Iterable[str]] = None,
            gpus: Optional[list] = None) -> str:
  """'float32', 'bfloat16' or 'auto' -> 'float32' or 'bfloat16'.

  Args:
    precision: the requested precision.
    flags: CPU flags (default: this machine's, from /proc/cpuinfo).
    gpus: bfloat16-capable GPUs (default: bf16_gpus()).
  """
  if precision not in PRECISIONS:
    raise ValueError(f'--precision "{precision}" is unknown; use one of {", ".join(PRECISIONS)}.')
  if precision != 'auto':
    return precision
  flags = cpu_flags() if flags is None else flags
  gpus = bf16_gpus() if gpus is None else gpus
  return 'bfloat16' if gpus or native_bf16_cpu_flags(flags) else 'float32'


def describe(flags: Optional[Iterable[str]] = None) -> dict:
  """What `auto` decides from, for logs and benchmark lines: the CPU's SIMD and bfloat16 flags."""
  flags = cpu_flags() if flags is None else frozenset(flags)
  simd = sorted(f for f in flags if f.startswith(('avx', 'amx', 'sse4', 'fma', 'asimd', 'sve'))
                or f in ('bf16', 'i8mm'))
  return {'cpu_flags': simd, 'native_bf16_cpu_flags': native_bf16_cpu_flags(flags)}


def slow_bf16_warning(policy: str, on_accelerator: bool,
                      flags: Optional[Iterable[str]] = None) -> Optional[str]:
  """A warning when a bfloat16 policy will run on a CPU that emulates bfloat16, else None.

  Args:
    policy: the Keras dtype policy name (trainer_options.mixed_precision_policy).
    on_accelerator: whether the computation runs on a GPU or TPU.
    flags: CPU flags (default: this machine's).
  """
  if 'bfloat16' not in policy or on_accelerator:
    return None
  flags = cpu_flags() if flags is None else flags
  if native_bf16_cpu_flags(flags):
    return None
  return (f'mixed_precision_policy "{policy}" on a CPU without native bfloat16 (no avx512_bf16, '
          'amx_bf16 or bf16 in its flags): every bfloat16 op is emulated, measured 2.3x slower '
          'than float32 on kMaX-R50 on an AVX2 CPU. Use "float32" here, or run on a CPU or GPU '
          'with native bfloat16.')
