"""Picks the tf.distribute strategy from the command line and TF_CONFIG.

    strategy = create_strategy(num_gpus=0, tpu='')

  * `tpu` set                       -> TPUStrategy (name or grpc:// address)
  * TF_CONFIG naming several workers -> MultiWorkerMirroredStrategy
  * num_gpus > 1                    -> MirroredStrategy over the first num_gpus GPUs
  * num_gpus == 1                   -> OneDeviceStrategy('/gpu:0')
  * otherwise                       -> OneDeviceStrategy('/cpu:0')

And what the workers of a multi-worker strategy share: `is_chief`, `num_workers`, and
`all_gather_objects` (every worker's Python object on every worker, through the strategy's own
collectives, so workers need no shared file system).
"""

import json
import os
import pickle
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf


class StrategyError(ValueError):
  """The device flags or TF_CONFIG cannot be satisfied; str(error) says why and what to do."""


def _num_workers_in_tf_config(environ) -> int:
  text = environ.get('TF_CONFIG', '')
  if not text:
    return 0
  try:
    config = json.loads(text)
  except json.JSONDecodeError as error:
    raise StrategyError(f'TF_CONFIG is not valid JSON ({error}); expected e.g. '
                     '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                     '"task": {"type": "worker", "index": 0}}') from None
  cluster = config.get('cluster', {})
  return len(cluster.get('worker', [])) + len(cluster.get('chief', []))


def create_strategy(num_gpus: int = 0, tpu: str = '', devices: Optional[Sequence[str]] = None,
                    environ=None) -> tf.distribute.Strategy:
  """Returns the strategy for these settings (see the module docstring).

  Args:
    num_gpus: GPUs on this machine to use.
    tpu: TPU name or address; non-empty selects TPUStrategy.
    devices: explicit device list for MirroredStrategy (tests use two logical CPUs).
    environ: environment to read TF_CONFIG from (default os.environ).
  """
  environ = os.environ if environ is None else environ
  if tpu:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if _num_workers_in_tf_config(environ) > 1:
    return tf.distribute.MultiWorkerMirroredStrategy()
  if devices:
    return tf.distribute.MirroredStrategy(devices=list(devices))
  if num_gpus > 1:
    found = tf.config.list_logical_devices('GPU')
    if len(found) < num_gpus:
      raise StrategyError(f'--num_gpus={num_gpus} but this machine has {len(found)} GPU(s); '
                       f'lower --num_gpus.')
    return tf.distribute.MirroredStrategy(devices=[d.name for d in found[:num_gpus]])
  if num_gpus == 1:
    if not tf.config.list_logical_devices('GPU'):
      raise StrategyError('--num_gpus=1 but TensorFlow sees no GPU; use --num_gpus=0 for the CPU.')
    return tf.distribute.OneDeviceStrategy('/gpu:0')
  return tf.distribute.OneDeviceStrategy('/cpu:0')


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that writes summaries, results and (the real) checkpoints."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, 'chief') or (task_type == 'worker' and task_id == 0)


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """How many machines (processes) run replicas of `strategy`: 1 but under MultiWorkerMirrored.

  A TPU strategy has one client that sees every replica's results, so it counts as one.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  return strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)


def all_gather_objects(strategy: tf.distribute.Strategy, value: Any) -> list:
  """Each worker's picklable `value`, in worker order (task index), returned on every worker.

  Every worker must call it at the same point (it runs collectives). The pickled bytes go
  through `strategy.gather` as int32 words (collectives take no uint8 or strings), the first
  local replica of each worker carrying its worker's words and every other replica one padding
  word; one gather of the byte counts first tells the pieces apart.
  """
  if num_workers(strategy) == 1:
    return [value]
  payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
  words = np.frombuffer(payload + b'\0' * (-len(payload) % 4), np.int32)
  local_replicas = len(strategy.extended.worker_devices)

  def per_replica(carried, padding):
    # Replica ids are worker-major: task t's local replicas are t * local_replicas + j.
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(
            carried if context.replica_id_in_sync_group % local_replicas == 0 else padding))

  lengths = strategy.gather(per_replica(np.array([len(payload)], np.int64),
                                        np.array([-1], np.int64)), axis=0).numpy()
  gathered = strategy.gather(per_replica(words, np.zeros([1], np.int32)), axis=0).numpy()
  values, start = [], 0
  for length in lengths:
    count = 1 if length < 0 else (int(length) + 3) // 4
    if length >= 0:
      values.append(pickle.loads(gathered[start:start + count].tobytes()[:length]))
    start += count
  return values
