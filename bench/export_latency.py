"""Latency of every export format side by side, and of the in-framework model (issues #7, #17).

    python bench/export_latency.py [--config_file=F] [--config_override=...] [--checkpoint_path=C]
        [--batch_size=1] [--height=641] [--width=641] [--crop=641] [--calls=10]
        [--formats=saved_model_fp32,saved_model_auto,onnxruntime,litert,in_framework]

Builds the model of F (fresh random weights, or C's), exports it into a temporary folder with
deeplab2_kmax.export's writers (each export timed), loads each file with export.runtimes, the
loader `deeplab2_kmax.predict` uses, and times, on one uint8 batch:

- `saved_model_fp32`: the float32 SavedModel's serving_default (runtimes.SavedModelRuntime);
- `saved_model_auto`: the SavedModel exported with --precision=auto (precision.resolve('auto'),
  bfloat16 only on a CPU with native bfloat16); where auto resolves to float32 this is the same
  model as saved_model_fp32, exported and loaded again, and its line says so;
- `onnxruntime`: model.onnx in ONNX Runtime, CPU execution provider (runtimes.OnnxRuntime);
- `litert`: model.tflite in the LiteRT interpreter (ai_edge_litert) with its default delegate
  (XNNPACK), threads = os.cpu_count() (runtimes.LiteRTRuntime);
- `in_framework`: what the evaluator runs, in one tf.function in this process: the eval
  preprocessing, `model(images, training=False)` and the post-processor (no export).

Each runtime gets two warm-up calls, then the timed calls go round-robin across the runtimes
(the starting runtime rotates each round) so that load changes on a shared machine hit all of
them alike. The exports have a fixed batch of --batch_size (the export CLI's --batch_size=N) and
only the serving_default signature. --crop sets the eval crop (and the resize-to-range size)
the exports preprocess every image to; 0 keeps the config's.

Prints one JSON line per runtime: median and min latency, export time and file size, the
versions, the CPU (model name, SIMD and native-bfloat16 flags of precision.describe()), and how
far its panoptic and semantic ids agree with saved_model_fp32's (fraction of equal pixels; a
fast runtime that computes something else is worth nothing), and the process RSS its loading
and warm-up took. With fresh weights every pixel is usually void (no slot passes the class
thresholds; `reference_panoptic_ids` says how many ids there are), and then only the semantic
agreement (no thresholds) tells anything. A format that fails to export or load gets a line
with its error instead, and the others still run: with the COCO config's area limits the
LiteRT conversion fails on tf.DenseBincount (docs/benchmarks.md, "Export formats side by
side"); --config_override='evaluator_options { thing_area_limit: 0 stuff_area_limit: 0 }' runs
all five.
"""

import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
_R50_COCO = os.path.join(_ROOT, 'configs', 'coco', 'kmax_deeplab', 'kmax_meta_r50_os32.textproto')
RUNTIMES = ('saved_model_fp32', 'saved_model_auto', 'onnxruntime', 'litert', 'in_framework')
REFERENCE = 'saved_model_fp32'
WARMUP_CALLS = 2

_CONFIG_FILE = flags.DEFINE_string('config_file', _R50_COCO, 'ExperimentOptions textproto.')
_CONFIG_OVERRIDE = flags.DEFINE_multi_string('config_override', [], 'Textproto overrides '
                                             '(applied after --crop).')
_CHECKPOINT = flags.DEFINE_string('checkpoint_path', None, 'Optional checkpoint (or folder); '
                                  'fresh random weights without it.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per call (the exports\' fixed batch).')
_HEIGHT = flags.DEFINE_integer('height', 641, 'Image height (any; resized in the graph).')
_WIDTH = flags.DEFINE_integer('width', 641, 'Image width.')
_CROP = flags.DEFINE_integer('crop', 641, 'Eval crop and resize-to-range size of the export '
                             '(k * 32 + 1); 0 keeps the config\'s eval_dataset_options.')
_CALLS = flags.DEFINE_integer('calls', 10, 'Timed calls of each runtime after warm-up.')
_FORMATS = flags.DEFINE_list('formats', list(RUNTIMES), 'Runtimes to time, comma separated: '
                             f'{",".join(RUNTIMES)}.')


def _cpu_model(cpuinfo='/proc/cpuinfo'):
  """The first 'model name' of /proc/cpuinfo, or None."""
  if os.path.exists(cpuinfo):
    with open(cpuinfo, encoding='utf-8', errors='replace') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          return value.strip()
  return None


def _rss_mb():
  """Resident memory of this process (Linux), MB, or None."""
  try:
    with open('/proc/self/status', encoding='utf-8') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _size_mb(path):
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names) / 1e6
  return os.path.getsize(path) / 1e6


def _version(distribution):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(distribution)
  except metadata.PackageNotFoundError:
    return None


def _error_text(error):
  """The error's type and its distinct `error:` lines (a converter's message runs to pages of
  call sites), else its first lines."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  errors = list(dict.fromkeys(line[line.index('error:'):] for line in lines if 'error:' in line))
  return f'{type(error).__name__}: {" | ".join(errors or lines[:6])}'[:1500]


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top  (absl parses the flags before TF loads)
  import numpy as np
  import tensorflow as tf
  from deeplab2_kmax import common
  from deeplab2_kmax import precision as precision_lib
  from deeplab2_kmax.config import loader
  from deeplab2_kmax.export import litert_format
  from deeplab2_kmax.export import onnx_format
  from deeplab2_kmax.export import runtimes as runtimes_lib
  from deeplab2_kmax.export import saved_model as saved_model_lib
  from deeplab2_kmax.checkpoint import model_restore
  from deeplab2_kmax.export import serving_module as serving_lib
  # pylint: enable=g-import-not-at-top

  unknown = [name for name in _FORMATS.value if name not in RUNTIMES]
  if unknown or not _FORMATS.value:
    raise app.UsageError(f'--formats: {",".join(unknown) or "nothing"} unknown; use '
                         f'{",".join(RUNTIMES)}.')
  selected = [name for name in RUNTIMES if name in _FORMATS.value]
  overrides = list(_CONFIG_OVERRIDE.value)
  if _CROP.value:
    crop = _CROP.value
    overrides.insert(0, f'eval_dataset_options {{ crop_size: [{crop}, {crop}] '
                     f'min_resize_value: {crop} max_resize_value: {crop} }}')
  config = loader.load_config(_CONFIG_FILE.value, overrides,
                              environ=loader.PlaceholderEnvironment(), validate=False)
  auto_precision = precision_lib.resolve('auto')
  precisions = {'saved_model_fp32': 'float32', 'saved_model_auto': auto_precision,
                'onnxruntime': 'float32', 'litert': 'float32', 'in_framework': 'float32'}
  modules = {}

  def module_of(precision):
    if precision not in modules:
      module = serving_lib.build_serving_module(config, batch_size=_BATCH.value,
                                                precision=precision)
      if _CHECKPOINT.value:
        model_restore.restore_model(module.model, _CHECKPOINT.value)
      elif precision != 'float32':
        # The same random weights as the float32 model, so that their outputs can agree.
        module.model.set_weights(module_of('float32').model.get_weights())
      modules[precision] = module
    return modules[precision]

  images = np.random.RandomState(0).randint(
      0, 256, (_BATCH.value, _HEIGHT.value, _WIDTH.value, 3)).astype(np.uint8)
  results = {name: {} for name in selected}

  with tempfile.TemporaryDirectory(prefix='export_latency_') as folder:
    # Export, load and warm up each runtime in turn.
    runners = {}
    for name in selected:
      result = results[name]
      module = module_of(precisions[name])
      rss_before = None
      try:
        start = time.perf_counter()
        if name.startswith('saved_model'):
          path = saved_model_lib.write(module, os.path.join(folder, name), 1, ['image_tensor'])
        elif name == 'onnxruntime':
          path = onnx_format.write(module, os.path.join(folder, name),
                                   saved_model_lib.descriptor_text(module.descriptor))
        elif name == 'litert':
          path = litert_format.write(module, os.path.join(folder, name))
        else:
          path = None
        if path:
          result['export_s'] = round(time.perf_counter() - start, 1)
          result['file_mb'] = round(_size_mb(path), 1)
          print(f'[export_latency] {name}: exported in {result["export_s"]} s, '
                f'{result["file_mb"]} MB', file=sys.stderr, flush=True)
        gc.collect()  # what the converters left behind is not the runtime's
        rss_before = _rss_mb()
        if name.startswith('saved_model'):
          runner = runtimes_lib.SavedModelRuntime(path)
        elif path:
          runner = runtimes_lib.load(path, num_threads=os.cpu_count())
        else:
          runner = _in_framework(module, tf, common, serving_lib)
        first = []
        for _ in range(WARMUP_CALLS):
          start = time.perf_counter()
          runner(images)
          first.append(round(time.perf_counter() - start, 3))
        result['warmup_s'] = first
        runners[name] = runner
        print(f'[export_latency] {name}: warm-up calls {first} s', file=sys.stderr, flush=True)
      except Exception as error:  # pylint: disable=broad-except
        traceback.print_exc()
        result['error'] = _error_text(error)
      rss_after = _rss_mb()
      if rss_before is not None and rss_after is not None:
        result['load_rss_mb'] = round(rss_after - rss_before)

    # Timed calls, round-robin; the starting runtime rotates each round.
    order = list(runners)
    times = {name: [] for name in order}
    outputs = {}
    for round_index in range(_CALLS.value):
      shift = round_index % max(len(order), 1)
      for name in order[shift:] + order[:shift]:
        start = time.perf_counter()
        outputs[name] = runners[name](images)
        times[name].append(time.perf_counter() - start)

  reference = REFERENCE if REFERENCE in outputs else next(iter(outputs), None)
  versions = {'tf_version': tf.__version__, 'onnxruntime_version': _version('onnxruntime'),
              'tf2onnx_version': _version('tf2onnx'),
              'litert_version': _version('ai-edge-litert')}
  cpu = precision_lib.describe()
  crop_size = list(modules[next(iter(modules))].preprocess_options.crop_size)
  for name in selected:
    result = results[name]
    line = {'benchmark': 'export_latency', 'runtime': name, 'precision': precisions[name]}
    if name == 'saved_model_auto':
      line['precision_requested'] = 'auto'
      line['note'] = (f'auto resolved to {auto_precision}' + (
          ' (no native bfloat16 CPU flag or GPU): the same model as saved_model_fp32'
          if auto_precision == 'float32' else ''))
    if name in times:
      line.update({'median_s': round(statistics.median(times[name]), 4),
                   'min_s': round(min(times[name]), 4), 'calls': len(times[name]),
                   'times_s': [round(t, 3) for t in times[name]]})
    line.update({key: result.get(key) for key in ('warmup_s', 'export_s', 'file_mb',
                                                  'load_rss_mb')})
    line['process_peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if 'error' in result:
      line['error'] = result['error']
    if name in outputs and reference:
      mine, theirs = outputs[name], outputs[reference]
      line['agreement_reference'] = reference
      line['panoptic_agreement'] = round(float(np.mean(
          mine[common.PRED_PANOPTIC] == theirs[common.PRED_PANOPTIC])), 6)
      line['semantic_agreement'] = round(float(np.mean(
          mine[common.PRED_SEMANTIC] == theirs[common.PRED_SEMANTIC])), 6)
      line['semantic_scores_max_abs_diff'] = round(float(np.max(np.abs(
          mine[common.PRED_SEMANTIC_SCORES] - theirs[common.PRED_SEMANTIC_SCORES]))), 6)
      # With fresh weights every pixel may be void (no slot passes the class thresholds), and
      # panoptic agreement is then 1 by construction; semantic_pred has no thresholds.
      line['reference_panoptic_ids'] = int(np.unique(theirs[common.PRED_PANOPTIC]).size)
      if serving_lib.NUM_SEGMENTS in mine:  # not computed by the in-framework post-processor
        line['num_segments'] = [int(n) for n in np.ravel(mine[serving_lib.NUM_SEGMENTS])]
    line.update({
        'config': os.path.basename(_CONFIG_FILE.value),
        'checkpoint': bool(_CHECKPOINT.value),
        'image': [_HEIGHT.value, _WIDTH.value],
        'crop': crop_size,
        'batch_size': _BATCH.value,
        **versions,
        **cpu,
        'cpu_model': _cpu_model(),
        'cpu_count': os.cpu_count(),
        'load_avg_1m': round(os.getloadavg()[0], 2),
        'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    })
    print(json.dumps(line), flush=True)


def _in_framework(module, tf, common, serving_lib):
  """The evaluator's path (preprocessing, model, post-processor) in one tf.function, called
  like a runtime: uint8 numpy images in, numpy outputs out."""

  @tf.function
  def run(images):
    batch = serving_lib.preprocess_batch(images, module.preprocess_options)
    outputs = module.model(batch[common.IMAGE], training=False)
    return module.post_processor(outputs, batch)

  return lambda images: {key: value.numpy() for key, value in run(tf.constant(images)).items()}


if __name__ == '__main__':
  app.run(main)
