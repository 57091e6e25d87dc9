"""Checks a run's --model_dir before anything is built (no TensorFlow import here)."""

import os
from typing import Optional

TRAINING_MODES = ('train', 'train_and_eval')


def model_dir_problem(model_dir: str, mode: str) -> Optional[str]:
  """Why `model_dir` cannot serve `mode`, or None. Training creates it; a folder that exists
  must take a file (probed by writing one: permission bits do not bind root). Remote paths
  (gs://...) are left to TensorFlow."""
  if '://' in model_dir:
    return None
  flag = f'--model_dir={model_dir}'
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    return f'{flag} is a file, not a directory; give a directory (it is created if missing).'
  if not os.path.exists(model_dir):
    if mode not in TRAINING_MODES:
      return None  # Evaluation says there is no checkpoint, or waits for one.
    try:
      os.makedirs(model_dir)
    except OSError as error:
      return f'{flag}: cannot create the directory ({error.strerror}: {error.filename}).'
  probe = os.path.join(model_dir, f'.write_probe_{os.getpid()}')
  try:
    with open(probe, 'w') as f:
      f.write('')
    os.remove(probe)
  except OSError as error:
    return (f'{flag} is not writable ({error.strerror}); checkpoints, summaries and eval '
            f'results go there: give a directory you can write to.')
  return None
