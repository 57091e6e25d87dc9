"""The synthetic panoptic dataset's procedural scenes (scenes.py); data/build/synthetic.py
writes them as TFRecords."""
