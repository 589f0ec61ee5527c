#!/usr/bin/env python
"""Thin wrapper of ``resq_jax.cli.bench_hadamard`` (also ``resq-benchmark --section hadamard``); ``--help`` documents it."""
import sys

from resq_jax.cli.bench_hadamard import main

if __name__ == "__main__":
    sys.exit(main())
