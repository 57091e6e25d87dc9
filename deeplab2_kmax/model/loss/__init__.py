"""Mask-transformer losses: Hungarian matching, ground-truth preparation and loss terms."""
