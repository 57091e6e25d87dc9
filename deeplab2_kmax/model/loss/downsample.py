"""Strided downsampling of label maps to a model output resolution.

Label maps cannot be interpolated, so, like DeepLab2, the loss keeps every s-th pixel with
s = (in - 1) // (out - 1). With DeepLab2's crop sizes (k * stride + 1) and outputs at
(k + 1) pixels, this picks exactly the pixels that align-corners resizing puts on the output
grid.
"""

from typing import Sequence

import tensorflow as tf


def _stride(size_in: int, size_out: int, axis: str) -> int:
  if size_out == 1:
    return max(size_in, 1)
  if size_out < 1 or size_in < size_out or (size_in - 1) % (size_out - 1):
    raise ValueError(
        f'Cannot strided-downsample {axis} {size_in} to {size_out}: needs '
        f'(in - 1) divisible by (out - 1), e.g. in = k * stride + 1 and out = k + 1.')
  return (size_in - 1) // (size_out - 1)


def strided_downsample(labels: tf.Tensor, target_size: Sequence[int]) -> tf.Tensor:
  """Keeps every s-th pixel of a label map.

  Args:
    labels: [batch, height, width] or [batch, height, width, channels], static height/width.
    target_size: (target_height, target_width).

  Returns:
    [batch, target_height, target_width(, channels)], same dtype.

  Raises:
    ValueError: If the spatial size is not static, or not reachable with an integer stride.
  """
  height, width = labels.shape[1], labels.shape[2]
  if height is None or width is None:
    raise ValueError(f'strided_downsample needs a static height and width, got {labels.shape}.')
  target_height, target_width = int(target_size[0]), int(target_size[1])
  if (height, width) == (target_height, target_width):
    return labels
  stride_h = _stride(height, target_height, 'height')
  stride_w = _stride(width, target_width, 'width')
  return labels[:, :(target_height - 1) * stride_h + 1:stride_h,
                :(target_width - 1) * stride_w + 1:stride_w]
