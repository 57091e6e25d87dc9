"""absl's app.run for the command-line tools, with a --help that helps.

    if __name__ == '__main__':
      define_flags()
      command_line.run(main)

absl's --help lists only the flags the main module defines itself and exits with status 1.
Here --help (-?, --helpshort) lists every flag a deeplab2_kmax module defined for the tool, so
the shared --config_file / --config_override (config/flags.py) and the flags of a tool whose
main module only delegates (export/__main__.py -> export/cli.py) appear with the tool's own;
it and --helpfull exit 0. Help wins over any other argument, as in most command lines.
"""

import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags

_PACKAGE = __name__.split('.', maxsplit=1)[0]
_SHORT_HELP = ('--help', '-help', '-?', '--helpshort', '-helpshort')
_FULL_HELP = ('--helpfull', '-helpfull')


def _help_requested(argv: Sequence[str]) -> Optional[str]:
  """'short', 'full' or None: which help the arguments (before a '--') ask for."""
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg in _FULL_HELP:
      return 'full'
    if arg in _SHORT_HELP:
      return 'short'
  return None


def _is_package_module(module_name: str) -> bool:
  # Imported modules are registered by dotted name, the main module by its file path.
  return module_name == _PACKAGE or module_name.startswith(_PACKAGE + '.')


def adopt_package_flags(flag_values: flags.FlagValues = flags.FLAGS,
                        main_module: Optional[str] = None) -> None:
  """Makes every flag defined by a deeplab2_kmax module a key flag of the main module (the
  flags absl's --help lists)."""
  main_module = main_module or sys.argv[0]
  for module_name, module_flags in flag_values.flags_by_module_dict().items():
    if module_name != main_module and _is_package_module(module_name):
      for flag in module_flags:
        flag_values.register_key_flag_for_module(main_module, flag)


def _parse_flags(argv: Sequence[str]):
  adopt_package_flags()
  kind = _help_requested(argv)
  if kind is not None:
    app.usage(shorthelp=kind == 'short', writeto_stdout=True)
    if kind == 'short':
      print('\nTry --helpfull to get a list of all flags.')
    sys.exit(0)
  return app.parse_flags_with_usage(argv)


def run(main: Callable, argv: Optional[Sequence[str]] = None) -> None:
  """app.run(main) with the --help of the module docstring."""
  app.run(main, argv=argv, flags_parser=_parse_flags)
