"""The MaX-DeepLab meta-architecture: the dual-path network and the MaX head.

images [batch, height, width, 3] in [0, 255] -> x / 127.5 - 1 -> dual-path network
(pixel_encoder/dual_path_resnet.py: pixel path, memory path, extra decoder) -> MaX head
(+ auxiliary semantic decoder and head). Same outputs as KMaXDeepLab without
`auxiliary_outputs_pred` (DeepLab2's MaX-DeepLab supervises the final output only).
"""

import keras

from deeplab2_kmax.model import kmax_deeplab


@keras.saving.register_keras_serializable(package='deeplab2_kmax')
class MaXDeepLab(kmax_deeplab.KMaXDeepLab):
  """KMaXDeepLab's composition with no pixel or transformer decoder: the encoder is the whole
  dual-path network.

  Args:
    encoder: DualPathResNet.
    predictor, semantic_decoder, semantic_head: As in KMaXDeepLab.
  """

  def __init__(self, encoder, predictor, semantic_decoder=None, semantic_head=None, **kwargs):
    kwargs.pop('pixel_decoder', None)
    kwargs.pop('transformer_decoder', None)
    super().__init__(encoder, None, None, predictor, semantic_decoder, semantic_head, **kwargs)

  def backbone_trainable_variables(self):
    """The encoder less the parts DeepLab2 trains from scratch (transformer, extra, memory)."""
    return [v for v in self.encoder.trainable_variables
            if self.encoder.is_backbone_variable(v)]
