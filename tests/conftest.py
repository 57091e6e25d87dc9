"""Shared test fixtures."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path:
  """The project's ../shared folder (reference material and fixtures), if present."""
  return pathlib.Path(os.environ.get('DEEPLAB2_KMAX_SHARED_DIR', REPO_ROOT.parent / 'shared'))


@pytest.fixture(scope='session')
def synthetic_data_dir(tmp_path_factory):
  """A small synthetic dataset (24 train, 8 val images at 65x65), built once per session."""
  from deeplab2_kmax.data.build import synthetic as build_synthetic_data
  out = tmp_path_factory.mktemp('synthetic')
  build_synthetic_data.build(str(out), num_train=24, num_val=8, height=65, width=65, seed=3,
                             examples_per_shard=12, num_workers=1, show_progress=False)
  return out


def upstream_reference(name):
  """Path of a file in ../shared/reference/upstream-kmax-r50/ (skips the test when absent)."""
  path = shared_dir() / 'reference' / 'upstream-kmax-r50' / name
  if not path.exists():
    pytest.skip(f'{path} is absent (the ../shared reference data come with the project '
                'checkout; set DEEPLAB2_KMAX_SHARED_DIR to its location)')
  return str(path)
