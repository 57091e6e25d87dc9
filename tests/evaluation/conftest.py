"""Fixtures of the evaluation tests."""

import os

import pytest

import evaluation_testing


@pytest.fixture
def coco_sample_dir() -> str:
  path = os.path.join(evaluation_testing.shared_dir(), 'fixtures', 'coco-panoptic-sample')
  if not os.path.isdir(path):
    pytest.skip(f'COCO panoptic sample not found at {path}; set DEEPLAB2_KMAX_SHARED_DIR to the '
                'folder holding fixtures/coco-panoptic-sample')
  return path
