"""Shared fixtures: models built once per test session (building is the slow part)."""

import pytest
from google.protobuf import text_format

from deeplab2_kmax.protos import config_pb2

# DeepLab2's COCO kMaX-R50 values (configs/coco/kmax_deeplab/kmax_meta_r50_os32.textproto).
COCO_R50_TEXTPROTO = """
model_options {
  backbone { name: "kmax_resnet50" output_stride: 32 drop_path_keep_prob: 1.0 }
  decoder {
    feature_key: "feature_semantic" decoder_channels: 256 aspp_channels: 256
    atrous_rates: 6 atrous_rates: 12 atrous_rates: 18
  }
  kmax {
    pixel_space_head { output_channels: 128 head_channels: 256 }
    auxiliary_low_level { feature_key: "res3" channels_project: 64 }
    auxiliary_low_level { feature_key: "res2" channels_project: 32 }
    auxiliary_semantic_head { output_channels: 134 head_channels: 256 }
  }
}
train_dataset_options { dataset: "coco_panoptic" crop_size: 65 crop_size: 65 }
"""

# A tiny kMaX for behaviour tests: ResNet-50 at width 1/16, 8 centers, small decoders.
TINY_TEXTPROTO = """
model_options {
  backbone { name: "resnet50" backbone_width_multiplier: 0.0625 stem_width_multiplier: 0.25
             backbone_layer_multiplier: 0.34 }
  decoder { decoder_channels: 16 aspp_channels: 16 atrous_rates: 1 atrous_rates: 2
            atrous_rates: 3 }
  kmax {
    pixel_space_head { output_channels: 8 head_channels: 16 }
    auxiliary_low_level { feature_key: "res3" channels_project: 8 }
    auxiliary_low_level { feature_key: "res2" channels_project: 4 }
    auxiliary_semantic_head { output_channels: 7 head_channels: 16 }
    num_cluster_centers: 8
    pixel_decoder { dims: [16, 8, 8, 4] num_blocks: [1, 1, 1, 1]
                    block_types: ["axial", "axial", "bottleneck", "bottleneck"] }
    transformer_decoder { num_blocks: [1, 1, 1] strides: [32, 16, 8] channels: 16 num_heads: 2
                          key_channels: 8 value_channels: 16 ffn_channels: 32 }
    transformer_decoder_drop_path_keep_prob: 0.8
  }
}
train_dataset_options { dataset: "synthetic_panoptic" crop_size: 65 crop_size: 65 }
"""




def parse(text):
  return text_format.Parse(text, config_pb2.ExperimentOptions())


@pytest.fixture(scope='session')
def coco_r50_options():
  """Returns a function (text replacements) -> ExperimentOptions of the COCO kMaX-R50."""
  def make(**replacements):
    text = COCO_R50_TEXTPROTO
    for old, new in replacements.items():
      text = text.replace(old, new)
    return parse(text)
  return make


@pytest.fixture(scope='session')
def coco_r50_model():
  from deeplab2_kmax.model import builder  # pylint: disable=g-import-not-at-top
  return builder.build_model(parse(COCO_R50_TEXTPROTO), crop_size=(65, 65))


@pytest.fixture(scope='session')
def tiny_options():
  return parse(TINY_TEXTPROTO)
