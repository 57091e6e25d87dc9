"""Parallel, resumable, atomic writing of sharded TFRecords.

    write_shards(output_dir, 'train', jobs, work_fn, num_shards=10, num_workers=2)

`jobs` are picklable descriptions of examples, in output order; `work_fn(job)` (a module-level
function, run in worker processes) returns the serialized record, or raises. Shard `s` of `n`
holds jobs `[s * len(jobs) // n, (s + 1) * len(jobs) // n)` and is named like DeepLab2's
`{split}-%05d-of-%05d.tfrecord`.

Atomic: a shard is written under `<name>.tmp` and renamed when all of its records are in, so a
file with the final name is always complete. Resumable: a run skips shards whose final file
exists (their jobs are not even computed) and removes leftover `.tmp` files. A small state file
(`.{split}.conversion.json`) records what the shards were made from; a later run with other
inputs or settings refuses to mix its shards with the old ones.
"""

import dataclasses
import glob
import json
import multiprocessing
import os
import sys
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


def _run_job(work_fn, job):
  try:
    return work_fn(job)
  except Exception as error:  # pylint: disable=broad-except
    return _WorkerFailure(error)


class _Runner:
  """Picklable wrapper: calls work_fn and returns exceptions as _WorkerFailure."""

  def __init__(self, work_fn):
    self.work_fn = work_fn

  def __call__(self, job):
    return _run_job(self.work_fn, job)


def _state_path(output_dir: str, split: str) -> str:
  return os.path.join(output_dir, f'.{split}.conversion.json')


def _check_state(output_dir: str, split: str, state: dict) -> None:
  path = _state_path(output_dir, split)
  existing = glob.glob(os.path.join(output_dir, f'{split}-?????-of-?????.tfrecord'))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != state:
      changed = sorted(k for k in set(old) | set(state) if old.get(k) != state.get(k))
      raise ShardStateError(
          f'{output_dir} already holds "{split}" shards made from other inputs or settings '
          f'(changed: {", ".join(changed)}); delete them (or use overwrite / a new '
          'output folder) before converting again')
  elif existing:
    raise ShardStateError(
        f'{output_dir} holds "{split}" shards that this converter did not write '
        f'({os.path.basename(sorted(existing)[0])}); delete them or use a new output folder')
  with open(path + '.tmp', 'w') as f:
    json.dump(state, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


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
    num_workers: Processes computing records; 1 computes them in this process.
    state: JSON-able description of the inputs and settings; shards of a run with a different
      state are never mixed with these.
    overwrite: Delete existing shards of this split first.
    show_progress: Print a progress line with rate and ETA to stderr.
    label: Progress label (default: the split).

  Returns:
    A WriteResult.

  Raises:
    The first exception raised by work_fn (the shard being written is removed), or
    ShardStateError.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  os.makedirs(output_dir, exist_ok=True)
  num_shards = max(1, num_shards)
  if overwrite:
    for path in glob.glob(os.path.join(output_dir, f'{split}-?????-of-?????.tfrecord*')):
      os.remove(path)
    if os.path.exists(_state_path(output_dir, split)):
      os.remove(_state_path(output_dir, split))
  full_state = dict(state or {})
  full_state.update(num_examples=len(jobs), num_shards=num_shards)
  full_state = json.loads(json.dumps(full_state, sort_keys=True))   # as read back from disk
  _check_state(output_dir, split, full_state)
  for path in glob.glob(os.path.join(output_dir, f'{split}-?????-of-?????.tfrecord.tmp')):
    os.remove(path)   # left by an interrupted run

  paths = [os.path.join(output_dir, shard_name(split, s, num_shards)) for s in range(num_shards)]
  bounds = shard_bounds(len(jobs), num_shards)
  todo = [s for s in range(num_shards) if not os.path.exists(paths[s])]
  todo_jobs = [jobs[i] for s in todo for i in range(*bounds[s])]
  progress = Progress(len(todo_jobs), label=label or split, unit='images',
                      stream=sys.stderr if show_progress else open(os.devnull, 'w'))
  pool = None
  if num_workers > 1 and len(todo_jobs) > 1:
    # "spawn": workers start without the parent's TensorFlow state (fork + TF is unsafe).
    pool = multiprocessing.get_context('spawn').Pool(min(num_workers, len(todo_jobs)))
    results = pool.imap(_Runner(work_fn), todo_jobs, chunksize=4)
  else:
    results = map(_Runner(work_fn), todo_jobs)
  writer, tmp = None, None
  written = 0
  try:
    for shard in todo:
      start, end = bounds[shard]
      tmp = paths[shard] + '.tmp'
      writer = tf.io.TFRecordWriter(tmp)
      for _ in range(start, end):
        record = next(results)
        if isinstance(record, _WorkerFailure):
          raise record.error
        writer.write(record)
        progress.update(1)
      writer.close()
      writer = None
      os.replace(tmp, paths[shard])
      written += 1
  finally:
    if writer is not None:
      writer.close()
      if os.path.exists(tmp):
        os.remove(tmp)
    if pool is not None:
      pool.terminate()
      pool.join()
  if todo_jobs:
    progress.close()
  return WriteResult(split=split, num_examples=len(jobs), num_shards=num_shards,
                     shards_written=written, shards_skipped=num_shards - len(todo),
                     files=paths)
