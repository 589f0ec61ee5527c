"""Triton kernels of the packed mixed-precision linear (NVIDIA GPUs).

Importing this package does not import triton: ``kernels`` (the @triton.jit source) and ``jax_ops``
(jax_triton launchers) import it when they are loaded. ``launch`` (geometry and operand order) needs
nothing but Python. The checks that need torch (torch launchers for Triton's interpreter, the
kernel-vs-reference comparison, the ahead-of-time compile to cubin) live in tests/support/triton.
"""
