"""Calibration statistics of a model's activations (statistics): covariances for the PCA bases and mean
magnitudes for L2QER, streamed layer by layer and sharded over devices.
"""
