"""Triton kernels of the packed mixed-precision linear (NVIDIA GPUs).

Importing this package does not import triton: ``kernels`` (the @triton.jit source), ``jax_ops``
(jax_triton launchers), ``torch_ops`` (torch launchers, also for Triton's interpreter), ``aot``
(ahead-of-time compile to cubin) and ``selfcheck`` (kernel-vs-reference comparison) import it
when they are loaded. ``launch`` (geometry and operand order) needs nothing but Python.
"""
