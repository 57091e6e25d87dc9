"""kMaX pixel decoder: axial attention at stride 32 and 16, bottlenecks at 8, 4 (and 2).

Stage i reads encoder endpoint stage{5 - i} (stride 32 / 2^i), each endpoint first normalised
by its own LayerNormalization (eps 1e-6). Stage 0 runs on LN(stage5); after each stage i < S-1
its output is recorded as `decoder_stage{i + 1}` and fused (ResizedFuse: activation, 1x1 conv +
BN, align-corners upsampling, sum) with the next normalised endpoint at dims[i + 1] channels.
The last stage's output is `decoder_output`. Every stage outputs 4 * dims[i] channels and all
outputs are non-activated. The 3x3 convolutions of bottleneck stages are dilated by 2: DeepLab2
builds the decoder stages as block groups at "original ResNet stride" 32 with output stride 16,
which makes them atrous (visible in MAC counts, not in parameters). Defaults (DeepLab2, output
stride 4): dims (512, 256, 128, 64), blocks (1, 5, 1, 1), types (axial, axial, bottleneck,
bottleneck); stride 2 adds (32, 1, bottleneck).
"""

import keras

from deeplab2_kmax import common
from deeplab2_kmax.model.layers import blocks
from deeplab2_kmax.model.layers import layer_norm
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.layers import resized_fuse

# The strides a decoder stage can run at, from the encoder's output stride down: stage i reads
# encoder endpoint stage{5 - i} at stride ENCODER_OUTPUT_STRIDE / 2^i (stage1, stride 2, is
# the finest endpoint the encoders give). A decoder with high_resolution_output_stride s has
# a stage at each of these strides >= s (stage_strides).
STAGE_STRIDES = tuple(common.ENCODER_OUTPUT_STRIDE >> i for i in range(5))
# DeepLab2's defaults, one entry per stage of STAGE_STRIDES.
DEFAULT_DIMS = (512, 256, 128, 64, 32)
DEFAULT_NUM_BLOCKS = (1, 5, 1, 1, 1)
DEFAULT_BLOCK_TYPES = ('axial', 'axial', 'bottleneck', 'bottleneck', 'bottleneck')
# The high-resolution output strides DeepLab2 has defaults for; a decoder ending at another
# stride needs its dims, num_blocks and block_types given.
STRIDES_WITH_DEFAULTS = (4, 2)


def stage_strides(high_resolution_output_stride: int) -> list[int]:
  """Strides of the decoder stages, from 32 down to `high_resolution_output_stride`.

  Raises:
    ValueError: naming the stride, unless it is one of STAGE_STRIDES.
  """
  if high_resolution_output_stride not in STAGE_STRIDES:
    raise ValueError(f'high_resolution_output_stride {high_resolution_output_stride} is no '
                     f'pixel-decoder stride; use one of {", ".join(map(str, STAGE_STRIDES))}')
  return [s for s in STAGE_STRIDES if s >= high_resolution_output_stride]


def default_options(high_resolution_output_stride=4):
  """(dims, num_blocks, block_types) of DeepLab2 for output stride 4 or 2, one per stage."""
  if high_resolution_output_stride not in STRIDES_WITH_DEFAULTS:
    raise ValueError('high_resolution_output_stride must be 4 or 2 for the defaults.')
  num_stages = len(stage_strides(high_resolution_output_stride))
  return (list(DEFAULT_DIMS[:num_stages]), list(DEFAULT_NUM_BLOCKS[:num_stages]),
          list(DEFAULT_BLOCK_TYPES[:num_stages]))


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class KMaXPixelDecoder(normalization.NormLayerSerializable, keras.layers.Layer):
  """call(endpoints) -> endpoints + decoder_stage1..S-1 and decoder_output.

  Input: a dict with `stage5` [batch, h32, w32, c5], `stage4` [batch, h16, w16, c4], ... down
  to the stride of the last stage. Output adds `decoder_stage{i + 1}` = [batch, h, w,
  4 * dims[i]] at stride 32 / 2^i and `decoder_output` = [batch, h, w, 4 * dims[-1]].

  Args:
    dims: Base filters per stage (from stride 32 down).
    num_blocks: Blocks per stage.
    block_types: 'axial' or 'bottleneck' per stage.
    drop_path_keep_prob: Stochastic depth of the decoder blocks (DeepLab2: 1.0).
    atrous_rate: Dilation of the bottleneck 3x3 convolutions (DeepLab2: 2).
    activation: Activation name (DeepLab2: gelu).
    norm_layer: Batch-norm factory.
  """

  def __init__(self, dims=DEFAULT_DIMS[:4], num_blocks=DEFAULT_NUM_BLOCKS[:4],
               block_types=DEFAULT_BLOCK_TYPES[:4],
               drop_path_keep_prob=1.0, atrous_rate=2, activation='gelu', norm_layer=None,
               **kwargs):
    super().__init__(**kwargs)
    if not len(dims) == len(num_blocks) == len(block_types):
      raise ValueError('dims, num_blocks and block_types need the same length.')
    self.dims = [int(d) for d in dims]
    self.num_blocks = [int(n) for n in num_blocks]
    self.block_types = list(block_types)
    self.drop_path_keep_prob = float(drop_path_keep_prob)
    self.atrous_rate = int(atrous_rate)
    self.activation = activation
    self.norm_layer = norm_layer or normalization.make_norm_layer()
    policy = self.dtype_policy
    num_stages = len(self.dims)
    self._endpoint_names = [f'stage{len(STAGE_STRIDES) - i}' for i in range(num_stages)]
    self._backbone_norms = [
        keras.layers.LayerNormalization(epsilon=1e-6, name=f'backbone_norms_{i}', dtype=policy)
        for i in range(num_stages)]
    self._stages = [
        blocks.BlockGroup(self.dims[i], self.num_blocks[i], strides=1,
                          block_type=self.block_types[i],
                          drop_path_keep_prob=self.drop_path_keep_prob,
                          atrous_rate=self.atrous_rate, activation=activation,
                          norm_layer=self.norm_layer,
                          name=f'stages_{i}', dtype=policy)
        for i in range(num_stages)]
    self._skip_connections = [
        resized_fuse.ResizedFuse(self.dims[i + 1], activation=activation,
                                 norm_layer=self.norm_layer, name=f'skip_connections_{i}',
                                 dtype=policy)
        for i in range(num_stages - 1)]

  def build(self, input_shape):
    # Sub-layers build on the first (eager) call, nested in this layer's name scope; an
    # explicit build() stops Keras from tracing call() symbolically just to build.
    del input_shape

  def input_endpoints(self):
    """The encoder endpoints call() reads."""
    return list(self._endpoint_names)

  def call(self, endpoints, training=None):
    endpoints = dict(endpoints)
    x = layer_norm.layer_norm(self._backbone_norms[0], endpoints[self._endpoint_names[0]],
                              training)
    for i in range(len(self.dims) - 1):
      x = self._stages[i](x, training=training)
      endpoints[common.decoder_stage_endpoint(STAGE_STRIDES[i])] = x
      skip = layer_norm.layer_norm(self._backbone_norms[i + 1],
                                   endpoints[self._endpoint_names[i + 1]], training)
      x = self._skip_connections[i]([x, skip], training=training)
    endpoints[common.ENDPOINT_DECODER_OUTPUT] = self._stages[-1](x, training=training)
    return endpoints

  def get_config(self):
    config = super().get_config()
    config.update({
        'dims': self.dims, 'num_blocks': self.num_blocks, 'block_types': self.block_types,
        'drop_path_keep_prob': self.drop_path_keep_prob, 'atrous_rate': self.atrous_rate,
        'activation': self.activation,
        'norm_layer': normalization.norm_layer_config(self.norm_layer),
    })
    return config
