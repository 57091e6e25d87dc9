"""File formats of panoptic data: DeepLab2's TFRecords (tfrecord.py), the COCO panoptic format
(JSON + RGB PNGs, which Cityscapes and ADE20K are converted through; coco_panoptic.py), its
segment-id colours (panoptic_rgb.py) and a TensorFlow-free PNG writer (png_encoding.py)."""
