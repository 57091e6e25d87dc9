"""The command-line tools' start-up and help (issue 18): TensorFlow's C++ start-up logs are
silenced unless asked for, --help exits 0 and lists the shared config flags, and every config
path or tool a help text or document names exists."""

import itertools
import json
import os
import re
import subprocess
import sys

import pytest

from deeplab2_kmax import _quiet_startup
from tests.conftest import REPO_ROOT

# Every `python -m` tool, and whether it takes --config_file / --config_override.
ABSL_TOOLS = {
    'deeplab2_kmax.train': True, 'deeplab2_kmax.export': True, 'deeplab2_kmax.predict': True,
    'deeplab2_kmax.config': True, 'deeplab2_kmax.model.summary': True,
    'deeplab2_kmax.demo': False, 'deeplab2_kmax.data.build.validate': False,
    'deeplab2_kmax.data.build.synthetic': False, 'deeplab2_kmax.data.build.coco': False,
    'deeplab2_kmax.data.build.cityscapes': False,
    'deeplab2_kmax.data.build.ade20k': False,
    'deeplab2_kmax.data.build.coco_format': False,
    'deeplab2_kmax.evaluation.coco_panoptic': False,
    'deeplab2_kmax.evaluation.cityscapes_panoptic': False,
}

# Runs each tool's `--help` in ONE interpreter (TensorFlow is imported once): the tool runs as
# `python -m` would run it (runpy, argv[0] = its file), then the flags it defined are deleted so
# that the next tool can define its own.
_HELP_LOOP = r'''
import contextlib, io, json, runpy, sys
from absl import flags
results = {}
for module, argv in json.loads(sys.argv[1]):
  before = set(flags.FLAGS)
  sys.argv = [module] + argv
  out = io.StringIO()
  code = None
  with contextlib.redirect_stdout(out):
    try:
      runpy.run_module(module, run_name='__main__', alter_sys=True)
    except SystemExit as error:
      code = error.code
  results[module + ' ' + ' '.join(argv)] = [code, out.getvalue()]
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
print(json.dumps(results))
'''


def _env(**extra):
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
              **extra)


def test_hostile_every_tool_help_exits_0_and_lists_the_config_flags():
  runs = [[module, ['--help']] for module in ABSL_TOOLS]
  runs += [['deeplab2_kmax.config', ['--helpfull']],
           ['deeplab2_kmax.model_zoo', ['--help']],
           ['deeplab2_kmax.model_zoo', ['convert', '--help']]]
  result = subprocess.run([sys.executable, '-c', _HELP_LOOP, json.dumps(runs)], cwd=REPO_ROOT,
                          env=_env(TF_CPP_MIN_LOG_LEVEL='3'), capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  helps = json.loads(result.stdout.strip().splitlines()[-1])
  for (module, argv), (code, text) in zip(runs, helps.values()):
    what = f'{module} {" ".join(argv)}'
    assert code == 0, f'{what} exited {code}: {text[-500:]}'
    assert '--' in text and len(text.splitlines()) > 5, what
    takes_config = ABSL_TOOLS.get(module) or argv == ['convert', '--help']
    if takes_config:
      assert '--config_file' in text and ('--config_override' in text
                                          or module == 'deeplab2_kmax.model_zoo'), what
  # The export's flags are defined by export/cli.py, behind export/__main__.py.
  assert '--checkpoint_path' in helps['deeplab2_kmax.export --help'][1]


def test_hostile_tools_silence_tensorflow_start_up_unless_asked():
  # The config tool prints the effective config: an override copying the variable into
  # experiment_name shows the value the tool's process has after start-up, i.e. before any of
  # its imports (TensorFlow reads it at its own import).
  config = REPO_ROOT / 'configs' / 'synthetic' / 'kmax_r50_os32_synthetic.textproto'
  override = 'experiment_name: "level ${TF_CPP_MIN_LOG_LEVEL:-unset}"'

  def seen_level(**env):
    base = {k: v for k, v in _env(SYNTHETIC_DATA_DIR='/data').items()
            if k not in ('TF_CPP_MIN_LOG_LEVEL', _quiet_startup.VERBOSE_ENV)}
    result = subprocess.run(
        [sys.executable, '-m', 'deeplab2_kmax.config', f'--config_file={config}',
         f'--config_override={override}'],
        cwd=REPO_ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120,
        check=False)
    found = re.search(r'experiment_name: "level (\w+)"', result.stdout)
    assert result.returncode == 0 and found, result.stderr
    return found.group(1)

  assert seen_level() == '3'                                        # quiet by default
  assert seen_level(TF_CPP_MIN_LOG_LEVEL='1') == '1'                # the user's level is kept
  assert seen_level(DEEPLAB2_KMAX_VERBOSE_TF='1') == 'unset'        # TF's own logging back
  # Importing the library from one's own program changes nothing.
  assert not _quiet_startup.started_as_tool(['python', 'my_script.py', '-m', 'deeplab2_kmax'])
  assert not _quiet_startup.started_as_tool(['python', '-m', 'pytest', 'deeplab2_kmax'])
  assert _quiet_startup.started_as_tool(['python3', '-X', 'dev', '-m', 'deeplab2_kmax.train'])


_DOCUMENTS = ([REPO_ROOT / 'README.md', REPO_ROOT / 'WORKSPACE.md',
               REPO_ROOT / 'model_zoo' / 'README.md']
              + sorted((REPO_ROOT / 'docs').glob('*.md'))
              + sorted((REPO_ROOT / 'deeplab2_kmax').rglob('*.py'))   # help texts, docstrings
              + sorted((REPO_ROOT / 'configs').rglob('*.textproto'))
              + sorted((REPO_ROOT / 'scripts').glob('*.sh')))
_CONFIG_PATH = re.compile(r'configs/[\w./{},*<>$-]+?\.textproto')
_TOOL = re.compile(r'python -m (deeplab2_kmax(?:\.\w+)*)(?!\.<)')  # not the .<tool> template


def _expand_braces(path: str) -> list:
  """configs/a/{b,c}_d.textproto -> [configs/a/b_d.textproto, configs/a/c_d.textproto]."""
  parts = re.split(r'\{([^{}]*)\}', path)
  choices = [[part] if index % 2 == 0 else part.split(',') for index, part in enumerate(parts)]
  return [''.join(combination) for combination in itertools.product(*choices)]


def test_hostile_every_config_and_tool_named_in_a_document_or_help_exists():
  missing = []
  for document in _DOCUMENTS:
    text = document.read_text(encoding='utf-8')
    for path in set(_CONFIG_PATH.findall(text)):
      if any(mark in path for mark in '*<$'):
        continue   # a pattern or placeholder, not a file
      missing += [f'{document.relative_to(REPO_ROOT)}: {expanded}'
                  for expanded in _expand_braces(path) if not (REPO_ROOT / expanded).is_file()]
    for module in set(_TOOL.findall(text)):
      base = REPO_ROOT / module.replace('.', '/')
      if not (base.with_suffix('.py').is_file() or (base / '__main__.py').is_file()):
        missing.append(f'{document.relative_to(REPO_ROOT)}: python -m {module}')
  assert not missing, missing
