"""Test-only tooling (needs torch or a CUDA-enabled Triton): not part of the installed package."""
