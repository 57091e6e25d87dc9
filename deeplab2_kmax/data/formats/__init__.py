"""File formats of panoptic data: DeepLab2's TFRecords (tfrecord.py), the COCO panoptic format
(JSON + RGB PNGs, which Cityscapes and ADE20K are converted through and the evaluation reads;
coco_panoptic.py, the one reader of its PNGs and annotations), its segment-id colours
(panoptic_rgb.py) and PNG files (png_encoding.py: the one, TensorFlow-free, encoder and the file
reader and writer)."""
