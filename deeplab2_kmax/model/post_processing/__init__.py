"""Panoptic post-processing of mask-transformer outputs: slots -> panoptic, semantic and
instance maps at the crop and at the raw image size."""
