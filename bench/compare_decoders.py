"""MaX vs CMT vs kMaX trained with the same synthetic budget: PQ, step time and memory per run.

    python bench/compare_decoders.py --data_dir=/tmp/synthetic [--steps=800] [--crop=97]
        [--batch=8] [--seeds=0,1,2] [--decoders=max,cmt,kmax] [--model_root=/tmp/compare]

Trains the synthetic demo configs of the three meta-architectures (MaX-DeepLab's dual-path
transformer, CMT's clustering cross-attention, kMaX's k-means cross-attention:
configs/synthetic/{max_deeplab_s_os16,cmt_r50_os32,kmax_r50_os32}_synthetic_demo.textproto) on
one encoder family and width: kMaX and CMT run on the Axial-ResNet-50 (MaX-S's backbone with
GELU; --same_encoder, on by default) at the MaX config's width, with the same slots / centers,
optimizer and losses; each keeps its own decoder. The budget is overridden to `steps` steps of
`batch` crops of `crop` x `crop`. After training, the last checkpoint is evaluated on the whole
synthetic val split twice: pixel-wise (MaX-DeepLab's post-processing) and mask-wise (kMaX's,
with the demo configs' thresholds). Every (decoder, seed) pair runs in its own process, one after
the other, through the runner (deeplab2_kmax.trainer.runner); the seed sets the model
initialisation and the training-data order. Builds the synthetic data set (1000 train / 100
val, 129 x 129) into --data_dir when it is missing.

Prints one JSON line per run: PQ pixel-wise and mask-wise (all / things / stuff, in %), mIoU,
the median training-step time over the logged loops after the first (which includes tracing),
the process's peak resident memory, parameters, train and total wall time.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, REPO)

CONFIGS = {
    'max': os.path.join(REPO, 'configs', 'synthetic',
                        'max_deeplab_s_os16_synthetic_demo.textproto'),
    'cmt': os.path.join(REPO, 'configs', 'synthetic', 'cmt_r50_os32_synthetic_demo.textproto'),
    'kmax': os.path.join(REPO, 'configs', 'synthetic', 'kmax_r50_os32_synthetic_demo.textproto'),
}
POST_PROCESSINGS = ('pixelwise', 'maskwise')


def define_flags():
  flags.DEFINE_string('data_dir', None, 'Synthetic data set folder (built when missing).',
                      required=True)
  flags.DEFINE_string('model_root', '/tmp/compare_decoders', 'Folder for the runs\' model dirs.')
  flags.DEFINE_integer('steps', 800, 'Training steps per run (the demo configs\' budget).')
  flags.DEFINE_integer('crop', 97, 'Square train and eval crop (k * 32 + 1).')
  flags.DEFINE_integer('batch', 8, 'Training batch size.')
  flags.DEFINE_integer('log_every', 25, 'Steps per training loop (one step-time sample each).')
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.')
  flags.DEFINE_string('decoders', 'max,cmt,kmax',
                      'Comma-separated meta-architectures (max, cmt, kmax).')
  flags.DEFINE_bool('same_encoder', True,
                    'kMaX and CMT use the MaX config\'s encoder family and width (Axial-ResNet-50).')
  flags.DEFINE_string('run_one', None, 'Internal: "decoder,seed" runs one training here.')


def budget_override(steps, crop, batch, log_every, seed, post_processing='pixelwise'):
  """Textproto override giving every decoder the same budget, seed and evaluation."""
  warmup = max(1, steps // 16)
  return f'''
trainer_options {{
  seed: {seed} steps_per_loop: {log_every} save_summaries_steps: {log_every}
  save_checkpoints_steps: {steps}
  solver_options {{ training_number_of_steps: {steps} warmup_steps: {warmup} }}
}}
train_dataset_options {{
  batch_size: {batch} crop_size: [{crop}, {crop}] min_resize_value: {crop}
  max_resize_value: {crop} seed: {seed}
}}
eval_dataset_options {{
  crop_size: [{crop}, {crop}] min_resize_value: {crop} max_resize_value: {crop}
}}
evaluator_options {{
  eval_interval: {steps} transformer_post_processing: "{post_processing}"
  transformer_class_confidence_threshold: 0.7 pixel_confidence_threshold: 0.4
  maskwise_postprocessing {{
    transformer_class_confidence_threshold_thing: 0.5
    transformer_class_confidence_threshold_stuff: 0.5
    overlapping_threshold: 0.5 reorder_class_weight: 1.0 reorder_mask_weight: 1.0
  }}
}}
'''


def encoder_override(max_config):
  """kMaX / CMT backbone override: the MaX config's encoder family (axial) and widths."""
  backbone = max_config.model_options.backbone
  return (f'model_options {{ backbone {{ name: "axial_resnet50" '
          f'backbone_width_multiplier: {backbone.backbone_width_multiplier} '
          f'stem_width_multiplier: {backbone.stem_width_multiplier} '
          f'backbone_layer_multiplier: {backbone.backbone_layer_multiplier} }} }}')


def _pq_fields(results, suffix):
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  pq = results['panoptic_quality']
  return {f'pq_{suffix}': round(100 * pq[common.PQ_ALL][common.PQ], 2),
          f'pq_things_{suffix}': round(100 * pq[common.PQ_THINGS][common.PQ], 2),
          f'pq_stuff_{suffix}': round(100 * pq[common.PQ_STUFF][common.PQ], 2)}


def run_one(decoder, seed):
  """Trains and evaluates one (decoder, seed) in this process; prints its JSON line."""
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  overrides = []
  if decoder != 'max' and f.same_encoder:
    overrides.append(encoder_override(loader.load_config(CONFIGS['max'])))
  budget = lambda pp: budget_override(f.steps, f.crop, f.batch, f.log_every, seed, pp)
  config = loader.load_config(CONFIGS[decoder], overrides + [budget(POST_PROCESSINGS[0])])
  model_dir = os.path.join(f.model_root, f'{decoder}_seed{seed}')
  tf.io.gfile.rmtree(model_dir) if tf.io.gfile.exists(model_dir) else None
  loop_rates = []

  def log(line):
    # '[train] step S/T loss L lr R X images/s ...': one line per loop of log_every steps.
    if line.startswith('[train] step') and 'images/s' in line:
      words = line.split()
      loop_rates.append(float(words[words.index('images/s') - 1]))

  start = time.perf_counter()
  experiment = runner.Experiment(config, 'train_and_eval', model_dir, log_fn=log)
  results = experiment.run()
  train_and_eval = time.perf_counter() - start
  params = int(experiment.model.count_params())
  del experiment
  # The same checkpoint under the other post-processing.
  config = loader.load_config(CONFIGS[decoder], overrides + [budget(POST_PROCESSINGS[1])])
  other = runner.Experiment(config, 'eval', model_dir, log_fn=lambda line: None).run()
  total = time.perf_counter() - start
  rates = loop_rates[1:] or loop_rates
  print(json.dumps({
      'benchmark': 'compare_decoders', 'decoder': decoder, 'seed': seed, 'steps': f.steps,
      'batch': f.batch, 'crop': f.crop, 'same_encoder': f.same_encoder,
      **_pq_fields(results, POST_PROCESSINGS[0]), **_pq_fields(other, POST_PROCESSINGS[1]),
      'miou': round(100 * results['miou'][common.MIOU], 2),
      'median_step_s': round(f.batch / statistics.median(rates), 3) if rates else None,
      # ru_maxrss is in KiB on Linux: the whole process (data pipeline, model, evaluation).
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      'params': params, 'train_and_eval_wall_s': round(train_and_eval, 1),
      'total_wall_s': round(total, 1), 'val_images': results.get('num_images'),
      'tf': tf.__version__, 'cpus': os.cpu_count(), 'machine': platform.machine(),
      'load_avg_1m': round(os.getloadavg()[0], 2)}), flush=True)


def main(argv):
  del argv
  f = flags.FLAGS
  os.environ['SYNTHETIC_DATA_DIR'] = f.data_dir
  if f.run_one:
    decoder, seed = f.run_one.split(',')
    run_one(decoder, int(seed))
    return
  env = {**os.environ, 'PYTHONPATH': os.path.abspath(REPO), 'TF_CPP_MIN_LOG_LEVEL': '3'}
  if not (os.path.isdir(f.data_dir)
          and any(n.startswith('val-') for n in os.listdir(f.data_dir))):
    subprocess.run([sys.executable, '-m', 'deeplab2_kmax.data.build.synthetic',
                    f'--output_dir={f.data_dir}', '--num_workers=1'], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)
  common_args = [f'--data_dir={f.data_dir}', f'--model_root={f.model_root}',
                 f'--steps={f.steps}', f'--crop={f.crop}', f'--batch={f.batch}',
                 f'--log_every={f.log_every}', f'--same_encoder={f.same_encoder}']
  # Seed-major order, so an interrupted benchmark still has every decoder for the first seeds.
  for seed in f.seeds.split(','):
    for decoder in f.decoders.split(','):
      result = subprocess.run(
          [sys.executable, os.path.abspath(__file__), *common_args,
           f'--run_one={decoder},{seed}'], env=env, cwd=REPO, capture_output=True, text=True)
      lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
      if result.returncode or not lines:
        print(json.dumps({'benchmark': 'compare_decoders', 'decoder': decoder, 'seed': int(seed),
                          'error': result.stderr[-1500:]}), flush=True)
      else:
        print(lines[-1], flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
