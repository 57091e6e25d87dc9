"""Loads an experiment config: textproto file -> ${ENV} substitution -> strict parse ->
ordered --config_override snippets -> semantic validation.

Every failure raises ConfigError, whose message names the file (or override), the line and
column where there is one, the field, and what would be right. Command-line tools print that
message alone and exit non-zero.

An unset ${VAR} (without a `:-default`) is an error only where the command reads it: a command
that does not read some fields passes them as `unread_fields` (export and predict pass
INFERENCE_UNREAD_FIELDS: the data files and the initial checkpoint), and an unset variable
inside them reads as the placeholder `<unset VAR>`.
"""

import dataclasses
import difflib
import os
import re
from typing import Iterable, Mapping, Optional, Sequence

from google.protobuf import descriptor_pool
from google.protobuf import message as message_lib
from google.protobuf import text_format

from deeplab2_kmax.protos import config_pb2

_ENV_REFERENCE = re.compile(r'\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}')
# Tokens of the text format, enough to follow message nesting (see field_locations).
_TOKEN = re.compile(r'''"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|#[^\n]*|\n|'''
                    r'''[A-Za-z_][A-Za-z0-9_]*|[{}<>:\[\]]|[^\s{}<>:\[\]"'#]+|\s''')


class ConfigError(ValueError):
  """A config cannot be loaded or is invalid; str(error) is the whole user-facing message."""


@dataclasses.dataclass(frozen=True)
class ConfigSource:
  """Text of a config file or override, kept to point errors at lines."""
  name: str   # File path, or "--config_override[i]".
  text: str   # After ${VAR} substitution (line numbers are unchanged by it).

  def locate(self, field_path: str) -> Optional[int]:
    """1-based line where `field_path` (e.g. "a.b.c") is first set in this text, or None."""
    return field_locations(self.text).get(field_path)


def _code_and_comment(line: str) -> tuple[str, str]:
  """Splits a line at the first '#' that is not inside a quoted string."""
  quote = None
  escaped = False
  for i, char in enumerate(line):
    if escaped:
      escaped = False
    elif char == '\\' and quote:
      escaped = True
    elif quote:
      if char == quote:
        quote = None
    elif char in '"\'':
      quote = char
    elif char == '#':
      return line[:i], line[i:]
  return line, ''


# Fields export and predict do not read: the data files, the weights a training run starts
# from and the evaluator's output folder. They do read the model, the eval preprocessing and
# label space, the post-processing (evaluator_options), batch norm settings and export_options.
INFERENCE_UNREAD_FIELDS = ('train_dataset_options', 'eval_dataset_options.file_pattern',
                           'model_options.initial_checkpoint',
                           'model_options.backbone.pretrained_weights',
                           'evaluator_options.override_save_dir')


def placeholder(name: str) -> str:
  """The text an unset ${name} reads as where it may stay unset."""
  return f'<unset {name}>'


class PlaceholderEnvironment(dict):
  """os.environ where an unset ${VAR} without a default reads as the placeholder
  `<unset VAR>`: for tools that build a model from a config and need none of its data or
  checkpoint paths."""
  placeholder_for_unset = True

  def __contains__(self, name):
    return name in os.environ

  def __getitem__(self, name):
    return os.environ[name]


@dataclasses.dataclass(frozen=True)
class UnsetReference:
  """A ${VAR} in a config text whose variable is not set and that has no default."""
  name: str
  source: str         # File path, or "--config_override[i]".
  line: int           # 1-based.
  column: int         # 1-based, in the text as written.
  output_column: int  # 1-based column of its placeholder in the substituted text.

  def message(self, fields: Sequence[str] = ()) -> str:
    sets = f' (it sets {", ".join(fields)})' if fields else ''
    return (f'{self.source}:{self.line}:{self.column}: environment variable ${{{self.name}}} '
            f'is not set{sets}; export {self.name}=... before running, or write '
            f'${{{self.name}:-default}}')


def substitute_environment(text: str, source_name: str,
                           environ: Optional[Mapping[str, str]] = None,
                           unset: Optional[list] = None) -> str:
  """Replaces ${VAR} (and ${VAR:-default}) outside comments; "$$" is a literal "$".

  Args:
    unset: when given, an unset variable without a default becomes the placeholder
      `<unset VAR>` and its UnsetReference is appended here (load_config then decides whether
      the field it sets is read); otherwise such a variable is an error.

  Raises:
    ConfigError: naming the variable and file:line:column of a reference to an unset one.
  """
  environ = os.environ if environ is None else environ
  lines = text.split('\n')
  for number, line in enumerate(lines, start=1):
    code, comment = _code_and_comment(line)
    pieces = []
    written = 0   # Length of the substituted line so far.
    end = 0
    for match in _ENV_REFERENCE.finditer(code):
      pieces.append(code[end:match.start()])
      written += match.start() - end
      end = match.end()
      name, default = match.group(1), match.group(2)
      if match.group(0) == '$$':
        value = '$'
      elif name in environ:
        value = environ[name]
      elif default is not None:
        value = default
      else:
        value = placeholder(name)
        if not getattr(environ, 'placeholder_for_unset', False):
          reference = UnsetReference(name, source_name, number, match.start() + 1, written + 1)
          if unset is None:
            raise ConfigError(reference.message())
          unset.append(reference)
      pieces.append(value)
      written += len(value)
    pieces.append(code[end:])
    lines[number - 1] = ''.join(pieces) + comment
  return '\n'.join(lines)


def _walk_fields(text: str):
  """Yields (kind, dotted field path, line, first column, end column) for each field name
  (kind 'name') and each scalar value token (kind 'value') of a textproto; lines and columns
  are 1-based, the end column exclusive.

  A light tokenizer that follows `name {`, `name: {` and `name <` nesting; good enough to point
  an error at a line. Paths look like "train_dataset_options.crop_size".
  """
  stack: list[str] = []
  line = 1
  line_start = 0
  pending_path = None   # The field whose value comes next.
  expect_name = True
  in_list = 0
  for match in _TOKEN.finditer(text):
    token = match.group(0)
    if token == '\n':
      line += 1
      line_start = match.end()
      continue
    if token.isspace() or token.startswith('#'):
      continue
    start, end = match.start() - line_start + 1, match.end() - line_start + 1
    if in_list:
      if token == '[':
        in_list += 1
      elif token == ']':
        in_list -= 1
        expect_name = in_list == 0
      elif token != ',' and pending_path is not None:
        yield 'value', pending_path, line, start, end
      continue
    if expect_name and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', token):
      pending_path = '.'.join(stack + [token])
      yield 'name', pending_path, line, start, end
      expect_name = False
      continue
    if token == ':':
      continue
    if token in '{<':
      if pending_path is not None:
        stack.append(pending_path.rsplit('.', 1)[-1])
      pending_path = None
      expect_name = True
      continue
    if token in '}>':
      if stack:
        stack.pop()
      pending_path = None
      expect_name = True
      continue
    if token == '[':
      in_list = 1
      continue
    # A scalar value ends the field.
    if pending_path is not None:
      yield 'value', pending_path, line, start, end
    pending_path = None
    expect_name = True


def field_locations(text: str) -> dict[str, int]:
  """Maps each dotted field path set in a textproto to the 1-based line of its first use."""
  locations: dict[str, int] = {}
  for kind, path, line, _, _ in _walk_fields(text):
    if kind == 'name':
      locations.setdefault(path, line)
  return locations


def field_at(text: str, line: int, column: int) -> Optional[str]:
  """Dotted path of the field whose value covers 1-based (line, column) of a textproto, or
  None."""
  for kind, path, value_line, start, end in _walk_fields(text):
    if kind == 'value' and value_line == line and start <= column < end:
      return path
  return None


def _suggest_field(detail: str) -> str:
  """" (did you mean "crop_size"?)" for an unknown-field error, else ""."""
  match = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', detail)
  if not match:
    return ''
  try:
    message_type = descriptor_pool.Default().FindMessageTypeByName(match.group(1))
  except KeyError:
    return ''
  close = difflib.get_close_matches(match.group(2), list(message_type.fields_by_name), n=1)
  return f' (did you mean "{close[0]}"?)' if close else ''


def parse_text(text: str, source_name: str,
               message: Optional[message_lib.Message] = None,
               unset: Sequence[UnsetReference] = ()) -> message_lib.Message:
  """Strict text-format parse: unknown fields, wrong types and repeated scalars are errors.

  `unset`: the unset ${VAR}s substituted into `text`; a parse error on the line of one (its
  placeholder is no valid value there, e.g. for a number) is reported as that variable.
  """
  message = config_pb2.ExperimentOptions() if message is None else message
  try:
    text_format.Parse(text, message)
  except text_format.ParseError as error:
    line, column = error.GetLine(), error.GetColumn()
    culprit = next((reference for reference in unset
                    if reference.source == source_name and reference.line == line), None)
    if culprit is not None:
      raise ConfigError(culprit.message()) from None
    detail = str(error)
    # The library prefixes "line:column : "; keep only the explanation.
    detail = re.sub(r'^\d+:\d+ : ', '', detail)
    detail += _suggest_field(detail)
    where = f'{source_name}:{line}:{column}' if line else source_name
    raise ConfigError(f'{where}: {detail}') from None
  return message


def merge_override(target: message_lib.Message, override: message_lib.Message) -> None:
  """Merges `override` into `target`. Unlike proto MergeFrom, a repeated field given in the
  override replaces the target's list instead of appending to it."""
  for field, value in override.ListFields():
    if field.is_repeated:
      if field.message_type is not None and field.message_type.GetOptions().map_entry:
        container = getattr(target, field.name)
        container.clear()
        for key in value:
          if field.message_type.fields_by_name['value'].message_type is not None:
            container[key].CopyFrom(value[key])
          else:
            container[key] = value[key]
        continue
      container = getattr(target, field.name)
      del container[:]
      if field.message_type is not None:
        for item in value:
          container.add().CopyFrom(item)
      else:
        container.extend(value)
    elif field.message_type is not None:
      sub_target = getattr(target, field.name)
      sub_target.SetInParent()   # Marks presence (and switches a oneof) even if `value` is empty.
      merge_override(sub_target, value)
    else:
      setattr(target, field.name, value)


def read_config_file(config_file: str,
                     environ: Optional[Mapping[str, str]] = None,
                     unset: Optional[list] = None) -> ConfigSource:
  try:
    with open(config_file, encoding='utf-8') as f:
      raw = f.read()
  except FileNotFoundError:
    raise ConfigError(f'{config_file}: no such config file') from None
  except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
    raise ConfigError(f'{config_file}: cannot read config file ({error})') from None
  return ConfigSource(config_file, substitute_environment(raw, config_file, environ, unset))


def load_config(config_file: str,
                overrides: Sequence[str] = (),
                environ: Optional[Mapping[str, str]] = None,
                validate: bool = True,
                num_replicas: int = 1,
                unread_fields: Sequence[str] = ()) -> config_pb2.ExperimentOptions:
  """Loads, overrides and validates an experiment config.

  Args:
    config_file: Path of an ExperimentOptions textproto.
    overrides: Textproto snippets applied in order over the file (repeated fields replace).
    environ: Variables for ${VAR} substitution (default: os.environ).
    validate: Run semantic validation (config/validation.py).
    num_replicas: Replicas the run will use (batch sizes must divide by it).
    unread_fields: Dotted paths of the fields the calling command does not read (with all
      below them), e.g. INFERENCE_UNREAD_FIELDS: an unset ${VAR} there reads as `<unset VAR>`
      instead of being an error. So does one in a field that a later override replaces.

  Returns:
    The effective ExperimentOptions.

  Raises:
    ConfigError: with a one-paragraph message naming file:line, field and the fix.
  """
  unset: list[UnsetReference] = []
  sources = [read_config_file(config_file, environ, unset)]
  config = parse_text(sources[0].text, sources[0].name, unset=unset)
  for index, snippet in enumerate(overrides):
    name = f'--config_override[{index}]'
    source = ConfigSource(name, substitute_environment(snippet, name, environ, unset))
    sources.append(source)
    merge_override(config, parse_text(source.text, name, unset=unset))
  check_unset_references(config, unset, sources, unread_fields)
  if validate:
    # Imported here: validation reads the model builder's table of encoders (Keras and
    # TensorFlow come with it), which parsing alone does not need.
    from deeplab2_kmax.config import validation  # pylint: disable=g-import-not-at-top
    problems = validation.find_problems(config, num_replicas=num_replicas)
    if problems:
      raise ConfigError(format_problems(problems, sources))
  return config


def _values_at(message: message_lib.Message, path: str) -> list:
  """The values at a dotted field path, through every element of repeated messages."""
  found = [message]
  for name in path.split('.'):
    values = []
    for item in found:
      if not isinstance(item, message_lib.Message):
        return []
      field = item.DESCRIPTOR.fields_by_name.get(name)
      if field is None:
        return []
      value = getattr(item, name)
      values.extend(value if field.is_repeated else [value])
    found = values
  return found


def _is_under(path: str, prefixes: Sequence[str]) -> bool:
  return any(path == prefix or path.startswith(prefix + '.') for prefix in prefixes)


def check_unset_references(config: message_lib.Message, unset: Sequence[UnsetReference],
                           sources: Sequence[ConfigSource],
                           unread_fields: Sequence[str] = ()) -> None:
  """Raises ConfigError naming every unset ${VAR} (first reference, and the fields it sets)
  whose field the command reads and still holds its placeholder in the effective config."""
  texts = {source.name: source.text for source in sources}
  needed = {}   # Variable name -> (first reference, fields it sets).
  for reference in unset:
    field = field_at(texts[reference.source], reference.line, reference.output_column)
    if field is not None:
      if _is_under(field, unread_fields):
        continue
      if not any(isinstance(value, str) and placeholder(reference.name) in value
                 for value in _values_at(config, field)):
        continue  # A later override replaced it.
    first, fields = needed.setdefault(reference.name, (reference, []))
    if field is not None and field not in fields:
      fields.append(field)
  problems = [first.message(fields) for first, fields in needed.values()]
  if len(problems) == 1:
    raise ConfigError(problems[0])
  if problems:
    raise ConfigError(f'{len(problems)} environment variables are not set:\n'
                      + '\n'.join('  ' + problem for problem in problems))


def locate(field_path: str, sources: Iterable[ConfigSource]) -> str:
  """Returns "file:line" of the last source that sets `field_path` (or its closest parent)."""
  parts = field_path.split('.')
  for source in reversed(list(sources)):
    for end in range(len(parts), 0, -1):
      line = source.locate('.'.join(parts[:end]))
      if line is not None:
        return f'{source.name}:{line}'
  return next(iter(sources)).name


def format_problems(problems, sources: Sequence[ConfigSource]) -> str:
  lines = [f'{locate(p.field, sources)}: {p.field}: {p.message}' for p in problems]
  if len(lines) == 1:
    return lines[0]
  return f'{len(lines)} problems in the config:\n' + '\n'.join('  ' + l for l in lines)
