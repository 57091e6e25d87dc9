"""The folder a command writes into (train's --model_dir, export's --output_path, predict's
--output_dir), checked before anything slow is built, so that a bad path costs a second and one
line instead of a traceback after the model's build.

    problem = output_folder.problem('--model_dir', path, 'checkpoints, summaries and eval '
                                    'results go there')
    if problem:
      print(f'error: {problem}')

Local paths are checked without TensorFlow (train calls this before importing it): the path or
the first of its parents that exists must be a folder; the folder is created; a file can be
written into it (probed by writing one: permission bits do not bind root). Remote paths
(gs://...) are created with tf.io.gfile and otherwise left to TensorFlow.
"""

import os
from typing import Optional


def problem(flag: str, path: str, purpose: str, create: bool = True) -> Optional[str]:
  """Why `path` cannot be the folder `flag` names, or None; creates it when `create`.

  Args:
    flag: the flag (or field) that named the path, for the message.
    path: the folder.
    purpose: what goes there, said in the message (e.g. 'the version folders go there').
    create: create a missing folder (False: a missing folder is no problem and stays missing,
      e.g. for an evaluation that waits for a training run to create it).
  """
  if '://' in path:
    return _remote_problem(flag, path, create)
  existing = path
  while existing and not os.path.exists(existing):
    parent = os.path.dirname(existing.rstrip(os.sep))
    existing = parent if parent != existing else ''
  if existing and not os.path.isdir(existing):
    if existing == path:
      return f'{flag} {path} is a file, not a folder; give a folder ({purpose}).'
    return (f'{flag} {path} cannot be created: {existing} is a file; give a folder '
            f'({purpose}).')
  if not os.path.isdir(path):
    if not create:
      return None
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as error:
      return f'{flag} {path} cannot be created ({error.strerror}); give a folder ({purpose}).'
  probe = os.path.join(path, f'.write_probe_{os.getpid()}')
  try:
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('')
    os.remove(probe)
  except OSError as error:
    return (f'{flag} {path} is not writable ({error.strerror}); give a folder you can write '
            f'to ({purpose}).')
  return None


def _remote_problem(flag: str, path: str, create: bool) -> Optional[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only remote paths need it)
  if not create:
    return None
  try:
    tf.io.gfile.makedirs(path)
  except (tf.errors.OpError, OSError) as error:
    reason = getattr(error, 'message', None) or str(error)
    return f'{flag} {path} cannot be created ({reason.splitlines()[0]}).'
  return None
