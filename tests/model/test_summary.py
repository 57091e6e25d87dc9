"""The summary's parameter and MAC counts against DeepLab2's (reference flops_641.json)."""

import json

from deeplab2_kmax.model import macs
from deeplab2_kmax.model import summary


def test_summary_of_coco_r50_at_641(coco_r50_model):
  # The model was built at crop 65; every layer also runs at other k * 32 + 1 crops.
  result = summary.summarize(coco_r50_model, (641, 641))
  assert result['total_params'] == 72_650_796
  assert result['trainable_params'] == 72_436_862
  assert result['components']['encoder'] == 23_561_152
  assert result['components']['semantic_decoder'] == 15_754_848
  # DeepLab2's analytic count of its inference graph at 641 x 641, less two kinds of work our
  # inference graph leaves out (hand-computed below).
  aspp_padding = sum(_space_to_batch_excess(21, rate) for rate in (6, 12, 18)) * 9 * 2048 * 256
  pixel_decoder_padding = (_space_to_batch_excess(81, 2) * 9 * 128 * 128
                           + _space_to_batch_excess(161, 2) * 9 * 64 * 64)
  # The k-means update's one-hot products: two layers at each of os32, os16, os8, with 128
  # centres and 256 value channels.
  kmeans_one_hot = 2 * (21 ** 2 + 41 ** 2 + 81 ** 2) * 128 * 256
  assert result['macs'] == (92_377_227_296 - aspp_padding - pixel_decoder_padding
                            - kmeans_one_hot) == 86_463_819_808
  # At os16 the axial attention's qkv projections fold their BN into the kernel and run as
  # MatMul: 5 blocks x 2 axes x 41 x 41 pixels x 512 -> 1024 channels.
  qkv_matmuls = 5 * 2 * 41 * 41 * 512 * 1024
  assert result['macs_by_op_type'] == {
      'Conv2D': 78_414_748_352 - aspp_padding - pixel_decoder_padding,
      'Einsum': 13_280_428_544 - kmeans_one_hot - qkv_matmuls, 'MatMul': qkv_matmuls,
      'DepthwiseConv2dNative': 682_050_400}
  assert result['macs_by_component']['encoder'] == 35_172_500_672
  assert result['macs_by_component']['pixel_decoder'] == 28_250_886_656 - pixel_decoder_padding
  assert result['macs_by_component']['transformer_decoder'] == 8_010_294_784 - kmeans_one_hot
  json.dumps(result)
  table = summary.format_table(result)
  assert 'pixel_decoder' in table and '86.46' in table


def _space_to_batch_excess(size, rate):
  """Extra output positions of a 3x3 'SAME' conv at `rate` done by space-to-batch.

  DeepLab2 (Keras' tf.nn.convolution) pads the size x size map by `rate` on each side, rounds
  it up to a multiple of `rate`, splits it into rate^2 sub-maps and runs a VALID 3x3 on each.
  Our inference graph runs TF's dilated Conv2D on the size x size outputs only.
  """
  padded = -(-(size + 2 * rate) // rate) * rate
  return (padded // rate - 2) ** 2 * rate ** 2 - size ** 2


def test_einsum_and_conv_mac_rules():
  assert macs._einsum_macs('bhld,bhmd->bhlm', [[2, 8, 5, 4], [2, 8, 7, 4]]) == 2 * 8 * 5 * 7 * 4


def test_summary_command_line_prints_json_last():
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab2_kmax.model.summary',
       '--config_file=configs/synthetic/kmax_r50_os32_synthetic.textproto', '--crop=65,65'],
      cwd=repo, capture_output=True, text=True, check=True)
  lines = result.stdout.strip().splitlines()
  data = json.loads(lines[-1])
  assert set(data) >= {'total_params', 'trainable_params', 'components', 'macs'}
  assert set(data['components']) >= {'encoder', 'pixel_decoder', 'transformer_decoder',
                                     'semantic_decoder'}
  assert sum(data['components'].values()) == data['total_params']
  assert data['macs'] > 0
  assert 'total' in result.stdout
