"""deeplab2_kmax: kMaX-DeepLab, CMT-DeepLab and MaX-DeepLab panoptic segmentation in Keras 3."""

# First: quietens TensorFlow's C++ start-up logs of `python -m deeplab2_kmax.<tool>` before any
# tool imports TensorFlow (see the module; DEEPLAB2_KMAX_VERBOSE_TF=1 keeps them).
from deeplab2_kmax import _quiet_startup  # pylint: disable=unused-import

__version__ = '0.1.0'
