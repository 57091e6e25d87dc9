"""A small progress reporter with rate and ETA, for long command-line work.

On a terminal it redraws one line; elsewhere (logs, CI) it prints a line about every 10% so
logs stay short.
"""

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


class Progress:
  """Counts work done towards a total and reports rate and ETA.

  Example:
    progress = Progress(total=1000, label='train', unit='images')
    for ...:
      progress.update(1)
    progress.close()
  """

  def __init__(self, total: Optional[int], label: str = '', unit: str = 'items',
               stream: Optional[TextIO] = None, min_interval_s: float = 0.5):
    self.total = total
    self.label = label
    self.unit = unit
    self.stream = stream or sys.stderr
    self.min_interval_s = min_interval_s
    self.done = 0
    self._start = time.monotonic()
    self._last_report = 0.0
    self._last_decile = -1
    self._interactive = hasattr(self.stream, 'isatty') and self.stream.isatty()

  @property
  def elapsed_s(self) -> float:
    return time.monotonic() - self._start

  def line(self) -> str:
    elapsed = self.elapsed_s
    rate = self.done / elapsed if elapsed > 0 else 0.0
    prefix = f'[{self.label}] ' if self.label else ''
    if self.total:
      eta = (self.total - self.done) / rate if rate > 0 else float('nan')
      eta_text = format_duration(eta) if rate > 0 else '?'
      return (f'{prefix}{self.done}/{self.total} {self.unit} '
              f'{100.0 * self.done / self.total:5.1f}% {rate:.1f} {self.unit}/s '
              f'elapsed {format_duration(elapsed)} ETA {eta_text}')
    return f'{prefix}{self.done} {self.unit} {rate:.1f} {self.unit}/s elapsed ' \
           f'{format_duration(elapsed)}'

  def update(self, count: int = 1) -> None:
    self.done += count
    now = time.monotonic()
    if self._interactive:
      if now - self._last_report >= self.min_interval_s:
        self._last_report = now
        self.stream.write('\r' + self.line())
        self.stream.flush()
    elif self.total:
      decile = int(10 * self.done / self.total)
      if decile != self._last_decile and decile < 10:
        self._last_decile = decile
        self.stream.write(self.line() + '\n')

  def close(self) -> None:
    self.stream.write(('\r' if self._interactive else '') + self.line() + '\n')
    self.stream.flush()
