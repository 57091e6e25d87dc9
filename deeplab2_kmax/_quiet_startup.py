"""Quiet TensorFlow start-up for the command-line tools (`python -m deeplab2_kmax.<tool>`).

TensorFlow's C++ runtime logs its start-up to stderr (CUDA probing: "failed call to cuInit",
"Could not find cuda drivers"; oneDNN and CPU-feature notices), a dozen lines that bury a
tool's own one-line messages. The variable TF_CPP_MIN_LOG_LEVEL silences them, but only when
it is set before TensorFlow is first imported; deeplab2_kmax/__init__.py imports this module
first, so it is set before any tool's imports run.

Only a process started as `python -m deeplab2_kmax.<tool>` is quietened (level 3, as
scripts/demo.sh): importing the library from a program of one's own leaves TensorFlow's
logging as that program configured it. A TF_CPP_MIN_LOG_LEVEL already set is kept, and
DEEPLAB2_KMAX_VERBOSE_TF=1 leaves TensorFlow's default logging on.
"""

import os
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

VERBOSE_ENV = 'DEEPLAB2_KMAX_VERBOSE_TF'
TF_LOG_LEVEL_ENV = 'TF_CPP_MIN_LOG_LEVEL'
QUIET_LEVEL = '3'   # Also hides C++ errors such as the CUDA probing's "failed call to cuInit".
_PACKAGE = __name__.split('.', maxsplit=1)[0]
# Interpreter options that take a separate value (`python -X dev -m ...`).
_OPTIONS_WITH_VALUE = ('-X', '-W', '--check-hash-based-pycs')


def started_as_tool(argv: Optional[Sequence[str]] = None) -> bool:
  """Whether the interpreter's command line (sys.orig_argv) is `python [options] -m
  deeplab2_kmax[.<module>] ...`."""
  argv = list(sys.orig_argv if argv is None else argv)
  index = 1
  while index < len(argv):
    arg = argv[index]
    if arg == '-m' or (arg.startswith('-m') and not arg.startswith('--')):
      module = argv[index + 1] if arg == '-m' and index + 1 < len(argv) else arg[2:]
      return module == _PACKAGE or module.startswith(_PACKAGE + '.')
    if not arg.startswith('-') or arg in ('-c', '-'):
      return False   # A script, a -c command or stdin runs instead of a module.
    index += 2 if arg in _OPTIONS_WITH_VALUE else 1
  return False


def wants_verbose_tensorflow(environ: Mapping[str, str]) -> bool:
  return environ.get(VERBOSE_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def quiet_tensorflow_startup(environ: Optional[MutableMapping[str, str]] = None,
                             argv: Optional[Sequence[str]] = None) -> None:
  """Sets TF_CPP_MIN_LOG_LEVEL=3 for a tool, unless set already or verbose TF is asked for."""
  environ = os.environ if environ is None else environ
  if started_as_tool(argv) and not wants_verbose_tensorflow(environ):
    environ.setdefault(TF_LOG_LEVEL_ENV, QUIET_LEVEL)


quiet_tensorflow_startup()
