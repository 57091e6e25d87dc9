"""Every public layer's get_config is JSON-clean and rebuilds an equal layer."""

import json

import keras
import pytest

from deeplab2_kmax.model.heads import aspp
from deeplab2_kmax.model.heads import conv_head
from deeplab2_kmax.model.heads import max_head
from deeplab2_kmax.model.heads import semantic
from deeplab2_kmax.model.layers import attention_operation
from deeplab2_kmax.model.layers import axial_attention
from deeplab2_kmax.model.layers import blocks
from deeplab2_kmax.model.layers import convolutions
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resized_fuse
from deeplab2_kmax.model.layers import stems
from deeplab2_kmax.model.pixel_decoder import kmax as kmax_pixel_decoder
from deeplab2_kmax.model.pixel_encoder import convnext
from deeplab2_kmax.model.pixel_encoder import resnet
from deeplab2_kmax.model.transformer_decoder import kmax as kmax_transformer_decoder

_NORM = normalization.make_norm_layer(momentum=0.9, epsilon=1e-4, synchronized=True)

LAYERS = [
    lambda: normalization.BatchNorm(axis=[0, 2], momentum=0.9, gamma_initializer='zeros'),
    lambda: convolutions.Conv2DSame(8, 3, 'conv', strides=2, use_bias=False, use_bn=True,
                                    norm_layer=_NORM, activation='gelu'),
    lambda: convolutions.Conv1D(8, 'proj', use_bias=False, use_bn=True, norm_layer=_NORM),
    lambda: convolutions.StackedConv2DSame(2, 8, 5, 'block', norm_layer=_NORM),
    lambda: axial_attention.AxialAttention2D(16, strides=2, norm_layer=_NORM),
    lambda: attention_operation.AttentionOperation(norm_layer=_NORM),
    lambda: blocks.ResidualBlock([16, 8, 32], strides=2, attention_type='axial',
                                 norm_layer=_NORM),
    lambda: blocks.BlockGroup(8, 3, block_type='axial_after_first',
                              drop_path_keep_prob=[1.0, 0.9, 0.8], atrous_rate=2),
    lambda: stems.InceptionStem(0.5, activation='gelu', norm_layer=_NORM),
    lambda: resized_fuse.ResizedFuse(8, activation='gelu', norm_layer=_NORM),
    lambda: resnet.axial_resnet50(width_multiplier=0.5, drop_path_keep_prob=0.8),
    lambda: convnext.ConvNeXt('tiny', drop_path_keep_prob=0.7),
    lambda: kmax_pixel_decoder.KMaXPixelDecoder((16, 8, 8, 4), (1, 2, 1, 1), norm_layer=_NORM),
    lambda: kmax_transformer_decoder.KMaXTransformerDecoder(
        num_cluster_centers=6, channels=16, num_heads=2, key_channels=8, value_channels=16,
        ffn_channels=32, drop_path_keep_prob=0.8, norm_layer=_NORM,
        auxiliary_head_args=dict(pixel_head_channels=8, embedding_channels=8, num_classes=5)),
    lambda: max_head.MaXHead(16, 8, 5, norm_layer=_NORM),
    lambda: conv_head.ConvHead(16, 7, conv_type='standard_conv', norm_layer=_NORM),
    lambda: aspp.ASPP(16, (1, 2, 3), norm_layer=_NORM),
    lambda: semantic.SemanticDecoder(low_level_channels_project=(8, 4), aspp_channels=16,
                                     decoder_channels=16, norm_layer=_NORM),
]


@pytest.mark.parametrize('make', LAYERS)
def test_config_round_trip(make):
  layer = make()
  config = layer.get_config()
  json.dumps(config)
  clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
  assert type(clone) is type(layer)
  assert clone.get_config() == config


def test_norm_settings_travel_with_the_config():
  conv = LAYERS[1]()
  clone = convolutions.Conv2DSame.from_config(conv.get_config())
  assert conv.get_config()['norm_layer'] == {'momentum': 0.9, 'epsilon': 1e-4,
                                             'synchronized': True}
  bn = clone._batch_norm
  assert (bn.momentum, bn.epsilon, bn.synchronized) == (0.9, 1e-4, True)
