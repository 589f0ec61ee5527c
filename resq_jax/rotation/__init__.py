"""A recipe's orthogonal transforms (transforms: ResQ's PCA bases and subspace rotations, QuaRot's randomized
Hadamard) and their fusion into the weights (fusion: untie, fold norms, rotate, online Hadamard).
"""
