"""kMaX vs CMT decoders trained with the same synthetic budget: PQ and step time per run.

    python bench/compare_decoders.py --data_dir=/tmp/synthetic [--steps=250] [--crop=65]
        [--batch=8] [--seeds=0,1,2] [--decoders=kmax,cmt] [--model_root=/tmp/compare]
        [--post_processing=pixelwise]

Trains configs/synthetic/{kmax,cmt}_r50_os32_synthetic_demo.textproto (identical encoder, pixel
decoder, heads, centers, optimizer and losses; CMT adds its reference-mask loss) with the
budget overridden to `steps` steps of `batch` crops of `crop` x `crop`, then evaluates on the
whole synthetic val split with --post_processing (default pixelwise: after a few hundred steps
the class confidences of both decoders stay below the demo's mask-wise thresholds, which then
keep no mask and give PQ 0 for every run; docs/benchmarks.md). Every (decoder, seed) pair
runs in its own process, one after the other, through the README's runner (deeplab2_kmax.trainer.runner, mode train_and_eval); the
seed sets the model initialisation and the training-data order. Builds the synthetic data set
(1000 train / 100 val, 129 x 129) into --data_dir when it is missing.

Prints one JSON line per run: PQ (all / things / stuff, in %), mIoU, the median training-step
time over the logged loops after the first (which includes tracing), train and total wall time.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, REPO)

CONFIGS = {
    'kmax': os.path.join(REPO, 'configs', 'synthetic', 'kmax_r50_os32_synthetic_demo.textproto'),
    'cmt': os.path.join(REPO, 'configs', 'synthetic', 'cmt_r50_os32_synthetic_demo.textproto'),
}


def define_flags():
  flags.DEFINE_string('data_dir', None, 'Synthetic data set folder (built when missing).',
                      required=True)
  flags.DEFINE_string('model_root', '/tmp/compare_decoders', 'Folder for the runs\' model dirs.')
  flags.DEFINE_integer('steps', 250, 'Training steps per run.')
  flags.DEFINE_integer('crop', 65, 'Square train and eval crop (k * 32 + 1).')
  flags.DEFINE_integer('batch', 8, 'Training batch size.')
  flags.DEFINE_integer('log_every', 25, 'Steps per training loop (one step-time sample each).')
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.')
  flags.DEFINE_string('decoders', 'kmax,cmt', 'Comma-separated decoders (kmax, cmt).')
  flags.DEFINE_enum('post_processing', 'pixelwise', ['pixelwise', 'maskwise'],
                    'Evaluation post-processing (maskwise: the demo configs\' thresholds).')
  flags.DEFINE_string('run_one', None, 'Internal: "decoder,seed" runs one training here.')


def budget_override(steps, crop, batch, log_every, seed, post_processing='pixelwise'):
  """Textproto override giving both decoders the same budget, seed and evaluation."""
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
evaluator_options {{ eval_interval: {steps} transformer_post_processing: "{post_processing}" }}
'''


def run_one(decoder, seed):
  """Trains and evaluates one (decoder, seed) in this process; prints its JSON line."""
  from deeplab2_kmax import common  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.trainer import runner  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = loader.load_config(CONFIGS[decoder], [
      budget_override(f.steps, f.crop, f.batch, f.log_every, seed, f.post_processing)])
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
  total = time.perf_counter() - start
  pq = results['panoptic_quality']
  rates = loop_rates[1:] or loop_rates
  print(json.dumps({
      'benchmark': 'compare_decoders', 'decoder': decoder, 'seed': seed, 'steps': f.steps,
      'batch': f.batch, 'crop': f.crop, 'post_processing': f.post_processing,
      'pq': round(100 * pq[common.PQ_ALL][common.PQ], 2),
      'pq_things': round(100 * pq[common.PQ_THINGS][common.PQ], 2),
      'pq_stuff': round(100 * pq[common.PQ_STUFF][common.PQ], 2),
      'miou': round(100 * results['miou'][common.MIOU], 2),
      'median_step_s': round(f.batch / statistics.median(rates), 3) if rates else None,
      'params': int(experiment.model.count_params()), 'total_wall_s': round(total, 1),
      'val_images': results.get('num_images'), 'tf': tf.__version__,
      'cpus': os.cpu_count(), 'machine': platform.machine(),
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
    subprocess.run([sys.executable, '-m', 'deeplab2_kmax.data.build_synthetic_data',
                    f'--output_dir={f.data_dir}', '--num_workers=1'], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)
  common_args = [f'--data_dir={f.data_dir}', f'--model_root={f.model_root}',
                 f'--steps={f.steps}', f'--crop={f.crop}', f'--batch={f.batch}',
                 f'--log_every={f.log_every}', f'--post_processing={f.post_processing}']
  # Seed-major order, so an interrupted benchmark still has both decoders for the first seeds.
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
