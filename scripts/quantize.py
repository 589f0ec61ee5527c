#!/usr/bin/env python
"""Thin wrapper of ``resq_jax.cli.quantize`` (installed as the ``resq-quantize`` command); ``--help`` documents it."""
import sys

from resq_jax.cli.quantize import main

if __name__ == "__main__":
    sys.exit(main())
