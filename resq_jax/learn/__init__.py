"""Learned rotations: the rotations of a recipe refined by Cayley SGD on calibration text (docs/algorithms.md)."""
