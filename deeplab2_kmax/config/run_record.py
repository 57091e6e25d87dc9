"""What produced a run: the effective config and the command line, written next to its outputs.

    changed = write_run_record('runs/x', config, ['python', '-m', 'deeplab2_kmax.train', ...])

writes (local paths or any tf.io.gfile filesystem)

  <directory>/experiment.textproto  the effective ExperimentOptions (after ${VAR}s and
                                    overrides), as `python -m deeplab2_kmax.config` prints it;
  <directory>/command_line.txt      per start, a `# <UTC time>` line and the shell-quoted
                                    argv (an argument with line breaks, e.g. an override,
                                    spans lines inside its quotes).

A directory that already holds a different experiment.textproto (a resumed run whose config
changed) keeps the old one as `experiment.<UTC time it was replaced>.textproto` and the return
value describes the change, so the caller can warn. command_line.txt is appended to, so every
start stays listed. Only protobuf, TensorFlow's gfile and the standard library are used, so
train, export and the config CLI can all import it.
"""

import datetime
import difflib
import os
import shlex
from typing import Optional, Sequence

from google.protobuf import text_format

CONFIG_FILE = 'experiment.textproto'
COMMAND_LINE_FILE = 'command_line.txt'
# Changed lines quoted in the description of a config change.
MAX_QUOTED_CHANGES = 3


def render_config(config) -> str:
  """The config as textproto, with a header naming its message type."""
  return ('# proto-file: protos/config.proto\n# proto-message: ExperimentOptions\n'
          '# The effective config of this run (after ${VAR} substitution and overrides).\n'
          + text_format.MessageToString(config))


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _read(path: str) -> Optional[str]:
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path, 'r') as f:
    return f.read()


def _write(path: str, text: str) -> None:
  gfile = _gfile()
  with gfile.GFile(path + '.tmp', 'w') as f:
    f.write(text)
  gfile.rename(path + '.tmp', path, overwrite=True)


def describe_change(old: str, new: str) -> str:
  """'N lines changed: -old line, +new line, ...' (at most MAX_QUOTED_CHANGES quoted)."""
  changed = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(),
                                                   lineterm='', n=0)
             if line[:1] in ('+', '-') and not line.startswith(('+++', '---'))]
  quoted = ', '.join(line[0] + ' '.join(line[1:].split())
                     for line in changed[:MAX_QUOTED_CHANGES])
  more = f', ... ({len(changed)} lines in all)' if len(changed) > MAX_QUOTED_CHANGES else ''
  return f'{quoted}{more}'


def write_run_record(directory: str, config, argv: Sequence[str],
                     now: Optional[datetime.datetime] = None) -> Optional[str]:
  """Writes <directory>/experiment.textproto and appends argv to <directory>/command_line.txt.

  Args:
    directory: run folder (created if missing): a model_dir, an export's assets.extra, ...
    config: the effective ExperimentOptions.
    argv: the command line, e.g. ['python', '-m', 'deeplab2_kmax.train', '--model_dir=x'].
    now: the time recorded (default: now, UTC).

  Returns:
    None when the directory held no config or the same one; otherwise a sentence naming the
    kept previous file and the first changed lines, for the caller to warn with.
  """
  now = now or datetime.datetime.now(datetime.timezone.utc)
  stamp = now.strftime('%Y%m%dT%H%M%SZ')
  gfile = _gfile()
  gfile.makedirs(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  text = render_config(config)
  previous = _read(config_path)
  change = None
  if previous is not None and previous != text:
    kept = os.path.join(directory, f'experiment.{stamp}.textproto')
    gfile.rename(config_path, kept, overwrite=True)
    change = (f'the effective config differs from the one of the previous start in '
              f'{directory} (kept as {kept}): {describe_change(previous, text)}')
  if previous != text:
    _write(config_path, text)
  command_path = os.path.join(directory, COMMAND_LINE_FILE)
  history = _read(command_path) or ''
  # Rewritten whole: not every gfile filesystem (GCS) can append.
  _write(command_path, f'{history}# {now.isoformat(timespec="seconds")}\n{shlex.join(argv)}\n')
  return change
