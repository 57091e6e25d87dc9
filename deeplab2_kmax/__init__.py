"""deeplab2_kmax: kMaX-DeepLab, CMT-DeepLab and MaX-DeepLab panoptic segmentation in Keras 3."""

__version__ = '0.1.0'
