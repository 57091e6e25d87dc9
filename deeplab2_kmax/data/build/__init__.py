"""Command lines that build and check datasets: the converters to DeepLab2 TFRecords

    python -m deeplab2_kmax.data.build.coco          # COCO panoptic
    python -m deeplab2_kmax.data.build.cityscapes    # Cityscapes panoptic
    python -m deeplab2_kmax.data.build.ade20k        # ADE20K panoptic
    python -m deeplab2_kmax.data.build.coco_format   # any dataset in COCO panoptic format
    python -m deeplab2_kmax.data.build.synthetic     # the built-in synthetic dataset

and the validator `python -m deeplab2_kmax.data.build.validate`. What they share: conversion.py
(splits of examples -> sharded TFRecords and the dataset-options file) and shard_writer.py
(parallel, resumable, atomic shard writing).
"""
