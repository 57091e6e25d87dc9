"""Colour maps and the progress reporter."""

import io

import numpy as np

from deeplab2_kmax import progress
from deeplab2_kmax import visualization
from deeplab2_kmax.data import datasets


def test_colorize_uses_class_colours_and_separates_instances():
  d = datasets.get_built_in('synthetic_panoptic')
  panoptic = np.array([[0, 4 * 256, 1 * 256 + 1, 1 * 256 + 2]])
  colors = visualization.colorize_panoptic(panoptic, d)
  assert colors[0, 0].tolist() == [0, 0, 0]                 # void is black
  assert colors[0, 1].tolist() == list(d.colors[4])         # stuff: exact class colour
  assert colors[0, 2].tolist() != colors[0, 3].tolist()     # two discs differ
  # Instances keep the hue of their class: the channel order of the disc colour survives.
  assert np.argmax(colors[0, 2]) == np.argmax(d.colors[1])


def test_grid_places_tiles():
  tile = np.full((2, 3, 3), 7, np.uint8)
  out = visualization.grid([[tile, tile], [tile]], gap=1)
  assert out.shape == (5, 7, 3)
  assert (out[3:, 4:] == 255).all() and (out[:2, :3] == 7).all()


def test_progress_reports_rate_and_eta_in_logs():
  stream = io.StringIO()
  bar = progress.Progress(total=20, label='x', unit='images', stream=stream)
  for _ in range(20):
    bar.update()
  bar.close()
  lines = stream.getvalue().splitlines()
  assert 1 < len(lines) <= 11              # about every 10%, not every item
  assert lines[-1].startswith('[x] 20/20 images 100.0%') and 'ETA 0:00:00' in lines[-1]
  assert progress.format_duration(3725) == '1:02:05'
