"""Pixel encoders: parameter counts of DeepLab2 (reference Appendix F) and endpoint shapes."""

import numpy as np
import pytest

from deeplab2_kmax.model.pixel_encoder import convnext
from deeplab2_kmax.model.pixel_encoder import resnet


def _trainable(layer):
  return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


def _shapes(endpoints):
  return {k: tuple(v.shape) for k, v in endpoints.items()}


def test_resnet50():
  encoder = resnet.resnet50(name='encoder')
  endpoints = encoder(np.zeros((1, 65, 65, 3), np.float32))
  assert _trainable(encoder) == 23_508_032
  shapes = _shapes(endpoints)
  assert shapes['stage1'] == (1, 33, 33, 64)
  assert shapes['stage2'] == (1, 17, 17, 256)
  assert shapes['stage3'] == (1, 9, 9, 512)
  assert shapes['stage4'] == (1, 5, 5, 1024)
  assert shapes['stage5'] == (1, 3, 3, 2048)
  assert shapes['res5'] == shapes['stage5']
  np.testing.assert_array_equal(np.asarray(endpoints['res3']),
                                np.maximum(np.asarray(endpoints['stage3']), 0))


def test_axial_resnet50():
  encoder = resnet.axial_resnet50(name='encoder', drop_path_keep_prob=0.8)
  endpoints = encoder(np.zeros((1, 65, 65, 3), np.float32))
  assert _trainable(encoder) == 41_343_424
  assert _shapes(endpoints)['stage1'] == (1, 33, 33, 128)
  assert _shapes(endpoints)['stage5'] == (1, 3, 3, 2048)
  # Stage 4's strided first block is a convolution, the rest axial attention.
  stage4 = encoder._stages[2]
  assert stage4._blocks[0]._attention is None
  assert all(block._attention is not None for block in stage4._blocks[1:])
  # Linear stochastic depth beyond stride 16: 0.85 at stride 16, 0.8 at stride 32.
  assert stage4.drop_path_keep_prob == [1.0] + [pytest.approx(0.85)] * 5
  assert encoder._stages[3].drop_path_keep_prob == [pytest.approx(0.85), 0.8, 0.8]


def test_convnext_tiny_sizes_match_resnet():
  encoder = convnext.ConvNeXt('tiny', name='encoder')
  shapes = _shapes(encoder(np.zeros((1, 65, 65, 3), np.float32)))
  assert _trainable(encoder) == 27_818_592
  assert shapes['stage1'] == (1, 17, 17, 96)
  assert shapes['stage2'] == (1, 17, 17, 96)
  assert shapes['stage3'] == (1, 9, 9, 192)
  assert shapes['stage5'] == (1, 3, 3, 768)


@pytest.mark.slow
@pytest.mark.parametrize('size,expected', [('small', 49_453_152), ('base', 87_564_416),
                                           ('large', 196_227_264)])
def test_convnext_parameter_counts(size, expected):
  encoder = convnext.ConvNeXt(size, name='encoder')
  encoder(np.zeros((1, 33, 33, 3), np.float32))
  assert _trainable(encoder) == expected
