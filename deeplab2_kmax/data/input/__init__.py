"""The training and evaluation input: the tf.data pipeline (pipeline.py) and its stages,
preprocessing.py (resize, scale, pad, crop, flip), autoaugment.py, copy_paste.py and the
panoptic training targets (sample_generator.py)."""
