"""Parallel, resumable, atomic writing of sharded TFRecords.

    write_shards(output_dir, 'train', jobs, work_fn, num_shards=10, num_workers=2)

`jobs` are picklable descriptions of examples, in output order; `work_fn(job)` (a module-level
function, or a functools.partial of one) returns the serialized record, or raises. With
several workers, each worker process writes whole shards, so records never cross process
boundaries; progress ticks come back through a queue. Shard `s` of `n`
holds jobs `[s * len(jobs) // n, (s + 1) * len(jobs) // n)` and is named like DeepLab2's
`{split}-%05d-of-%05d.tfrecord`.

Atomic: a shard is written under `<name>.tmp` and renamed when all of its records are in, so a
file with the final name is always complete. Resumable: a run skips shards whose final file
exists and was made from the same inputs (their jobs are not even computed), writes again a
shard whose inputs changed, and removes leftover `.tmp` files. A small state file
(`.{split}.conversion.json`) records the settings and a fingerprint of each shard's inputs; a
run with other settings refuses to mix its shards with the old ones.
"""

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from deeplab2_kmax.progress import Progress


class ShardStateError(RuntimeError):
  """The output folder holds shards of a different conversion."""


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f'{split}-{shard:05d}-of-{num_shards:05d}.tfrecord'


def shard_bounds(num_jobs: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, end) job indices of each shard (sizes differ by at most one)."""
  return [(s * num_jobs // num_shards, (s + 1) * num_jobs // num_shards)
          for s in range(num_shards)]


@dataclasses.dataclass
class WriteResult:
  split: str
  num_examples: int
  num_shards: int
  shards_written: int
  shards_skipped: int
  files: list[str]


class _WorkerFailure:
  """A worker's exception, carried back as a value so the main process can stop cleanly."""

  def __init__(self, error: BaseException):
    self.error = error


# Per-process progress hook: a queue in worker processes, a callback in the main process.
_progress_queue = None


def _init_worker(queue) -> None:
  global _progress_queue
  _progress_queue = queue


def _write_shard(work_fn, path: str, jobs: Sequence[Any], tick=None):
  """Writes one shard as <path>.tmp and renames it when complete; returns path or
  _WorkerFailure (the .tmp file is then removed)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tmp = path + '.tmp'
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for job in jobs:
        writer.write(work_fn(job))
        if tick is not None:
          tick()
        elif _progress_queue is not None:
          _progress_queue.put(1)
  except Exception as error:  # pylint: disable=broad-except
    if os.path.exists(tmp):
      os.remove(tmp)
    return _WorkerFailure(error)
  os.replace(tmp, path)
  return path


def _state_path(output_dir: str, split: str) -> str:
  return os.path.join(output_dir, f'.{split}.conversion.json')


def shard_fingerprint(jobs: Sequence[Any]) -> str:
  """Identifies a shard's inputs (the jobs' reprs: dataclasses of paths, ids and numbers)."""
  digest = hashlib.sha256()
  for job in jobs:
    digest.update(repr(job).encode('utf-8'))
  return digest.hexdigest()[:16]


def _plan(output_dir: str, split: str, settings: dict, fingerprints: list[str],
          paths: list[str]) -> list[int]:
  """Shards to write. Shards of other settings are refused; a complete shard whose inputs
  changed is deleted and written again. Records the new state before any writing."""
  path = _state_path(output_dir, split)
  existing = [p for p in glob.glob(os.path.join(output_dir, f'{split}-?????-of-?????.tfrecord'))]
  old_fingerprints = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    old_settings = old.get('settings', {})
    if existing and old_settings != settings:
      changed = sorted(k for k in set(old_settings) | set(settings)
                       if old_settings.get(k) != settings.get(k))
      raise ShardStateError(
          f'{output_dir} already holds "{split}" shards made with other settings (changed: '
          f'{", ".join(changed)}); pass --overwrite or use a new output folder')
    if old_settings == settings:
      old_fingerprints = old.get('shards', [])
  elif existing:
    raise ShardStateError(
        f'{output_dir} holds "{split}" shards that this converter did not write '
        f'({os.path.basename(sorted(existing)[0])}); delete them or use a new output folder')
  todo = []
  for shard, shard_path in enumerate(paths):
    known = shard < len(old_fingerprints) and old_fingerprints[shard] == fingerprints[shard]
    if not (known and os.path.exists(shard_path)):
      todo.append(shard)
      if os.path.exists(shard_path):
        os.remove(shard_path)   # its inputs changed
  with open(path + '.tmp', 'w') as f:
    json.dump({'settings': settings, 'shards': fingerprints}, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)
  return todo


def _write_in_workers(tasks, num_workers: int, progress: Progress) -> None:
  """Each worker process writes whole shards (records never cross process boundaries)."""
  # "spawn": workers start without the parent's TensorFlow state (fork + TF is unsafe).
  context = multiprocessing.get_context('spawn')
  queue = context.SimpleQueue()
  pool = context.Pool(num_workers, initializer=_init_worker, initargs=(queue,))
  try:
    pending = [pool.apply_async(_write_shard, task) for task in tasks]
    while pending:
      while not queue.empty():
        progress.update(queue.get())
      for result in [r for r in pending if r.ready()]:
        pending.remove(result)
        value = result.get()
        if isinstance(value, _WorkerFailure):
          raise value.error
      time.sleep(0.05)
    while not queue.empty():
      progress.update(queue.get())
  finally:
    pool.terminate()
    pool.join()
    for _, path, _ in tasks:   # shards interrupted by a failure elsewhere
      if os.path.exists(path + '.tmp'):
        os.remove(path + '.tmp')


def write_shards(output_dir: str, split: str, jobs: Sequence[Any],
                 work_fn: Callable[[Any], bytes], num_shards: int, num_workers: int = 1,
                 state: Optional[dict] = None, overwrite: bool = False,
                 show_progress: bool = True, label: str = '') -> WriteResult:
  """Writes `jobs` as `num_shards` shards (see the module docstring).

  Args:
    output_dir: Folder of the shards (created).
    split: Shard-name prefix, e.g. "train".
    jobs: Picklable job descriptions, in output order.
    work_fn: Module-level function job -> serialized record (run in workers when
      num_workers > 1, so it must be importable without side effects).
    num_shards: Number of shards (at most len(jobs) unless jobs is empty).
    num_workers: Processes, each writing whole shards; 1 writes them in this process.
    state: JSON-able settings (e.g. the label mapping); shards made with other settings are
      never mixed with these.
    overwrite: Delete existing shards of this split first.
    show_progress: Print a progress line with rate and ETA to stderr.
    label: Progress label (default: the split).

  Returns:
    A WriteResult.

  Raises:
    The first exception raised by work_fn (the shard being written is removed), or
    ShardStateError.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,unused-import
  # (imported before the progress clock starts: it takes seconds)
  os.makedirs(output_dir, exist_ok=True)
  num_shards = max(1, num_shards)
  if overwrite:
    for path in glob.glob(os.path.join(output_dir, f'{split}-?????-of-?????.tfrecord*')):
      os.remove(path)
    if os.path.exists(_state_path(output_dir, split)):
      os.remove(_state_path(output_dir, split))
  settings = dict(state or {})
  settings.update(num_examples=len(jobs), num_shards=num_shards)
  settings = json.loads(json.dumps(settings, sort_keys=True))   # as read back from disk
  for path in glob.glob(os.path.join(output_dir, f'{split}-?????-of-?????.tfrecord.tmp')):
    os.remove(path)   # left by an interrupted run
  paths = [os.path.join(output_dir, shard_name(split, s, num_shards)) for s in range(num_shards)]
  bounds = shard_bounds(len(jobs), num_shards)
  fingerprints = [shard_fingerprint(jobs[start:end]) for start, end in bounds]
  todo = _plan(output_dir, split, settings, fingerprints, paths)
  todo_jobs = [jobs[i] for s in todo for i in range(*bounds[s])]
  progress = Progress(len(todo_jobs), label=label or split, unit='images',
                      stream=sys.stderr if show_progress else open(os.devnull, 'w'))
  tasks = [(work_fn, paths[s], [jobs[i] for i in range(*bounds[s])]) for s in todo]
  num_workers = min(num_workers, len(tasks))
  if num_workers > 1:
    _write_in_workers(tasks, num_workers, progress)
  else:
    for task in tasks:
      result = _write_shard(*task, tick=lambda: progress.update(1))
      if isinstance(result, _WorkerFailure):
        raise result.error
  if todo_jobs:
    progress.close()
  return WriteResult(split=split, num_examples=len(jobs), num_shards=num_shards,
                     shards_written=len(todo), shards_skipped=num_shards - len(todo),
                     files=paths)
