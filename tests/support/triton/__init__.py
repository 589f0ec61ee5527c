"""Triton kernel checks: torch launchers (also under the interpreter), the kernel-vs-reference comparison
and the ahead-of-time compile to cubin."""
