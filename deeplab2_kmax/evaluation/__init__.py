"""Evaluation: panoptic quality with official-script semantics, official formats, mask AP, mIoU."""
