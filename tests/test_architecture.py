"""The layers of docs/architecture.md hold: no module imports a module of a higher layer (or of
another subpackage of its own layer), and no modules import each other in a circle.

Every import counts, including those inside functions (a function-level import dodges an import
circle at run time but not the layering). The layer table is read from docs/architecture.md,
so the document is the specification this test enforces.
"""

import ast
import pathlib
import re
from typing import Mapping, Sequence

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = 'deeplab2_kmax'
ARCHITECTURE_DOC = REPO_ROOT / 'docs' / 'architecture.md'
# A row of the layer table: | <number> | <name> | `module`, `module`, ... |
_LAYER_ROW = re.compile(r'^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*(`[^|]+`)\s*\|')


def read_layers(text: str) -> list[tuple[str, tuple[str, ...]]]:
  """[(layer name, (module prefix, ...))] from the layer table, bottom layer first.

  Module prefixes are relative to the package (`data`, `model.summary`); `__init__` is the
  package's own __init__.py.
  """
  rows = []
  for line in text.splitlines():
    match = _LAYER_ROW.match(line)
    if match:
      rows.append((int(match.group(1)), match.group(2),
                   tuple(re.findall(r'`([\w.]+)`', match.group(3)))))
  rows.sort()
  return [(name, prefixes) for _, name, prefixes in rows]


def module_sources(root: pathlib.Path) -> dict[str, str]:
  """{dotted module name: source} of every module of the package (generated *_pb2 aside)."""
  sources = {}
  for path in sorted((root / PACKAGE).rglob('*.py')):
    if path.name.endswith('_pb2.py'):
      continue
    parts = path.relative_to(root).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    sources['.'.join(parts)] = path.read_text(encoding='utf-8')
  return sources


def imported_modules(name: str, source: str, modules: Sequence[str]) -> list[tuple[str, int]]:
  """(package module, line) of every import in `source`, at any depth (functions included).

  `from a.b import c` names module a.b.c when that is a module, else the package a.b.
  """
  is_package = any(other.startswith(name + '.') for other in modules)
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: resolved against this module's package.
        anchor = name.split('.') if is_package else name.split('.')[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      if target == PACKAGE or target.startswith(PACKAGE + '.'):
        while target not in modules and '.' in target:
          target = target.rsplit('.', 1)[0]
        found.append((target, node.lineno))
  return found


def _owner(module: str, layers) -> tuple[int, str]:
  """(layer index, table entry) of a module: the longest entry that is it or a package of it."""
  relative = module[len(PACKAGE) + 1:] if module != PACKAGE else '__init__'
  best = None
  for index, (_, prefixes) in enumerate(layers):
    for prefix in prefixes:
      if relative == prefix or relative.startswith(prefix + '.'):
        if best is None or len(prefix) > len(best[1]):
          best = (index, prefix)
  if best is None:
    raise LookupError(module)
  return best


def _circles(graph: Mapping[str, set]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, result = {}, {}, set(), [], []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in graph.get(node, ()):
      if successor not in index:
        visit(successor)
        low[node] = min(low[node], low[successor])
      elif successor in on_stack:
        low[node] = min(low[node], index[successor])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        result.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return result


def find_violations(sources: Mapping[str, str], layers) -> list[str]:
  """Every import that points up the layers or sideways into another subpackage of the same
  layer, every module no layer owns, and every import circle; one line each."""
  modules = sorted(sources)
  problems = []
  graph = {}
  for module in modules:
    try:
      layer, entry = _owner(module, layers)
    except LookupError:
      problems.append(f'{module}: no layer of docs/architecture.md holds it; add it to the '
                      'layer table')
      continue
    graph[module] = set()
    for target, line in imported_modules(module, sources[module], modules):
      if target == module:
        continue
      graph[module].add(target)
      try:
        target_layer, target_entry = _owner(target, layers)
      except LookupError:
        continue  # Reported as a module without a layer.
      if target_entry == entry or target_layer < layer:
        continue
      direction = 'up' if target_layer > layer else 'sideways'
      problems.append(
          f'{module}:{line} imports {target}, which points {direction} the layers (layer '
          f'"{layers[layer][0]}" may import only its own `{entry}` and the layers below it; '
          f'{target} is in layer "{layers[target_layer][0]}")')
  for circle in _circles(graph):
    problems.append(f'import circle: {" -> ".join(circle)} import each other; move what they '
                    'share into a module both can import')
  return problems


LAYERS = read_layers(ARCHITECTURE_DOC.read_text(encoding='utf-8'))


def test_the_layer_table_is_read_and_names_existing_modules():
  assert len(LAYERS) >= 5, 'docs/architecture.md has no layer table'
  modules = module_sources(REPO_ROOT)
  for name, prefixes in LAYERS:
    for prefix in prefixes:
      module = PACKAGE if prefix == '__init__' else f'{PACKAGE}.{prefix}'
      assert any(m == module or m.startswith(module + '.') for m in modules), (
          f'docs/architecture.md, layer "{name}": `{prefix}` is no module of {PACKAGE}')


def test_no_import_points_up_the_layers_or_forms_a_circle():
  problems = find_violations(module_sources(REPO_ROOT), LAYERS)
  assert not problems, '\n'.join(problems)


_TOY_LAYERS = [('foundation', ('common',)), ('data', ('data',)), ('model', ('model',)),
               ('top', ('trainer', 'export'))]


@pytest.mark.parametrize('sources, expected', [
    # An upward import at module level.
    ({'deeplab2_kmax.data.pipeline': 'from deeplab2_kmax.model import builder\n',
      'deeplab2_kmax.model.builder': 'from deeplab2_kmax import common\n',
      'deeplab2_kmax.common': ''},
     ['deeplab2_kmax.data.pipeline:1 imports deeplab2_kmax.model.builder, which points up']),
    # The same inside a function, and as a plain `import`.
    ({'deeplab2_kmax.data.pipeline': 'def f():\n  import deeplab2_kmax.trainer.runner\n',
      'deeplab2_kmax.trainer.runner': ''},
     ['deeplab2_kmax.data.pipeline:2 imports deeplab2_kmax.trainer.runner, which points up']),
    # Sideways: another subpackage of the same layer.
    ({'deeplab2_kmax.export.cli': 'from deeplab2_kmax.trainer import runner\n',
      'deeplab2_kmax.trainer.runner': ''},
     ['deeplab2_kmax.export.cli:1 imports deeplab2_kmax.trainer.runner, which points '
      'sideways']),
    # A circle inside one layer, hidden by a function-level import.
    ({'deeplab2_kmax.model.a': 'from deeplab2_kmax.model import b\n',
      'deeplab2_kmax.model.b': 'def f():\n  from deeplab2_kmax.model import a\n'},
     ['import circle: deeplab2_kmax.model.a -> deeplab2_kmax.model.b']),
    # A module that no layer holds.
    ({'deeplab2_kmax.stray': ''}, ['deeplab2_kmax.stray: no layer']),
])
def test_the_checker_reports_planted_violations(sources, expected):
  problems = find_violations(sources, _TOY_LAYERS)
  assert len(problems) == len(expected), problems
  for problem, start in zip(problems, expected):
    assert problem.startswith(start), problems


def test_the_checker_allows_downward_and_own_package_imports():
  sources = {'deeplab2_kmax.trainer.runner': ('from deeplab2_kmax.model import builder\n'
                                              'from deeplab2_kmax.trainer import loop\n'),
             'deeplab2_kmax.trainer.loop': 'from deeplab2_kmax import common\n',
             'deeplab2_kmax.model.builder': 'from deeplab2_kmax.data import datasets\n',
             'deeplab2_kmax.data.datasets': '', 'deeplab2_kmax.common': ''}
  assert not find_violations(sources, _TOY_LAYERS)
