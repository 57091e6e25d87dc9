"""Loads an experiment config: textproto file -> ${ENV} substitution -> strict parse ->
ordered --config_override snippets -> semantic validation.

Every failure raises ConfigError, whose message names the file (or override), the line and
column where there is one, the field, and what would be right. Command-line tools print that
message alone and exit non-zero.
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


class PlaceholderEnvironment(dict):
  """os.environ where an unset ${VAR} reads as a placeholder `<unset VAR>`: for tools that
  build a model from a config and need none of its data or checkpoint paths."""

  def __contains__(self, name):
    return True

  def __getitem__(self, name):
    return os.environ.get(name, f'<unset {name}>')


def substitute_environment(text: str, source_name: str,
                           environ: Optional[Mapping[str, str]] = None) -> str:
  """Replaces ${VAR} (and ${VAR:-default}) outside comments; "$$" is a literal "$".

  Raises:
    ConfigError: naming the variable and file:line:column of a reference to an unset one.
  """
  environ = os.environ if environ is None else environ
  lines = text.split('\n')
  for number, line in enumerate(lines, start=1):
    code, comment = _code_and_comment(line)

    def replace(match, number=number):
      if match.group(0) == '$$':
        return '$'
      name, default = match.group(1), match.group(2)
      if name in environ:
        return environ[name]
      if default is not None:
        return default
      raise ConfigError(
          f'{source_name}:{number}:{match.start() + 1}: environment variable ${{{name}}} is '
          f'not set; export {name}=... before running, or write ${{{name}:-default}}')

    lines[number - 1] = _ENV_REFERENCE.sub(replace, code) + comment
  return '\n'.join(lines)


def field_locations(text: str) -> dict[str, int]:
  """Maps each dotted field path set in a textproto to the 1-based line of its first use.

  A light tokenizer that follows `name {`, `name: {` and `name <` nesting; good enough to point
  a semantic error at a line. Paths look like "train_dataset_options.crop_size".
  """
  locations: dict[str, int] = {}
  stack: list[str] = []
  line = 1
  pending_name = None   # the field whose value comes next
  expect_name = True
  in_list = 0
  for match in _TOKEN.finditer(text):
    token = match.group(0)
    if token == '\n':
      line += 1
      continue
    if token.isspace() or token.startswith('#'):
      continue
    if in_list:
      if token == '[':
        in_list += 1
      elif token == ']':
        in_list -= 1
        expect_name = in_list == 0
      continue
    if expect_name and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', token):
      pending_name = token
      path = '.'.join(stack + [token])
      locations.setdefault(path, line)
      expect_name = False
      continue
    if token == ':':
      continue
    if token in '{<':
      if pending_name is not None:
        stack.append(pending_name)
      pending_name = None
      expect_name = True
      continue
    if token in '}>':
      if stack:
        stack.pop()
      pending_name = None
      expect_name = True
      continue
    if token == '[':
      in_list = 1
      continue
    # A scalar value ends the field.
    pending_name = None
    expect_name = True
  return locations


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
               message: Optional[message_lib.Message] = None) -> message_lib.Message:
  """Strict text-format parse: unknown fields, wrong types and repeated scalars are errors."""
  message = config_pb2.ExperimentOptions() if message is None else message
  try:
    text_format.Parse(text, message)
  except text_format.ParseError as error:
    line, column = error.GetLine(), error.GetColumn()
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
                     environ: Optional[Mapping[str, str]] = None) -> ConfigSource:
  try:
    with open(config_file, encoding='utf-8') as f:
      raw = f.read()
  except FileNotFoundError:
    raise ConfigError(f'{config_file}: no such config file') from None
  except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
    raise ConfigError(f'{config_file}: cannot read config file ({error})') from None
  return ConfigSource(config_file, substitute_environment(raw, config_file, environ))


def load_config(config_file: str,
                overrides: Sequence[str] = (),
                environ: Optional[Mapping[str, str]] = None,
                validate: bool = True,
                num_replicas: int = 1) -> config_pb2.ExperimentOptions:
  """Loads, overrides and validates an experiment config.

  Args:
    config_file: Path of an ExperimentOptions textproto.
    overrides: Textproto snippets applied in order over the file (repeated fields replace).
    environ: Variables for ${VAR} substitution (default: os.environ).
    validate: Run semantic validation (config/validation.py).
    num_replicas: Replicas the run will use (batch sizes must divide by it).

  Returns:
    The effective ExperimentOptions.

  Raises:
    ConfigError: with a one-paragraph message naming file:line, field and the fix.
  """
  sources = [read_config_file(config_file, environ)]
  config = parse_text(sources[0].text, sources[0].name)
  for index, snippet in enumerate(overrides):
    name = f'--config_override[{index}]'
    source = ConfigSource(name, substitute_environment(snippet, name, environ))
    sources.append(source)
    merge_override(config, parse_text(source.text, name))
  if validate:
    from deeplab2_kmax.config import validation  # pylint: disable=g-import-not-at-top
    problems = validation.find_problems(config, num_replicas=num_replicas)
    if problems:
      raise ConfigError(format_problems(problems, sources))
  return config


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
