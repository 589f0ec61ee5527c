"""Orthogonal matrices and their fast application: Hadamard matrices of size K * 2^m (hadamard, built from
finite_fields), the fast Walsh-Hadamard transform (fwht), random rotations (orthogonal), PCA bases (pca).
Pure functions of sizes, seeds and arrays; nothing here knows a model.
"""
